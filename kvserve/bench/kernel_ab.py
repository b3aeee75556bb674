"""A kernel against a previous commit's build of it, in one process: the paged decode attention kernel, or the
whole decode plan (every layer of a decode step in one call, kernels/decode_step.cpp) in a running engine.

    python -m kvserve.bench.kernel_ab --rev 96bdb07 --decode-shapes 64x192,8x1024 --layers 30 [--rounds 15]
    python -m kvserve.bench.kernel_ab --rev 7f260be --decode-plan w8a8 --batch 64 [--max-tokens 64] [--rounds 8]
                                      [--prompt-len 128]

This host's speed drifts by 10-30% within minutes, more than most kernel changes, and separate processes a minute
apart carry that drift into their ratio. Here REV's kernel (its paged_attention.cpp and common.h, read from git) is
built as a second module beside the working tree's, and each round times both on the same tensors, one after the
other, over the same layers' caches (--layers 30: KV from DRAM, as in a decode step). Reported per shape: each
build's median microseconds per call, the median of the rounds' ratios (REV / tree: above 1, the tree is faster),
and in how many rounds the tree won. Both must give the same bits first.

--decode-plan FMT builds REV's decode_step module (its decode_step.cpp and every kernel file it includes) and an
engine in weight format FMT; each round decodes --batch fresh prompts of --prompt-len tokens for --max-tokens greedy
tokens once with each build's plan (prefix cache reset in between) and takes the median decode-only step. Both must
give the same tokens first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch

from kvserve.bench.micro import decode_attention_inputs

KERNEL_FILES = {"paged_attention": ("paged_attention.cpp", "common.h"),
                "decode_step": ("decode_step.cpp", "fused_ops.cpp", "paged_attention.cpp", "gemv.cpp",
                                "quant_gemm.cpp", "common.h")}
# two modules may not both register DecodePlan with pybind11: REV's keeps its class to itself
_LOCAL = {"decode_step": (b'pybind11::class_<DecodePlan>(m, "DecodePlan")',
                          b'pybind11::class_<DecodePlan>(m, "DecodePlan", pybind11::module_local())')}


def build_at(rev: str, name: str = "paged_attention"):
    """REV's build of kernel module `name`, in a cache directory of its own (named by the commit)."""
    from torch.utils.cpp_extension import load as jit_load

    from kvserve.kernels import CFLAGS

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short=12", rev], capture_output=True, text=True, cwd=root,
                            check=True).stdout.strip()
    src = os.path.join(tempfile.gettempdir(), f"kvserve-kernel-ab-{name}-{commit}")
    os.makedirs(src, exist_ok=True)
    for file in KERNEL_FILES[name]:
        text = subprocess.run(["git", "show", f"{commit}:kvserve/kernels/{file}"], capture_output=True, cwd=root,
                              check=True).stdout
        if file == f"{name}.cpp" and name in _LOCAL:
            before, after = _LOCAL[name]
            if before not in text:
                raise SystemExit(f"{commit}'s {file} does not register DecodePlan as this tool expects")
            text = text.replace(before, after)
        with open(os.path.join(src, file), "wb") as f:
            f.write(text)
    return commit, jit_load(name=f"kvserve_{name}_{commit}", sources=[os.path.join(src, f"{name}.cpp")],
                            extra_include_paths=[src], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                            build_directory=src, verbose=False)


