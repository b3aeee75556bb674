"""KV eviction: quality, capacity and decode speed per policy and budget (a benchmark, not a timed test).

    python -m kvserve.bench.eviction --tasks passkey,qa,loglik --out docs/results/eviction/quality.json
    python -m kvserve.bench.eviction --tasks speed,capacity --out docs/results/eviction/speed.json

Workloads are generated with a fixed seed, nothing is downloaded:
- passkey: a five-digit key hidden at 10 depths in 2k / 4k / 7k tokens of filler; accuracy (the key in the greedy
  answer) and the teacher-forced log-likelihood of the key's tokens;
- qa: generated English documents with six notes hidden in them ("Note: the city where the treaty was signed is
  Oslo."), a question per note; accuracy, and teacher-forced top-1 agreement with full KV over its greedy answer
  (the bar's fallback when the model's own accuracy is low);
- conversation: 20-turn chats (about 4k tokens), each turn a fact about a friend among small talk; questions about
  friends from the first third of the chat (for episodic, EpiCache's setting); accuracy;
- loglik: teacher-forced log-likelihood of the last 256 tokens of a long English text (`pydoc_data.topics`);
- speed: decode tok/s of 16 concurrent 7k-token contexts;
- capacity: concurrent 7k-token requests a 1 GiB pool holds (measured running, plus the block arithmetic).
One engine per policy; every budget is a per-request override on it, so a context is prefilled once per engine and
reused through the prefix cache (an evicting request registers its prompt blocks before it evicts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch

from kvserve.bench import elapsed_log, write_json
from kvserve.config import EVICTION_POLICIES
from kvserve.sampling import SamplingParams
from kvserve.worker.sampler import Sampler

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
# (what the note names, the values it may take): each document hides one note per fact, in a random order
FACTS = (("the secret ingredient of Grandma Ada's soup", ("cinnamon", "saffron", "ginger", "nutmeg", "cardamom")),
         ("the name of the captain's parrot", ("Biscuit", "Pepper", "Mango", "Pickles", "Noodle")),
         ("the city where the treaty was signed", ("Lisbon", "Oslo", "Kyoto", "Lima", "Dakar")),
         ("the colour of the lighthouse door", ("green", "orange", "purple", "yellow", "scarlet")),
         ("the password of the old laboratory", ("falcon", "tundra", "quartz", "meadow", "harbor")),
         ("the instrument the mayor plays", ("cello", "banjo", "oboe", "harp", "trumpet")))


class ForcingSampler(Sampler):
    """Feeds given tokens instead of sampling (teacher forcing) for some requests and records, per forced token,
    its log-probability and whether it was the model's top-1 choice."""

    def __init__(self):
        super().__init__()
        self.forced: dict[str, list[int]] = {}
        self.records: dict[str, list[tuple[float, bool]]] = {}

    def __call__(self, logits, requests, drafts=None):
        tokens, lps = super().__call__(logits, requests, drafts)
        for i, r in enumerate(requests):
            target = self.forced.get(r.request_id)
            if target is None:
                continue
            t = target[r.num_output_tokens]
            lp = torch.log_softmax(logits[i].float(), dim=-1)
            self.records.setdefault(r.request_id, []).append((float(lp[t]), int(lp.argmax()) == t))
            tokens[i] = [t]
        return tokens, lps


_PARTS: dict[str, tuple] = {}


def make_engine(policy: str, memory_gb: float, dtype: str, budget_default: int = 1024):
    """An engine for `policy` ("full": no eviction) on weights loaded once per dtype and shared."""
    from kvserve.engine.core import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine

    kw = {"kv_eviction": {"policy": policy, "budget_tokens": budget_default}} if policy != "full" else {}
    args = EngineArgs(dtype=dtype, kv_cache_memory_gb=memory_gb, max_num_batched_tokens=2048, max_num_seqs=64, **kw)
    shared = _PARTS.get(dtype)
    engine = LLMEngine(args, *shared) if shared else LLMEngine(args)
    _PARTS[dtype] = (engine.core.model, engine.tokenizer, engine.info.model_name)
    sampler = ForcingSampler()
    engine.core.runner.sampler = sampler  # a benchmark's probe: teacher forcing needs the logits
    return engine, sampler


