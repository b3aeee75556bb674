"""Prefix-grouped offline batches (BatchLLM, issue 13): `LLM.generate` of one shuffled batch with `batch_reorder` off
(arrival order) and on (grouped by shared prefix, kvserve.engine.batch_order), same engine, same requests.

    python -m kvserve.bench.batch_reorder --num-prompts 1024 --num-prefixes 32 --prefix-len 1024 --pool-prefixes 8 \\
        [--threads 2] [--dtype bfloat16] [--repeats 1] [--out r.json]

Workload (greedy, ignore_eos: every request generates exactly its max_tokens), drawn with random.Random(--seed):
`--num-prefixes` prefixes of `--prefix-len` token ids, the prompts spread evenly over them, each prompt its prefix
plus its own `--suffix-min`..`--suffix-max` ids, max_tokens uniform in `--output-min`..`--output-max`, then the list
shuffled (the arrival order). Token ids are uniform in [100, 40,000), as in core_overhead: ordinary ids of the
embedded model's vocabulary, no special tokens. The KV pool holds about `--pool-prefixes` prefixes with their
requests: num_blocks = pool_prefixes x (a prefix's blocks + requests per prefix x the mean blocks a request adds for
its suffix and output), unless --num-blocks is given.

One engine is loaded once (bf16 by default). A warm-up batch (other content, the same lengths, 16 output tokens)
runs in both orders first; the timed runs alternate arrival / grouped (--repeats pairs, the order of the pair
swapped every other repeat; medians reported), the prefix cache emptied before each. Per run: output tok/s, the
prefix-cache hit rate, and prompt tokens computed against the ideal (each prefix's full blocks once, plus every
token after them), with the excess split by cause by an observer of the scheduler's output (the engine is not
changed): a prefix computed again while its first computation had not yet completed (`in_flight`: admitted in the
same step, or during its chunked prefill, before its blocks were cached), after it had (`after_cached`: its blocks
were evicted, or the request was preempted), and prompt tokens after the prefix computed again (preemption); and
every position run through the model (outputs recomputed after preemption included) against that ideal plus each
request's outputs but the last.
Output agreement: the fraction of requests with identical tokens in both orders (all of them in float32; in bf16 a
request's numerics depend on the batch it ran in).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from kvserve.bench import emit_report

TOKEN_RANGE = (100, 40_000)


def log(msg: str) -> None:
    print(f"[batch_reorder] {msg}", file=sys.stderr, flush=True)


# ================================================================================================== workload
def make_workload(num_prompts: int, num_prefixes: int, prefix_len: int, suffix: tuple[int, int],
                  output: tuple[int, int], seed: int) -> dict:
    """{"prompts", "max_tokens", "group"} in arrival (shuffled) order; `group` is each prompt's prefix index."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(*TOKEN_RANGE) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    reqs = []
    for i in range(num_prompts):
        g = i % num_prefixes
        tail = [rng.randrange(*TOKEN_RANGE) for _ in range(rng.randint(*suffix))]
        reqs.append((prefixes[g] + tail, rng.randint(*output), g))
    rng.shuffle(reqs)
    return {"prompts": [r[0] for r in reqs], "max_tokens": [r[1] for r in reqs], "group": [r[2] for r in reqs],
            "prefix_len": prefix_len, "num_prefixes": num_prefixes}


def shared_len(w: dict, block_size: int) -> int:
    """Prefix tokens a later request of the group can take from the cache: its full blocks only."""
    return w["prefix_len"] // block_size * block_size


def ideal_prompt_tokens(w: dict, block_size: int) -> int:
    """Each prefix's full blocks once, every other prompt token once."""
    s = shared_len(w, block_size)
    used = len(set(w["group"]))
    return used * s + sum(len(p) - s for p in w["prompts"])