def compare(tree, old, batch: int, ctx: int, layers: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, kc, vc, tables, lens = decode_attention_inputs(batch, ctx, layers, torch.bfloat16, g)
    for t in tables[:3]:
        a = tree.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        b = old.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        if not torch.equal(a, b):
            raise SystemExit(f"B={batch} ctx={ctx}: the two builds disagree (max difference "
                             f"{(a.float() - b.float()).abs().max().item():.3g})")

    def one_pass(mod) -> float:  # microseconds per call, over every layer once
        t0 = time.perf_counter()
        for t in tables:
            mod.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        return (time.perf_counter() - t0) / len(tables) * 1e6

    for _ in range(3):  # warm-up: both builds' code and the shapes
        one_pass(tree), one_pass(old)
    t_tree, t_old = [], []
    for i in range(rounds):
        for mod, out in ((tree, t_tree), (old, t_old)) if i % 2 == 0 else ((old, t_old), (tree, t_tree)):
            out.append(one_pass(mod))
    ratios = [o / t for o, t in zip(t_old, t_tree)]
    return {"tree_us": statistics.median(t_tree), "rev_us": statistics.median(t_old),
            "ratio": statistics.median(ratios), "tree_wins": sum(r > 1 for r in ratios), "rounds": rounds}


def compare_plans(llm, old_plan, batch: int, max_tokens: int, rounds: int, prompt_len: int = 128) -> dict:
    """Decode-only step times of the engine's own decode plan and old_plan (REV's), alternating per round."""
    from kvserve import SamplingParams

    core = llm.engine.core
    model = core.model
    tree_plan = model.decode_plan
    steps: list[float] = []
    execute = core.runner.execute

    def timed(sched):
        t0 = time.perf_counter()
        out = execute(sched)
        if all(s.num_new_tokens == 1 for s in sched.scheduled):
            steps.append(time.perf_counter() - t0)
        return out

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run(plan, seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        prompts = [{"prompt_token_ids": torch.randint(100, 40000, (prompt_len,), generator=g).tolist()}
                   for _ in range(batch)]
        model.decode_plan = plan
        core.reset_prefix_cache()
        steps.clear()
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    core.runner.execute = timed
    try:
        if run(old_plan, 1) != run(tree_plan, 1):
            raise SystemExit("the two builds' decode plans gave different tokens")
        t_tree, t_old = [], []
        for i in range(rounds):
            for plan, out in ((tree_plan, t_tree), (old_plan, t_old)) if i % 2 == 0 else \
                    ((old_plan, t_old), (tree_plan, t_tree)):
                run(plan, 100 + i)
                out.append(statistics.median(steps) * 1e3)
    finally:
        core.runner.execute = execute
        model.decode_plan = tree_plan
    ratios = [o / t for o, t in zip(t_old, t_tree)]
    return {"tree_ms": statistics.median(t_tree), "rev_ms": statistics.median(t_old),
            "ratio": statistics.median(ratios), "tree_wins": sum(r > 1 for r in ratios), "rounds": rounds}


def plan_main(args) -> None:
    from kvserve import LLM, kernels

    llm = LLM(quantization=args.decode_plan, kv_cache_memory_gb=2.0, max_num_seqs=args.batch)
    if llm.engine.core.model.decode_plan is None:
        raise SystemExit(f"no decode plan runs {args.decode_plan} here")
    commit, old_mod = build_at(args.rev, "decode_step")
    tree_mod = kernels.decode_step_module
    kernels.decode_step_module = lambda: old_mod  # build_decode_plan takes its module from here
    try:
        old_plan = llm.engine.core.model.build_decode_plan()
    finally:
        kernels.decode_step_module = tree_mod
    r = compare_plans(llm, old_plan, args.batch, args.max_tokens, args.rounds, args.prompt_len)
    print(f"| {args.decode_plan}, batch {args.batch} | {commit}, ms per decode step | tree | {commit} / tree, "
          "median of rounds | tree faster |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| decode plan | {r['rev_ms']:.2f} | {r['tree_ms']:.2f} | {r['ratio']:.3f}x | "
          f"{r['tree_wins']} of {r['rounds']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the commit to compare against (anything git rev-parse takes)")
    ap.add_argument("--decode-shapes", default="64x192,16x512,8x1024,4x256,1x256", metavar="BxCTX,...")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--decode-plan", default=None, metavar="FMT",
                    help="compare the whole decode plan in an engine of this weight format instead")
    ap.add_argument("--batch", type=int, default=64, help="--decode-plan: sequences decoded together")
    ap.add_argument("--max-tokens", type=int, default=64, help="--decode-plan: tokens decoded per round")
    ap.add_argument("--prompt-len", type=int, default=128, help="--decode-plan: prompt tokens of each sequence")
    ap.add_argument("--rounds", type=int, default=None, help="default 15 (attention), 8 (--decode-plan)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.prompt_len < 1 or args.max_tokens < 1 or args.batch < 1:
        ap.error("--prompt-len, --max-tokens and --batch must be at least 1")
    torch.set_num_threads(args.threads)
    if args.decode_plan:
        args.rounds = args.rounds or 8
        return plan_main(args)
    args.rounds = args.rounds or 15
    from kvserve.kernels import load

    tree = load("paged_attention")
    if tree is None:
        raise SystemExit("the working tree's paged_attention kernel did not build")
    commit, old = build_at(args.rev)
    print(f"| shape | {commit}, us per call | tree, us per call | {commit} / tree, median of rounds | tree faster |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape in args.decode_shapes.split(","):
        b, ctx = (int(x) for x in shape.lower().split("x"))
        r = compare(tree, old, b, ctx, args.layers, args.rounds)
        print(f"| B={b} ctx={ctx} | {r['rev_us']:.1f} | {r['tree_us']:.1f} | {r['ratio']:.3f}x | "
              f"{r['tree_wins']} of {r['rounds']} |", flush=True)


if __name__ == "__main__":
    main()