def run(engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def forced(engine, sampler: ForcingSampler, items: list[tuple[str, list[int], list[int]]], budget: int) -> dict:
    """Teacher-forced log-probabilities and top-1 hits of each (rid, prompt, target): `target` after `prompt` under
    `budget` (0: full KV), all in one batch. Returns rid -> [(logprob, top-1 hit)] per target token."""
    reqs = []
    for rid, prompt, target in items:
        sampler.forced[rid] = target
        reqs.append((rid, prompt, SamplingParams(temperature=0, max_tokens=len(target), ignore_eos=True,
                                                 kv_budget_tokens=budget)))
    run(engine, reqs)
    out = {}
    for rid, _, _ in items:
        sampler.forced.pop(rid)
        out[rid] = sampler.records.pop(rid)
    return out


# ------------------------------------------------------------------------------------------------ workloads
def passkey_prompts(tok, lengths: list[int], depths: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    filler = tok.encode(FILLER, add_special_tokens=False)
    out = []
    for n in lengths:
        for d in range(depths):
            key = str(rng.randrange(10000, 100000))
            needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                                add_special_tokens=False)
            question = tok.encode("What is the pass key? The pass key is", add_special_tokens=False)
            body = n - len(needle) - len(question)
            hay = (filler * (body // len(filler) + 1))[:body]
            at = int(body * d / depths)
            # the needle sits on a sentence boundary of the filler
            while at > 0 and not tok.decode(hay[at - 1:at]).endswith("."):
                at -= 1
            ids = hay[:at] + needle + hay[at:] + question
            out.append({"ids": ids, "key": key, "length": n, "depth": d / depths, "needle": [at, at + len(needle)],
                        "answer_ids": tok.encode(" " + key, add_special_tokens=False)})
    return out


def qa_documents(tok, num_docs: int, doc_tokens: int, seed: int) -> list[dict]:
    """Generated English text with one note per fact type hidden at spread-out places; a question per fact."""
    from kvserve.bench.workloads import TextMaker

    rng, maker = random.Random(seed), TextMaker(tok)
    docs = []
    for _ in range(num_docs):
        facts = rng.sample(FACTS, k=len(FACTS))
        answers = [rng.choice(values) for _, values in facts]
        chunk = doc_tokens // (len(facts) + 1)
        parts = []
        for i in range(len(facts) + 1):
            parts.append(maker.text(rng, chunk))
            if i < len(facts):
                parts.append(f" Note: {facts[i][0]} is {answers[i]}. ")
        text = "".join(parts)
        qs = [{"ids": tok.apply_chat_template([{"role": "user", "content":
                                                f"{text}\n\nAnswer from the text above: what is {f}?"}]),
               "answer": a, "question": f, "group": doc_tokens} for (f, _), a in zip(facts, answers)]
        docs.append({"questions": qs, "tokens": len(tok.encode(text, add_special_tokens=False))})
    return docs


PEOPLE = ("Ada", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Ines", "Jakob", "Keiko", "Leon",
          "Maren", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Stefan", "Tove", "Umar", "Vera", "Wim", "Yara")
# (the fact as a phrase about a person, what the user says, its values): a chat uses each at most once
TURN_FACTS = tuple(
    [(f"the name of {{p}}'s {pet}", f"{{p}} has a {pet} called {{v}}.",
      ("Biscuit", "Pepper", "Mango", "Pickles", "Noodle", "Waffle", "Clover", "Ziggy"))
     for pet in ("dog", "cat", "parrot", "horse", "goat", "tortoise")]
    + [(f"the colour of {{p}}'s {thing}", f"{{p}} painted the {thing} {{v}}.",
        ("green", "orange", "purple", "yellow", "scarlet", "turquoise", "silver", "pink"))
       for thing in ("bicycle", "front door", "car", "boat", "fence")]
    + [("the city {p} moved to", "{p} moved to {v} last spring.", ("Lisbon", "Oslo", "Kyoto", "Lima", "Dakar", "Quito")),
       ("the instrument {p} is learning", "{p} is learning to play the {v}.",
        ("cello", "banjo", "oboe", "harp", "trumpet", "accordion")),
       ("the dish {p} cooked", "{p} cooked {v} for dinner.", ("paella", "lasagna", "goulash", "risotto", "ramen")),
       ("the sport {p} plays", "{p} plays {v} every weekend.", ("tennis", "rugby", "cricket", "volleyball", "squash")),
       ("the language {p} is studying", "{p} is studying {v}.", ("Finnish", "Korean", "Swahili", "Greek", "Welsh")),
       ("the flower {p} planted", "{p} planted {v} in the garden.", ("tulips", "orchids", "lilies", "peonies")),
       ("the mountain {p} climbed", "{p} climbed {v} in the summer.", ("Kilimanjaro", "Olympus", "Fuji", "Denali")),
       ("the car {p} bought", "{p} bought a {v}.", ("Volvo", "Fiat", "Tesla", "Skoda", "Subaru")),
       ("the job {p} started", "{p} started working as a {v}.", ("pilot", "nurse", "plumber", "baker", "lawyer")),
       ("the museum {p} visited", "{p} visited the {v}.", ("Louvre", "Prado", "Uffizi", "Hermitage")),
       ("the game {p} plays at night", "{p} plays {v} at night.", ("chess", "poker", "mahjong", "backgammon"))])


def conversations(tok, num: int, turns: int, questions: int, seed: int) -> list[dict]:
    """Long chats: each user turn tells a fact about one friend among small talk, the assistant acknowledges; the
    final question asks about a friend from the first third of the chat (a question per early turn asked)."""
    from kvserve.bench.workloads import TextMaker

    rng, maker = random.Random(seed), TextMaker(tok)
    out = []
    for _ in range(num):
        people = rng.sample(PEOPLE, turns)
        kinds = rng.sample(TURN_FACTS, turns)
        msgs, facts = [], []
        for p, (phrase, said, values) in zip(people, kinds):
            v = rng.choice(values)
            facts.append((p, phrase.format(p=p), v))
            msgs.append({"role": "user", "content": f"Let me tell you about my friend {p}. {said.format(p=p, v=v)} "
                         f"{maker.text(rng, rng.randrange(80, 160))}"})
            msgs.append({"role": "assistant", "content": f"Thank you for telling me about {p}. "
                         f"{maker.text(rng, rng.randrange(15, 40))}"})
        early = rng.sample(range(max(turns // 3, 1)), min(questions, max(turns // 3, 1)))
        qs = [{"ids": tok.apply_chat_template(msgs + [{"role": "user", "content":
                                                        f"Answer from our conversation above: what is "
                                                        f"{facts[i][1]}?"}]),
               "answer": facts[i][2], "group": i} for i in early]
        out.append({"questions": qs, "tokens": len(qs[0]["ids"])})
    return out


def loglik_text(tok, total: int) -> tuple[list[int], list[int]]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text, add_special_tokens=False)[:total]
    return ids[:-256], ids[-256:]


# ------------------------------------------------------------------------------------------------ tasks
def task_passkey(policy, engine, sampler, budgets, prompts, log) -> dict:
    res = {}
    for budget in budgets:
        rows = []
        reqs = [(f"pk-{policy}-{budget}-{i}", p["ids"], SamplingParams(temperature=0, max_tokens=12,
                                                                        kv_budget_tokens=budget))
                for i, p in enumerate(prompts)]
        outs = run(engine, reqs)
        recs_of = forced(engine, sampler, [(rid + "-f", p["ids"], p["answer_ids"])
                                           for (rid, _, _), p in zip(reqs, prompts)], budget)
        for (rid, _, _), p in zip(reqs, prompts):
            text = engine.tokenizer.decode(outs[rid].outputs[0].token_ids)
            recs = recs_of[rid + "-f"]
            rows.append({"length": p["length"], "depth": p["depth"], "hit": p["key"] in text,
                         "key_logprob": sum(r[0] for r in recs) / len(recs)})
        by_len = {}
        for n in sorted({r["length"] for r in rows}):
            sel = [r for r in rows if r["length"] == n]
            by_len[str(n)] = {"accuracy": sum(r["hit"] for r in sel) / len(sel),
                              "key_logprob": statistics.mean(r["key_logprob"] for r in sel)}
        res[f"{policy}/{budget}"] = {"by_length": by_len, "rows": rows}
        log(f"passkey {policy:9s} budget {budget:5d}: " + "  ".join(
            f"{n}: acc {v['accuracy']:.2f} lp {v['key_logprob']:.2f}" for n, v in by_len.items()))
    return res


def task_questions(tag, policy, engine, sampler, budgets, questions, ref_ids, log, agree_tokens: int = 32) -> dict:
    """Accuracy (the answer in the greedy output) and teacher-forced top-1 agreement with full KV over its greedy
    answer. `ref_ids`: full KV's answers, filled in by the "full" run, which comes first."""
    res = {}
    for budget in budgets:
        reqs = [(f"{tag}-{policy}-{budget}-{i}", q["ids"], SamplingParams(temperature=0, max_tokens=agree_tokens,
                                                                           kv_budget_tokens=budget))
                for i, q in enumerate(questions)]
        outs = run(engine, reqs)
        hits, agree = [], []
        for (rid, _, _), q in zip(reqs, questions):
            text = engine.tokenizer.decode(outs[rid].outputs[0].token_ids)
            hits.append(q["answer"].lower() in text.lower())
        if policy != "full":
            items = [(rid + "-f", q["ids"], ref_ids[i]) for i, ((rid, _, _), q) in enumerate(zip(reqs, questions))
                     if ref_ids[i]]
            agree = [sum(r[1] for r in recs) / len(recs) for recs in forced(engine, sampler, items, budget).values()]
        if policy == "full":
            ref_ids[:] = [outs[rid].outputs[0].token_ids for rid, _, _ in reqs]
            agree = [1.0]
        groups = sorted({q["group"] for q in questions})
        r = res[f"{policy}/{budget}"] = {
            "accuracy": sum(hits) / len(hits), "top1_agreement": statistics.mean(agree),
            "accuracy_by_group": {str(n): statistics.mean(h for h, q in zip(hits, questions) if q["group"] == n)
                                  for n in groups}}
        log(f"{tag:7s} {policy:9s} budget {budget:5d}: acc {r['accuracy']:.3f} "
            f"top-1 agreement with full KV {r['top1_agreement']:.3f}")
    return res


def task_loglik(policy, engine, sampler, budgets, context, target, log) -> dict:
    res = {}
    for budget in budgets:
        recs = forced(engine, sampler, [(f"ll-{policy}-{budget}", context, target)], budget)[f"ll-{policy}-{budget}"]
        res[f"{policy}/{budget}"] = {"mean_logprob": sum(r[0] for r in recs) / len(recs),
                                     "top1": sum(r[1] for r in recs) / len(recs)}
        log(f"loglik  {policy:9s} budget {budget:5d}: mean log-likelihood {res[f'{policy}/{budget}']['mean_logprob']:.4f}")
    return res


def distinct_contexts(tok, n: int, length: int, seed: int) -> list[list[int]]:
    from kvserve.bench.workloads import TextMaker

    maker, rng = TextMaker(tok), random.Random(seed)
    return [tok.encode(maker.text(rng, length), add_special_tokens=False)[:length] for _ in range(n)]


def decode_rate(engine, contexts, budget: int, new_tokens: int, tag: str) -> dict:
    """Output tok/s over the steps where every request is decoding (their prefills, or prefix-cache hits, done)."""
    n = len(contexts)
    for i, ids in enumerate(contexts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True,
                                          kv_budget_tokens=budget))
    times, tokens = [], []
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        sched = engine.core.scheduler
        if sched.num_running == n and all(not r.in_prefill for r in sched.running):  # every one decoding
            times.append(elapsed)
            tokens.append(n)
        del outs
    skip = min(4, len(times) // 4)  # a few warm-up steps (new shapes)
    t, k = sum(times[skip:]), sum(tokens[skip:])
    return {"tok_s": k / t if t else 0.0, "decode_steps": len(times) - skip,
            "median_step_ms": 1e3 * statistics.median(times[skip:]) if times[skip:] else None}


def task_speed(policies, budgets, args, tok, log) -> dict:
    contexts = distinct_contexts(tok, args.speed_requests, args.speed_length, args.seed + 7)
    res = {}
    for policy in policies:
        engine, _ = make_engine(policy, args.speed_memory_gb, args.dtype)
        # prefill every context once (full KV), then each budget hits the prefix cache and decodes
        full = decode_rate(engine, contexts, 0, args.new_tokens, f"sp-{policy}-full")
        if policy == policies[0]:
            res["full/0"] = full
            log(f"speed   full      budget     0: {full['tok_s']:.1f} tok/s ({full['median_step_ms']:.1f} ms/step)")
        for budget in budgets:
            r = decode_rate(engine, contexts, budget, args.new_tokens, f"sp-{policy}-{budget}")
            r["speedup_vs_full"] = r["tok_s"] / full["tok_s"] if full["tok_s"] else None
            res[f"{policy}/{budget}"] = r
            log(f"speed   {policy:9s} budget {budget:5d}: {r['tok_s']:.1f} tok/s ({r['median_step_ms']:.1f} ms/step), "
                f"{r['speedup_vs_full']:.2f}x full KV ({full['tok_s']:.1f} in the same engine)")
        del engine
    return res


def task_capacity(budgets, args, tok, log) -> dict:
    """Concurrent 7k-token requests running at once in a 1 GiB pool: measured by submitting more than fit and
    counting the running ones once every admitted prompt is computed, per budget (policy-independent)."""
    from kvserve.worker.kv_cache import bytes_per_block

    res = {}
    for budget in [0] + budgets:
        engine, _ = make_engine("streaming", args.capacity_memory_gb, args.dtype)
        core = engine.core
        bs = core.info.block_size
        per_req = -(-(args.speed_length + args.capacity_tokens) // bs) if budget == 0 else -(-(budget + bs) // bs)
        total = core.kv_manager.num_blocks
        # the arithmetic: one prefill at its peak, the rest holding budget + a block
        peak = -(-(args.speed_length + 1) // bs)
        predicted = total // per_req if budget == 0 else 1 + (total - peak) // per_req
        n = min(predicted + 2, args.capacity_max_requests)
        contexts = distinct_contexts(tok, n, args.speed_length, args.seed + 11)
        for i, ids in enumerate(contexts):
            engine.add_request(f"cap-{budget}-{i}", {"prompt_token_ids": ids},
                               SamplingParams(temperature=0, max_tokens=args.capacity_tokens, ignore_eos=True,
                                              kv_budget_tokens=budget))
        most, started = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            sched = core.scheduler
            decoding = sum(1 for r in sched.running if not r.in_prefill)
            most = max(most, decoding)
        res[str(budget)] = {"max_concurrent_decoding": most, "predicted": predicted, "requests": n,
                            "pool_blocks": total, "pool_gib": total * bytes_per_block(core.model.config, bs,
                                                                                       core.kv_cache.tensor.dtype) / 2**30,
                            "seconds": time.perf_counter() - started}
        log(f"capacity budget {budget:5d}: {most} concurrent {args.speed_length}-token requests decoding "
            f"(arithmetic {predicted}; {n} submitted)")
        del engine, core
    return res


def task_score_cost(log) -> dict:
    """What accumulating attention mass costs in the decode kernel (bf16, the model's shapes): 16 decode rows at a
    1k and a 7k context with and without the score buffer, and 32 observation-window rows at 7k (snapkv's one extra
    pass at the end of a prefill), per layer; medians of 30 after 5 warm-ups."""
    from kvserve.bench.micro import timeit
    from kvserve.kernels import decode_attention_kernel

    fn = decode_attention_kernel()
    if fn is None:
        return {"native": False}
    g = torch.Generator().manual_seed(0)
    h, hkv, d, bs = 9, 3, 64, 16
    res = {}
    for rows, ctx in ((16, 1024), (16, 7168), (32, 7168)):
        mb = -(-ctx // bs)
        nb = rows * mb + 1
        kc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
        vc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
        tables = torch.randperm(nb - 1, generator=g)[:rows * mb].view(rows, mb)
        lens = torch.full((rows,), ctx, dtype=torch.int32)
        q = torch.randn(rows, h, d, generator=g).to(torch.bfloat16)
        buf = torch.zeros(rows, hkv, mb * bs)
        plain = timeit(lambda: fn(q, kc, vc, tables, lens, 0.125))
        scored = timeit(lambda: fn(q, kc, vc, tables, lens, 0.125, buf))
        res[f"{rows}x{ctx}"] = {"plain_ms": plain, "with_scores_ms": scored, "overhead": scored / plain - 1}
        log(f"score cost {rows} rows x {ctx} context, one layer: {plain:.3f} ms plain, {scored:.3f} ms with "
            f"scores (+{100 * (scored / plain - 1):.1f}%)")
    return res


def task_kvpress(args, tok, log) -> dict:
    """kvpress (HF transformers) on the passkey prompts of --kvpress-lengths, in its own venv (kvpress_ref.py); for
    snapkv, the kept-token sets compared with the ones kvserve keeps on the same prompts (kvserve_kept_sets)."""
    import subprocess
    import tempfile

    from kvserve.config import KVEvictionConfig
    from kvserve.model.loader import default_model_path

    defaults = KVEvictionConfig("snapkv")
    lengths = [int(x) for x in args.kvpress_lengths.split(",")]
    prompts = [p for p in passkey_prompts(tok, [int(x) for x in args.lengths.split(",")], args.depths, args.seed)
               if p["length"] in lengths]
    budgets = [int(b) for b in args.kvpress_budgets.split(",")]
    spec = {"model": default_model_path(), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "policies": args.kvpress_policies.split(","), "budgets": budgets,
            "sink_tokens": defaults.sink_tokens, "observation_window": defaults.observation_window,
            "pooling_kernel": defaults.pooling_kernel, "max_tokens": 12, "prompts": prompts}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "prompts.json"), os.path.join(d, "out.json")
        json.dump(spec, open(src, "w"))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvpress_ref.py")
        subprocess.run([args.kvpress_python, script, src, dst], check=True)
        out = json.load(open(dst))
    summary = {}
    for r in out["results"]:
        s = summary.setdefault(f"{r['policy']}/{r['budget']}/{r['length']}", {"hits": 0, "n": 0, "lp": 0.0})
        s["hits"] += r["hit"]
        s["n"] += 1
        s["lp"] += r["key_logprob"]
    table = {k: {"accuracy": v["hits"] / v["n"], "key_logprob": v["lp"] / v["n"]} for k, v in summary.items()}
    for k, v in table.items():
        log(f"kvpress {k}: acc {v['accuracy']:.2f} key log-likelihood {v['key_logprob']:.2f}")
    res = {"summary": table, "versions": out["versions"], "seconds": out["seconds"]}
    if any(r["policy"] == "snapkv" for r in out["results"]):
        res["kept_sets"] = kvserve_kept_sets(args, prompts, out["results"], log)
    # the kept positions are the comparison's input, not a result to keep
    res["rows"] = [{k: v for k, v in r.items() if k not in ("kept", "kept_per_head")} for r in out["results"]]
    return res


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def kvserve_kept_sets(args, prompts: list[dict], rows: list[dict], log) -> dict:
    """kvserve's snapkv on the same prompts and budgets: the prompt positions it keeps at the end of the prefill (its
    one eviction then), compared with kvpress's sets: per layer and KV head (SnapKVPress as published) and the one set
    kvserve's rule picks from kvpress's scores summed over layers and heads (snapkv_request). Jaccard similarity of
    the sets, the share of the needle's tokens kept, and kvserve's answer."""
    import copy

    from kvserve.worker.eviction import select_evicted

    by = {(r["policy"], r["budget"], r["prompt"]): r for r in rows}
    engine, _ = make_engine("snapkv", args.memory_gb, args.dtype)
    evictor = engine.core.runner.evictor  # a benchmark's probe: the kept set is the worker's choice
    res = {}
    for budget in sorted({r["budget"] for r in rows if r["policy"] == "snapkv"}):
        per = []
        for pi, p in enumerate(prompts):
            ids, rid = p["ids"], f"kept-{budget}-{pi}"
            engine.add_request(rid, {"prompt_token_ids": ids},
                               SamplingParams(temperature=0, max_tokens=12, kv_budget_tokens=budget))
            kept, final = None, None
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        final = o
                state = evictor.states.get(rid)
                if kept is None and state is not None and state.pooled:
                    # the prompt's scores are pooled and nothing is compacted yet (KV index == position): the same
                    # choice the step just made
                    gone = set(select_evicted(evictor.config, copy.deepcopy(state), len(ids), budget))
                    kept = [i for i in range(len(ids)) if i not in gone]
            needle = range(*p["needle"])

            def needle_share(s) -> float:
                s = set(s)
                return sum(i in s for i in needle) / len(needle)

            heads = [h for layer in by[("snapkv", budget, pi)]["kept_per_head"] for h in layer]
            agg = by.get(("snapkv_request", budget, pi))
            per.append({
                "kvserve_hit": p["key"] in engine.tokenizer.decode(final.outputs[0].token_ids),
                "kvserve_kept": len(kept),
                "jaccard_vs_kvpress_per_request": jaccard(kept, agg["kept"]) if agg else None,
                "jaccard_vs_kvpress_heads_mean": statistics.mean(jaccard(kept, h) for h in heads),
                "jaccard_kvpress_heads_vs_per_request": (statistics.mean(jaccard(agg["kept"], h) for h in heads)
                                                         if agg else None),
                "needle_kept_kvserve": needle_share(kept),
                "needle_kept_kvpress_heads_mean": statistics.mean(needle_share(h) for h in heads),
                "needle_kept_kvpress_heads_all": statistics.mean(needle_share(h) == 1.0 for h in heads),
                "needle_kept_kvpress_per_request": needle_share(agg["kept"]) if agg else None})
        keys = [k for k in per[0] if per[0][k] is not None]
        res[str(budget)] = {"mean": {k: statistics.mean(float(x[k]) for x in per) for k in keys}, "prompts": per}
        m = res[str(budget)]["mean"]
        log(f"kept sets, snapkv budget {budget}: kvserve vs kvpress scores summed per request: Jaccard "
            f"{m.get('jaccard_vs_kvpress_per_request', float('nan')):.3f}; vs kvpress per head: "
            f"{m['jaccard_vs_kvpress_heads_mean']:.3f}; needle kept kvserve {m['needle_kept_kvserve']:.2f}, "
            f"kvpress heads {m['needle_kept_kvpress_heads_mean']:.2f}; kvserve acc {m['kvserve_hit']:.2f}")
    engine.close()
    return res


def report(paths: list[str]) -> str:
    """Markdown tables (docs/eviction.md, docs/benchmarks.md) from this benchmark's JSON files."""
    data: dict = {}
    for path in paths:
        with open(path) as f:
            for k, v in json.load(f).items():
                if k == "kvpress" and k in data:  # runs of other policies add rows to the summary
                    v = {**v, "summary": {**data[k].get("summary", {}), **v.get("summary", {})}}
                if isinstance(v, dict) and isinstance(data.get(k), dict):
                    data[k].update(v)
                else:
                    data[k] = v
    out = []
    keys = sorted({k for t in ("passkey", "qa", "loglik", "conversation") for k in data.get(t, {}) if "/" in k},
                  key=lambda k: (k != "full/0", k.split("/")[0], int(k.split("/")[1])))
    if "passkey" in data:
        lengths = list(data["passkey"]["full/0"]["by_length"])
        out.append("| policy / budget | " + " | ".join(f"passkey {n}: acc, key log-lik" for n in lengths)
                   + " | QA acc | QA top-1 agr. | log-lik (256 tok) | conv. top-1 agr. |")
        out.append("| --- " * (len(lengths) + 5) + "|")
        for k in keys:
            cells = []
            for n in lengths:
                v = data["passkey"].get(k, {}).get("by_length", {}).get(n)
                cells.append(f"{100 * v['accuracy']:.0f}%, {v['key_logprob']:.2f}" if v else "")
            qa = data.get("qa", {}).get(k)
            ll = data.get("loglik", {}).get(k)
            cv = data.get("conversation", {}).get(k)
            cells += [f"{100 * qa['accuracy']:.1f}%" if qa else "", f"{100 * qa['top1_agreement']:.1f}%" if qa else "",
                      f"{ll['mean_logprob']:.3f}" if ll else "",
                      f"{100 * cv['top1_agreement']:.1f}%" if cv and "top1_agreement" in cv else ""]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
    if "speed" in data:
        out.append("")
        out.append("| policy / budget | decode tok/s, 16 x 7k contexts | median step | x full KV (same engine) |")
        out.append("| --- | --- | --- | --- |")
        for k, v in data["speed"].items():
            sp = v.get("speedup_vs_full")
            out.append(f"| {k} | {v['tok_s']:.1f} | {v['median_step_ms']:.0f} ms | {f'{sp:.2f}x' if sp else ''} |")
    if "capacity" in data:
        out.append("")
        gib = next(iter(data["capacity"].values()))["pool_gib"]
        out.append(f"| budget | concurrent 7k-token requests decoding in a {gib:.2f} GiB pool | block arithmetic |")
        out.append("| --- | --- | --- |")
        for k, v in data["capacity"].items():
            out.append(f"| {'full KV' if k == '0' else k} | {v['max_concurrent_decoding']} | {v['predicted']} |")
    if "kvpress" in data:
        out.append("")
        out.append("| policy / budget / length | kvpress acc, key log-lik | kvserve acc, key log-lik |")
        out.append("| --- | --- | --- |")
        for k, v in data["kvpress"]["summary"].items():
            policy, budget, n = k.split("/")
            mine = "snapkv" if policy == "snapkv_request" else policy  # kvserve's snapkv is the per-request rule
            ours = data.get("passkey", {}).get(f"{mine}/{budget}", {}).get("by_length", {}).get(n)
            out.append(f"| {k} | {100 * v['accuracy']:.0f}%, {v['key_logprob']:.2f} | "
                       + (f"{100 * ours['accuracy']:.0f}%, {ours['key_logprob']:.2f} |" if ours else " |"))
    if "kept_sets" in data.get("kvpress", {}):
        out.append("")
        out.append("| snapkv budget | Jaccard: kvserve vs kvpress scores summed per request | kvserve vs kvpress per "
                   "head (mean) | needle tokens kept: kvserve / kvpress per request / kvpress per head (mean) | "
                   "heads keeping the whole needle | accuracy: kvserve (this run) |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for budget, v in data["kvpress"]["kept_sets"].items():
            m = v["mean"]
            out.append(f"| {budget} | {m['jaccard_vs_kvpress_per_request']:.3f} | "
                       f"{m['jaccard_vs_kvpress_heads_mean']:.3f} | {100 * m['needle_kept_kvserve']:.0f}% / "
                       f"{100 * m['needle_kept_kvpress_per_request']:.0f}% / "
                       f"{100 * m['needle_kept_kvpress_heads_mean']:.0f}% | "
                       f"{100 * m['needle_kept_kvpress_heads_all']:.0f}% | {100 * m['kvserve_hit']:.0f}% |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="passkey,qa,loglik")
    ap.add_argument("--policies", default=",".join(EVICTION_POLICIES))
    ap.add_argument("--budgets", default="256,512,1024,2048")
    ap.add_argument("--lengths", default="2048,4096,7168")
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--qa-docs", type=int, default=4, help="documents per length (six questions each)")
    ap.add_argument("--qa-doc-tokens", default="4096,7000")
    ap.add_argument("--loglik-tokens", type=int, default=7168)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--speed-requests", type=int, default=16)
    ap.add_argument("--speed-length", type=int, default=7168)
    ap.add_argument("--speed-memory-gb", type=float, default=5.5)
    ap.add_argument("--new-tokens", type=int, default=160,
                    help="speed: output tokens per request; more than the prefill steps, so all 16 decode together")
    ap.add_argument("--capacity-memory-gb", type=float, default=1.0)
    ap.add_argument("--capacity-tokens", type=int, default=256,
                    help="output tokens per request: long enough that the first admitted still decode when the last prefill ends")
    ap.add_argument("--capacity-max-requests", type=int, default=64)
    ap.add_argument("--capacity-budgets", default="1024,2048", help="budgets measured (besides full KV)")
    ap.add_argument("--memory-gb", type=float, default=4.0)
    ap.add_argument("--kvpress-python", default="/work/kvpress-venv/bin/python",
                    help="python of a venv with kvpress (its own transformers pin)")
    ap.add_argument("--kvpress-lengths", default="4096")
    ap.add_argument("--kvpress-budgets", default="256,1024")
    ap.add_argument("--kvpress-policies", default="streaming,snapkv,snapkv_request",
                    help="snapkv_request: kvpress's SnapKV scores summed per request (needs snapkv before it)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-full-passkey", action="store_true",
                    help="no full-KV passkey/loglik runs (their numbers come from another result file)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print markdown tables from result files and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    tasks = args.tasks.split(",")
    policies = [p for p in args.policies.split(",") if p]
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.time()
    log = elapsed_log()

    from kvserve.bench.workloads import load_tokenizer

    tok = load_tokenizer()
    result = {"command": "python -m kvserve.bench.eviction " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:]),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "dtype": args.dtype, "budgets": budgets, "policies": policies}
    if any(t in tasks for t in ("passkey", "qa", "loglik", "conversation")):
        prompts = passkey_prompts(tok, [int(x) for x in args.lengths.split(",")], args.depths, args.seed)
        sizes = [int(x) for x in args.qa_doc_tokens.split(",")]
        docs = [d for i, n in enumerate(sizes) for d in qa_documents(tok, args.qa_docs, n, args.seed + 100 * i)]
        context, target = loglik_text(tok, args.loglik_tokens)
        convs = conversations(tok, args.conversations, args.turns, 3, args.seed + 5)
        ref_ids: dict[str, list] = {"qa": [], "conversation": []}
        for name in tasks:
            if name in ("passkey", "qa", "loglik", "conversation"):
                result[name] = {}
        for policy in ["full"] + policies:  # one engine at a time: each holds its contexts in its prefix cache
            engine, sampler = make_engine(policy, args.memory_gb, args.dtype)
            pb = [0] if policy == "full" else budgets
            if policy == "full" and args.skip_full_passkey:
                pb_passkey = []
            else:
                pb_passkey = pb
            if "passkey" in tasks and pb_passkey:
                result["passkey"].update(task_passkey(policy, engine, sampler, pb, prompts, log))
            if "qa" in tasks:
                questions = [q for d in docs for q in d["questions"]]
                result["qa"].update(task_questions("qa", policy, engine, sampler, pb, questions, ref_ids["qa"], log))
            if "loglik" in tasks and pb_passkey:
                result["loglik"].update(task_loglik(policy, engine, sampler, pb, context, target, log))
            if "conversation" in tasks:
                questions = [q for c in convs for q in c["questions"]]
                result["conversation"].update(task_questions("conv", policy, engine, sampler, pb, questions,
                                                             ref_ids["conversation"], log))
            engine.close()
            del engine, sampler
        if "qa" in tasks:
            result["qa"]["doc_tokens"] = [d["tokens"] for d in docs]
        if "conversation" in tasks:
            result["conversation"]["tokens"] = [c["tokens"] for c in convs]
    if "kvpress" in tasks:
        result["kvpress"] = task_kvpress(args, tok, log)
    if "score_cost" in tasks:
        result["score_cost"] = task_score_cost(log)
    if "speed" in tasks:
        result["speed"] = task_speed(policies, budgets, args, tok, log)
    if "capacity" in tasks:
        result["capacity"] = task_capacity([int(b) for b in args.capacity_budgets.split(",")], args, tok, log)
    result["seconds"] = time.time() - started
    if args.out:
        write_json(args.out, result)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