def pool_blocks(w: dict, pool_prefixes: float, block_size: int) -> int:
    s = shared_len(w, block_size)
    own = [-(-(len(p) + n) // block_size) - s // block_size for p, n in zip(w["prompts"], w["max_tokens"])]
    per_prefix = len(w["prompts"]) / w["num_prefixes"]
    return round(pool_prefixes * (s // block_size + per_prefix * statistics.fmean(own)))


# ================================================================================================== observer
class PrefixWasteObserver:
    """Wraps one scheduler's `schedule` (on the instance, while attached) and sorts the prompt positions each chunk
    computes: a group's shared prefix the first time (necessary), again while that first computation was not yet
    cached (in flight), again after it was, and the prompt tokens after the prefix (again only after preemption)."""

    def __init__(self, scheduler, w: dict, block_size: int):
        self.scheduler = scheduler
        self.shared = shared_len(w, block_size)
        self.group_of_prefix = {tuple(p[:self.shared]): g for p, g in zip(w["prompts"], w["group"])}
        self.group: dict[str, int] = {}
        self.pass_start: dict[str, int] = {}  # request id -> step its current pass (admission) began
        self.owner: dict[int, tuple[str, int]] = {}  # group -> (request id, pass) that computes its prefix first
        self.cached_step: dict[int, int] = {}  # group -> step after which its whole prefix was cached
        self.tokens = {"prefix_first": 0, "prefix_in_flight": 0, "prefix_after_cached": 0, "after_prefix": 0}
        self.step = 0
        self.forwarded = 0  # every position run through the model (prompt, output, recomputed after preemption)
        self._orig = None

    def __enter__(self):
        self._orig = self.scheduler.schedule
        self.scheduler.schedule = self._schedule
        return self

    def __exit__(self, *exc):
        del self.scheduler.schedule  # the class's method again

    def _schedule(self):
        out = self._orig()
        self.step += 1
        for rid in out.preempted_ids:
            self.pass_start.pop(rid, None)
        completed = []
        self.forwarded += out.num_batched_tokens
        if self.step % 1000 == 0:
            log(f"  step {self.step}: {self.forwarded} tokens forwarded")
        for sr in out.scheduled:
            req, start = sr.request, sr.start
            end, plen = start + sr.num_new_tokens, req.num_prompt_tokens
            if start >= plen:
                continue
            rid = req.request_id
            g = self.group.get(rid)
            if g is None:
                g = self.group[rid] = self.group_of_prefix.get(tuple(req.prompt_token_ids[:self.shared]), -1)
            pass_id = (rid, self.pass_start.setdefault(rid, self.step))
            self.tokens["after_prefix"] += max(0, min(end, plen) - max(start, self.shared))
            pre = max(0, min(end, self.shared) - start)
            if not pre:
                continue
            owner = self.owner.setdefault(g, pass_id)
            if owner == pass_id:
                self.tokens["prefix_first"] += pre
            elif g not in self.cached_step or pass_id[1] <= self.cached_step[g]:
                self.tokens["prefix_in_flight"] += pre
            else:
                self.tokens["prefix_after_cached"] += pre
            if end >= self.shared:
                completed.append(g)
        for g in completed:
            self.cached_step.setdefault(g, self.step)  # cached by update() at the end of this step
        return out


# ================================================================================================== runs
def run_once(llm, w: dict, reorder: bool, observe: bool = True) -> dict:
    from kvserve import SamplingParams

    engine = llm.engine
    if not engine.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be emptied (requests still hold blocks)")
    llm.batch_reorder = reorder
    prompts = [{"prompt_token_ids": p} for p in w["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in w["max_tokens"]]
    bs = engine.info.block_size
    before = engine.stats()
    observer = PrefixWasteObserver(engine.core.scheduler, w, bs)
    load_before = os.getloadavg()[0]
    cpu0, started = time.process_time(), time.perf_counter()
    if observe:
        with observer:
            outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu0
    after = engine.stats()
    assert all(o.prompt_token_ids == p for o, p in zip(outs, w["prompts"])), "outputs not in input order"
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    queried = after.prefix_cache.queried_tokens - before.prefix_cache.queried_tokens
    hit = after.prefix_cache.hit_tokens - before.prefix_cache.hit_tokens
    computed = after.prompt_tokens_computed - before.prompt_tokens_computed
    ideal = ideal_prompt_tokens(w, bs)
    misses = {k: v - before.prefix_cache.misses.get(k, 0) for k, v in after.prefix_cache.misses.items()}
    res = {"batch_reorder": reorder, "elapsed_s": elapsed, "cpu_s": cpu_s, "output_tokens": out_tokens,
           "loadavg_1min": [load_before, os.getloadavg()[0]],
           "prompt_tokens": sum(len(p) for p in w["prompts"]), "output_tok_s": out_tokens / elapsed,
           "prefix_cache_hit_rate": hit / queried if queried else 0.0, "hit_tokens": hit, "queried_tokens": queried,
           "misses": {k: v for k, v in misses.items() if v}, "prompt_tokens_computed": computed,
           "ideal_prompt_tokens": ideal, "excess_prompt_tokens": computed - ideal,
           "preemptions": after.num_preemptions - before.num_preemptions,
           "evictions": after.evictions - before.evictions, "steps": observer.step if observe else None,
           "forwarded_tokens": observer.forwarded if observe else None,
           "ideal_forwarded_tokens": ideal + sum(n - 1 for n in w["max_tokens"]),
           "outputs": [list(o.outputs[0].token_ids) for o in outs]}
    if observe:
        t = observer.tokens
        res["computed_by_cause"] = dict(t)
        res["excess_by_cause"] = {
            "prefix_in_flight": t["prefix_in_flight"], "prefix_after_cached": t["prefix_after_cached"],
            "after_prefix": t["after_prefix"] - sum(len(p) - observer.shared for p in w["prompts"])}
    return res


def build_llm(args, model=None, tokenizer=None, model_name=None, num_blocks: int | None = None):
    from kvserve import LLM
    from kvserve.engine.core import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine

    kw = dict(dtype=args.dtype, num_blocks=num_blocks, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads)
    if model is None:
        return LLM(**kw)
    return LLM.from_engine(LLMEngine(EngineArgs(**kw), model=model, tokenizer=tokenizer, model_name=model_name))


def _summary(runs: list[dict]) -> dict:
    per_run = ("outputs", "elapsed_s", "output_tok_s", "cpu_s", "loadavg_1min")
    keep = {k: v for k, v in runs[0].items() if k not in per_run}
    keep["output_tok_s"] = statistics.median(r["output_tok_s"] for r in runs)
    keep["elapsed_s"] = statistics.median(r["elapsed_s"] for r in runs)
    keep["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    keep["output_tok_s_runs"] = [round(r["output_tok_s"], 2) for r in runs]
    keep["cpu_s_runs"] = [round(r["cpu_s"], 1) for r in runs]
    keep["loadavg_1min_runs"] = [[round(x, 2) for x in r["loadavg_1min"]] for r in runs]
    return keep


def _git_state() -> dict:
    """The commit measured and the files that differed from it (the engine is shared with work in progress)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    return {"commit": head.stdout.strip(), "modified": dirty.stdout.split("\n")[:-1]}


def run(args, model=None, tokenizer=None, model_name=None) -> dict:
    """The report; `model`/`tokenizer` (a loaded LlamaModel of args.dtype) skip loading (tests)."""
    suffix, output = (args.suffix_min, args.suffix_max), (args.output_min, args.output_max)
    w = make_workload(args.num_prompts, args.num_prefixes, args.prefix_len, suffix, output, args.seed)
    bs = 16
    num_blocks = args.num_blocks or pool_blocks(w, args.pool_prefixes, bs)
    log(f"{len(w['prompts'])} prompts, {sum(map(len, w['prompts']))} prompt + {sum(w['max_tokens'])} output "
        f"tokens; ideal prompt tokens computed {ideal_prompt_tokens(w, bs)}; pool {num_blocks} blocks")
    t0 = time.perf_counter()
    llm = build_llm(args, model, tokenizer, model_name, num_blocks)
    load_s = time.perf_counter() - t0
    if llm.engine.info.block_size != bs:
        raise RuntimeError("the workload's block arithmetic assumes 16-token blocks")
    warm = make_workload(min(args.num_prompts, args.warmup_prompts), min(args.num_prefixes, args.warmup_prefixes),
                         args.prefix_len, suffix, output, args.seed + 1)
    warm["max_tokens"] = [min(n, 16) for n in warm["max_tokens"]]
    t0 = time.perf_counter()
    for reorder in (False, True):
        run_once(llm, warm, reorder, observe=False)
    warm_s = time.perf_counter() - t0
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.repeats):
        for reorder in ((False, True) if r % 2 == 0 else (True, False)):
            res = run_once(llm, w, reorder)
            log(f"repeat {r} batch_reorder={reorder}: {res['output_tok_s']:.1f} output tok/s ({res['cpu_s']:.0f} "
                f"CPU s, {res['steps']} steps), hit rate "
                f"{res['prefix_cache_hit_rate']:.3f}, prompt tokens computed {res['prompt_tokens_computed']} "
                f"(ideal {res['ideal_prompt_tokens']}), {res['elapsed_s']:.1f} s")
            runs[reorder].append(res)
    off, on = runs[False][0]["outputs"], runs[True][0]["outputs"]
    same = sum(a == b for a, b in zip(off, on))
    arrival, grouped = _summary(runs[False]), _summary(runs[True])
    report = {
        "command": "python -m kvserve.bench.batch_reorder " + " ".join(args.argv),
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "num_blocks": num_blocks, "kv_capacity_tokens": num_blocks * bs,
        "engine_args": {k: getattr(llm.engine.core.args, k, None) for k in
                        ("dtype", "block_size", "max_num_batched_tokens", "max_num_seqs", "enable_prefix_caching",
                         "num_threads", "quantization", "preemption_mode", "swap_space_gb")},
        "load_s": round(load_s, 1), "warmup_s": round(warm_s, 1),
        "workload": {"prompts": len(w["prompts"]), "prompt_tokens": sum(map(len, w["prompts"])),
                     "output_tokens": sum(w["max_tokens"]), "ideal_prompt_tokens": ideal_prompt_tokens(w, bs)},
        "arrival": arrival, "grouped": grouped,
        "speedup_output_tok_s": grouped["output_tok_s"] / arrival["output_tok_s"],
        "speedup_per_pair": [round(b["output_tok_s"] / a["output_tok_s"], 3) for a, b in zip(runs[False], runs[True])],
        "cpu_s_ratio": arrival["cpu_s"] / grouped["cpu_s"],
        "output_agreement": same / len(off), "identical_outputs": same, "requests": len(off),
        "machine": {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg()}, "git": _git_state(),
    }
    return report


def markdown(r: dict) -> str:
    lines = ["| order | output tok/s | time (s) | CPU s | steps | prefix-cache hit rate | prompt tokens computed "
             "(ideal) | excess: prefix in flight / prefix after cached / after the prefix | tokens forwarded (ideal) "
             "| preemptions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("arrival", "grouped"):
        x = r[name]
        c = x.get("excess_by_cause", {})
        lines.append(f"| {name} | {x['output_tok_s']:.1f} | {x['elapsed_s']:.1f} | {x['cpu_s']:.0f} | {x['steps']} "
                     f"| {x['prefix_cache_hit_rate']:.3f} "
                     f"| {x['prompt_tokens_computed']} ({x['ideal_prompt_tokens']}) | {c.get('prefix_in_flight')} / "
                     f"{c.get('prefix_after_cached')} / {c.get('after_prefix')} | {x['forwarded_tokens']} "
                     f"({x['ideal_forwarded_tokens']}) | {x['preemptions']} |")
    lines.append(f"\nGrouped / arrival output tok/s: {r['speedup_output_tok_s']:.2f}x (per pair: "
                 f"{', '.join(f'{x:.2f}x' for x in r['speedup_per_pair'])}; CPU seconds {r['cpu_s_ratio']:.2f}x "
                 f"fewer); identical outputs {r['identical_outputs']}/{r['requests']} ({r['engine_args']['dtype']}).")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.batch_reorder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--num-prefixes", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-min", type=int, default=32)
    ap.add_argument("--suffix-max", type=int, default=128)
    ap.add_argument("--output-min", type=int, default=32)
    ap.add_argument("--output-max", type=int, default=128)
    ap.add_argument("--pool-prefixes", type=float, default=8, help="KV pool: about this many prefixes + requests")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV pool blocks (instead of --pool-prefixes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=128, help="default: LLM's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="default: LLM's")
    ap.add_argument("--repeats", type=int, default=1, help="timed (arrival, grouped) pairs; medians reported")
    ap.add_argument("--warmup-prompts", type=int, default=32)
    ap.add_argument("--warmup-prefixes", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(args)
    report["markdown"] = markdown(report)
    emit_report(report, args.out, report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
