"""Native CPU kernels, JIT-built once with torch's cpp_extension.

Each entry point is None where its kernel did not build, and declines (None / False) a shape or dtype it does not
cover; choosing the PyTorch fallback is the caller's decision (kvserve.model.attention). Plain tensors in and out:
this package knows nothing of the model or its batch types.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform

log = logging.getLogger("kvserve.kernels")
_HERE = os.path.dirname(os.path.abspath(__file__))
_cache: dict[str, object] = {}
KERNEL_HEAD_DIMS = (64, 80, 96, 128, 256)  # instantiated in paged_attention.cpp

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-ffp-contract=fast"]


# Kernel files compiled into another module as well (decode_step.cpp includes them): a change rebuilds it too.
_INCLUDES = {"decode_step": ("fused_ops.cpp", "paged_attention.cpp", "gemv.cpp", "quant_gemm.cpp")}


def _build_dir(name: str, source: str) -> str:
    import torch

    text = b""
    deps = [os.path.join(_HERE, f) for f in _INCLUDES.get(name, ())]
    for path in (source, os.path.join(_HERE, "common.h"), *deps):  # a changed header gets a fresh build too
        with open(path, "rb") as f:
            text += f.read()
    digest = hashlib.sha256(text + " ".join(CFLAGS).encode() + torch.__version__.encode()
                            + platform.machine().encode()).hexdigest()[:16]
    root = os.environ.get("KVSERVE_EXT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "ext")
    path = os.path.join(root, f"{name}-{digest}")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive(build_dir: str):
    """Hold the build directory alone, and clear a stale torch build lock.

    torch's loader marks a build with a `lock` file that only the process that made it removes, and every process
    that loads the module waits while it exists, even when ninja has nothing to do. A process killed in that window
    (a server stopped while its engine core starts) leaves it behind, and every later start hangs. An flock dies with
    its holder, so under it no other process is building here and a `lock` file is stale."""
    with open(os.path.join(build_dir, ".kvserve-build.flock"), "w") as f:  # closing the file releases the flock
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            os.remove(os.path.join(build_dir, "lock"))
            log.warning("removed a stale build lock in %s (a process was killed while loading this kernel)",
                        build_dir)
        except FileNotFoundError:
            pass
        yield


def load(name: str):
    """The compiled module, or None when KVSERVE_NO_EXT=1 or no compiler is available (callers fall back)."""
    if os.environ.get("KVSERVE_NO_EXT") == "1":
        return None
    if name in _cache:
        return _cache[name]
    module = None
    try:
        from torch.utils.cpp_extension import load as jit_load

        source = os.path.join(_HERE, f"{name}.cpp")
        build_dir = _build_dir(name, source)
        with _exclusive(build_dir):
            module = jit_load(name=f"kvserve_{name}", sources=[source], extra_include_paths=[_HERE],
                              extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=build_dir,
                              verbose=False)
    except Exception as e:  # no compiler, no ninja, ...: slower but correct
        log.warning("native kernel %s unavailable (%s); using the PyTorch fallback", name, e)
    _cache[name] = module
    return module


def decode_attention_kernel():
    """The paged decode attention kernel, or None where it did not build.

    fn(q (B, H, D), k_cache, v_cache (NB, BS, Hkv, D), block_tables (B, MB) int64, seq_lens (B,) int32, scale,
    scores=None) returns (B, H, D), or None (nothing computed) for a head_dim or dtype the kernel does not cover.
    `scores`, a float32 (B, Hkv, S) tensor, gets each row's attention probabilities summed over the query heads of
    each KV head added to it (per-key attention mass, for KV eviction)."""
    mod = load("paged_attention")
    if mod is None:
        return None
    import torch

    def decode(q, k_cache, v_cache, block_tables, seq_lens, scale, scores=None):
        if q.shape[-1] not in KERNEL_HEAD_DIMS or q.dtype not in (torch.float32, torch.bfloat16):
            return None
        return mod.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, scores)

    return decode


def prefill_attention_kernel():
    """The paged prefill attention kernel (bfloat16, AVX512-BF16), or None where it did not build.

    fn(q (T, H, D), k_cache, v_cache (NB, BS, Hkv, D), token_starts, num_tokens, ctx_starts (S,) int64,
    block_tables (S, MB) int64, out (T, H, D), scale, q_positions=None) attends every chunk in one call, writing its
    rows of out, and returns True; it returns False (out untouched) for a dtype, head_dim or head layout it does not
    cover, and for plain chunks where AMX runs (PyTorch's SDPA is faster there). `q_positions` (T,) int64: each row
    sees the keys up to its own position instead of its place in the chunk (ascending within a chunk, below
    ctx_start + num_tokens): CacheBlend's scattered recomputed tokens."""
    mod = load("prefill_attention")
    if mod is None:
        return None
    import torch

    empty = torch.empty(0, dtype=torch.long)
    attn = load("paged_attention")

    def prefill(q, k_cache, v_cache, token_starts, num_tokens, ctx_starts, block_tables, out, scale,
                q_positions=None) -> bool:
        heads, kv_heads = q.shape[1], k_cache.shape[2]
        if q_positions is None and attn is not None and attn.amx_enabled():
            # AMX: PyTorch's SDPA (oneDNN's bf16 tiles) measured 1.5x faster than this kernel at 128 fresh tokens
            # and 3-4x at 1,024, or 512 over a cached prefix (`python -m kvserve.bench.micro --prefill`): the caller
            # falls back to it
            return False
        if (q.dtype != torch.bfloat16 or not mod.supported(q.shape[-1], k_cache.shape[1])
                or heads // kv_heads > 16 or kv_heads >= 256):  # the kernel's per-item row and head limits
            return False
        mod.prefill_attention(q, k_cache, v_cache, token_starts, num_tokens, ctx_starts, block_tables, out, scale,
                              empty if q_positions is None else q_positions)
        return True

    return prefill


def fused_ops_module():
    """The fused elementwise kernels (rms_norm, add_rms_norm_, silu_mul, rope_qkv_write_), or None where they did
    not build. They check their own inputs and raise on what they cannot take."""
    return load("fused_ops")


def quant_gemm_module():
    """The Q8_0 linear kernels (q8_linear, quantize_activations, has_vnni), or None where they did not build.
    They check their own inputs and raise on what they cannot take."""
    return load("quant_gemm")


def gemv_module():
    """The small-batch bfloat16 linear kernel (pack, gemv, MAX_M), or None where it did not build or the CPU lacks
    AVX512-BF16. It checks its own inputs and raises on what it cannot take."""
    mod = load("gemv")
    return mod if mod is not None and mod.available() else None


def decode_step_module():
    """DecodePlan: every layer of a small decode batch in one call (bf16 gemv or int8 linears), or None where it did
    not build or the CPU lacks AVX512-BF16."""
    if gemv_module() is None:
        return None
    return load("decode_step")
