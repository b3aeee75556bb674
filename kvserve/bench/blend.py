"""CacheBlend's quality and speed (a benchmark, not a timed test): `python -m kvserve.bench.blend`.

A fact-QA RAG set generated with a fixed seed (no download): documents of ~512 tokens, each the notes about one
invented person (colour, city, profession, pet, instrument, spread through filler sentences); a question asks one
attribute of one person, whose document sits among distractors in a random order. Every prompt is [system, 4 documents, question] as segments.

- ttft: one request at a time, the time to the first token of the plain prefill of the same token ids (nothing
  cached but the system prompt: no two prompts start with the same document) against blending at each ratio (or
  APE's parallel mode at a temperature and scale: "ape:T:S") with all documents cached (LLM.precompute_segments);
  medians.
- quality: the same questions at each ratio and as the plain prefill (the reference): answer accuracy (the value in
  the answer), paired differences with 95% bootstrap intervals, agreement of the first 32 greedy tokens with the
  plain prefill's (all 32 equal; the common prefix's length), and the KL of the first token's distribution from the
  plain prefill's, over the plain prefill's top 20 tokens (a token missing from the blend's top 20 is given the
  blend's 20th logprob, so the figure is a lower bound).
- teacher-forced (with quality): at every position of the plain prefill's 32-token greedy answer, the setting's top-1
  token given the plain prefill's answer before it (the bar's measure where accuracy is too low to compare), and the
  KL at each position as above. Free-running agrees with teacher forcing up to its first different token; from
  there a new request carries the plain prefill's answer so far as part of the question segment, until every
  position is covered. Reported over all 32 positions (ignore_eos) and over the answer alone (up to its first
  end-of-sequence token).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

SYSTEM = ("<|im_start|>system\nYou answer questions using the documents the user gives. Answer with the value "
          "only.<|im_end|>\n<|im_start|>user\n")
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "mar", "bo", "li", "un", "tes", "ra",
             "no", "pe", "gri", "zu", "ha", "qui", "el", "os"]
ATTRIBUTES = {
    "favorite color": ["teal", "crimson", "amber", "violet", "olive", "silver", "indigo", "coral", "ochre", "jade"],
    "home city": ["Orvane", "Pelmar", "Quistor", "Dunvell", "Harrowgate", "Selbrook", "Tamsin", "Varga", "Elloran",
                  "Brisk"],
    "profession": ["baker", "glassblower", "surveyor", "librarian", "ferryman", "welder", "botanist", "tailor",
                   "cartographer", "beekeeper"],
    "pet": ["ferret", "parrot", "tortoise", "goat", "hamster", "iguana", "rabbit", "owl", "gecko", "pony"],
    "instrument": ["cello", "oboe", "banjo", "harp", "trumpet", "accordion", "flute", "sitar", "drums", "viola"],
}
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)


def setting_label(text: str) -> str:
    """A setting of --ratios: a CacheBlend ratio ("0.15") or APE's parallel mode ("ape:T:S")."""
    if text.startswith("ape:"):
        _, t, s = text.split(":")
        return f"ape:{float(t)}:{float(s)}"
    return str(float(text))


def reuse_fields(label: str) -> dict:
    """The prompt fields of a setting."""
    if label.startswith("ape:"):
        _, t, s = label.split(":")
        return {"kv_reuse": "parallel", "ape_temperature": float(t), "ape_scale": float(s)}
    return {"blend_recompute_ratio": float(label)}


def _name(rng: random.Random, used: set) -> str:
    while True:
        n = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize() + " " + \
            (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
        if n not in used:
            used.add(n)
            return n


def make_documents(tokenizer, num_docs: int, doc_tokens: int, seed: int) -> list[tuple[str, dict]]:
    """(text, {person: {attribute: value}}) per document: notes about one invented person, the five facts spread
    through filler sentences, just under `doc_tokens` tokens."""
    from kvserve.bench.workloads import sentence

    rng = random.Random(seed)
    used: set = set()
    docs = []

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    for d in range(num_docs):
        person = _name(rng, used)
        attrs = {a: rng.choice(v) for a, v in ATTRIBUTES.items()}
        facts = [f"The {a} of {person} is {v}." for a, v in attrs.items()]
        header = f"Document {d + 1}: notes about {person}.\n"
        filler: list[str] = []
        while count(header + " ".join(facts + filler)) < doc_tokens:
            filler.append(sentence(rng))
        while filler and count(header + " ".join(facts + filler) + "\n\n") > doc_tokens:
            filler.pop()
        body = list(filler)
        for f in facts:
            body.insert(rng.randrange(len(body) + 1), f)
        docs.append((header + " ".join(body) + "\n\n", {person: attrs}))
    return docs


def make_questions(docs, num: int, docs_per_prompt: int, seed: int, distinct_first: bool = False) -> list[dict]:
    """`distinct_first`: no two prompts start with the same document (so none reuses another's blocks by prefix)."""
    rng = random.Random(seed)
    out = []
    firsts: set = set()
    while len(out) < num:
        target = rng.randrange(len(docs))
        others = rng.sample([i for i in range(len(docs)) if i != target], docs_per_prompt - 1)
        order = others + [target]
        rng.shuffle(order)
        if distinct_first and order[0] in firsts:
            continue
        firsts.add(order[0])
        person = rng.choice(sorted(docs[target][1]))
        attr = rng.choice(sorted(ATTRIBUTES))
        q = (f"Question: What is the {attr} of {person}?<|im_end|>\n<|im_start|>assistant\n")
        out.append({"docs": order, "question": q, "answer": docs[target][1][person][attr]})
    return out


def segments(docs, q: dict) -> list[str]:
    return [SYSTEM, *(docs[i][0] for i in q["docs"]), q["question"]]


def precompute(llm, docs) -> int:
    prefix = SYSTEM if llm.engine.info.blend_segment_context == "prefix" else None
    return llm.precompute_segments([d for d, _ in docs], prefix=prefix)


def bootstrap_ci(diffs: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds)]


def _kl_top20(p: dict, q: dict) -> float:
    floor = min(lp.logprob for lp in q.values())
    return sum(math.exp(lp.logprob) * (lp.logprob - (q[t].logprob if t in q else floor)) for t, lp in p.items())


def first_token_kl(ref, out) -> float:
    """KL(plain || blend) of the first token over the plain prefill's top 20 (see the module docstring)."""
    return _kl_top20(ref.outputs[0].logprobs[0], out.outputs[0].logprobs[0])


def teacher_forced(llm, docs, questions, ref, first, fields: dict, eos: int) -> dict:
    """Top-1 agreement and KL with the plain prefill at every position of its greedy answer, each position given
    the plain prefill's answer before it (the module docstring says how)."""
    from kvserve.sampling import SamplingParams

    tokenizer = llm.engine.tokenizer
    answers = [list(r.outputs[0].token_ids) for r in ref]
    top1: list[list] = [[None] * len(a) for a in answers]
    kl: list[list] = [[None] * len(a) for a in answers]

    def absorb(i: int, start: int, out) -> int | None:
        """Record out's tokens from `start`; the next position to ask from, or None when all are covered."""
        for j, (t, lps) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            pos = start + j
            if pos >= len(answers[i]):
                return None
            top1[i][pos] = t
            kl[i][pos] = _kl_top20(ref[i].outputs[0].logprobs[pos], lps)
            if t != answers[i][pos]:
                return pos + 1 if pos + 1 < len(answers[i]) else None
        return None

    pending = {i: n for i, out in enumerate(first) if (n := absorb(i, 0, out)) is not None}
    requests = len(first)
    question_ids: dict[int, list[int]] = {}  # the question segment's token ids, tokenized once per question
    while pending:
        items = sorted(pending.items())
        prompts, params = [], []
        for i, k in items:
            segs = segments(docs, questions[i])
            if i not in question_ids:
                ids, starts = tokenizer.encode_segments(segs)
                question_ids[i] = ids[starts[-1]:]
            prompts.append({"prompt_segments": [*segs[:-1], question_ids[i] + answers[i][:k]], **fields})
            params.append(SamplingParams(temperature=0, max_tokens=len(answers[i]) - k, logprobs=20, ignore_eos=True))
        outs = llm.generate(prompts, params, use_tqdm=False)
        requests += len(outs)
        pending = {i: n for (i, k), out in zip(items, outs) if (n := absorb(i, k, out)) is not None}

    def summary(limit) -> dict:
        agree, kls = [], []
        for i, a in enumerate(answers):
            n = limit(a)
            agree += [int(top1[i][p] == a[p]) for p in range(n)]
            kls += kl[i][:n]
        return {"positions": len(agree), "top1_agreement": sum(agree) / len(agree), "kl_mean": statistics.mean(kls),
                "kl_p99": sorted(kls)[int(0.99 * (len(kls) - 1))]}

    per_question = [sum(int(top1[i][p] == a[p]) for p in range(len(a))) / len(a) for i, a in enumerate(answers)]
    return {"all": summary(len), "answer": summary(lambda a: a.index(eos) + 1 if eos in a else len(a)),
            "per_question": per_question, "requests": requests}


def run_ttft(llm, docs, questions, ratios, log) -> dict:
    from kvserve.sampling import SamplingParams

    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=1)
    results = {}

    def one(prompt) -> float:
        out = llm.generate(prompt, sp, use_tqdm=False)[0]
        return out.metrics.first_token_time - out.metrics.arrival_time

    for label in ["full", *ratios]:
        assert engine.reset_prefix_cache()
        if label != "full":  # (in prefix mode the cache entries are exact [system, document] prompts, which the
            precompute(llm, docs)  # plain prefill would find for its first document)
        warm = questions[-1]
        prompts = []
        for q in questions[:-1]:
            segs = segments(docs, q)
            if label == "full":
                ids, _ = engine.tokenizer.encode_segments(segs)
                prompts.append({"prompt_token_ids": ids})
            else:
                prompts.append({"prompt_segments": segs, **reuse_fields(label)})
        one({"prompt_token_ids": engine.tokenizer.encode_segments(segments(docs, warm))[0]} if label == "full"
            else {"prompt_segments": segments(docs, warm), **reuse_fields(label)})  # shapes warm
        times = [one(p) for p in prompts]
        results[label] = {"ttft_median_s": statistics.median(times), "ttft_s": times}
        log(f"ttft {label:>5}: median {1e3 * statistics.median(times):.0f} ms over {len(times)}")
    full = results["full"]["ttft_median_s"]
    for r in ratios:
        results[r]["speedup_vs_full"] = full / results[r]["ttft_median_s"]
    return results


def run_quality(llm, docs, questions, ratios, max_tokens: int, log, save=lambda results: None) -> dict:
    from kvserve.sampling import SamplingParams

    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=20, ignore_eos=True)
    assert engine.reset_prefix_cache()
    started = time.perf_counter()
    prompts = [{"prompt_token_ids": engine.tokenizer.encode_segments(segments(docs, q))[0]} for q in questions]
    ref = llm.generate(prompts, sp, use_tqdm=False)
    log(f"quality full: {time.perf_counter() - started:.0f} s")
    correct_full = [int(q["answer"].lower() in o.outputs[0].text.lower()) for q, o in zip(questions, ref)]
    results = {"full": {"accuracy": sum(correct_full) / len(questions), "correct": correct_full}}
    for r in ratios:
        assert engine.reset_prefix_cache()
        started = time.perf_counter()
        precompute(llm, docs)
        outs = llm.generate([{"prompt_segments": segments(docs, q), **reuse_fields(r)} for q in questions],
                            sp, use_tqdm=False)
        correct = [int(q["answer"].lower() in o.outputs[0].text.lower()) for q, o in zip(questions, outs)]
        agree_all, prefix, kls = [], [], []
        for a, b in zip(ref, outs):
            ta, tb = a.outputs[0].token_ids[:32], b.outputs[0].token_ids[:32]
            n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            prefix.append(n)
            agree_all.append(int(n == len(ta)))
            kls.append(first_token_kl(a, b))
        tf = teacher_forced(llm, docs, questions, ref, outs, reuse_fields(r), engine.tokenizer.eos_token_id)
        diffs = [c - f for c, f in zip(correct, correct_full)]
        blended = sum(o.num_blended_tokens for o in outs)
        results[r] = {
            "accuracy": sum(correct) / len(questions), "correct": correct,
            "accuracy_minus_full": sum(diffs) / len(diffs), "accuracy_minus_full_ci95": bootstrap_ci(diffs),
            "greedy32_all_equal": sum(agree_all) / len(agree_all), "greedy32_common_prefix_mean": statistics.mean(prefix),
            "first_token_kl_mean": statistics.mean(kls), "first_token_kl_median": statistics.median(kls),
            "blended_tokens": blended, "recomputed_tokens": sum(o.num_recomputed_tokens for o in outs),
            "teacher_forced": tf, "seconds": time.perf_counter() - started}
        save(results)
        log(f"quality {r:>5}: acc {results[r]['accuracy']:.3f} (full {results['full']['accuracy']:.3f}), "
            f"32 equal {results[r]['greedy32_all_equal']:.3f}, KL {results[r]['first_token_kl_mean']:.4f}, "
            f"recomputed {results[r]['recomputed_tokens']}/{blended}; teacher-forced top-1 "
            f"{tf['all']['top1_agreement']:.3f} (answer only {tf['answer']['top1_agreement']:.3f}), "
            f"KL {tf['all']['kl_mean']:.4f}, {tf['requests']} requests")
    zero = results.get("0.0")
    if zero is not None:
        for r in ratios:
            d = [a - b for a, b in zip(results[r]["correct"], zero["correct"])]
            results[r]["accuracy_minus_ratio0"] = sum(d) / len(d)
            results[r]["accuracy_minus_ratio0_ci95"] = bootstrap_ci(d)
            tz, tr = zero["teacher_forced"]["per_question"], results[r]["teacher_forced"]["per_question"]
            td = [a - b for a, b in zip(tr, tz)]
            results[r]["teacher_forced"]["minus_ratio0"] = sum(td) / len(td)
            results[r]["teacher_forced"]["minus_ratio0_ci95"] = bootstrap_ci(td)
    return results


def _teacher_forced_cells(tf: dict | None) -> str:
    if tf is None:  # results from before the measurement existed
        return " | | "
    ci = tf.get("minus_ratio0_ci95")
    diff = f" ({100 * ci[0]:+.1f}, {100 * ci[1]:+.1f})" if ci else ""
    return (f"{tf['all']['top1_agreement']:.1%}{diff} | {tf['answer']['top1_agreement']:.1%} | "
            f"{tf['all']['kl_mean']:.4f}")


def report(paths: list[str]) -> str:
    lines = []
    for path in paths:
        data = json.load(open(path))
        if "ttft" in data:
            t = data["ttft"]
            lines += [f"TTFT ({path}): " + ", ".join(
                f"{k} {1e3 * v['ttft_median_s']:.0f} ms" + (f" ({v['speedup_vs_full']:.2f}x)" if "speedup_vs_full" in v
                                                             else "") for k, v in t.items())]
        if "quality" in data:
            q = data["quality"]
            lines += ["", "| ratio | accuracy | minus full (95% CI) | minus ratio 0 (95% CI) | 32 tokens equal | "
                          "common prefix | first-token KL (mean) | recomputed / reused | teacher-forced top-1, 32 positions (minus "
                          "ratio 0, 95% CI) | answer only | KL (mean, 32 positions) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                      f"| full prefill | {q['full']['accuracy']:.1%} | | | 100% | 32 | 0 | | 100% | 100% | 0 |"]
            for k, v in q.items():
                if k == "full":
                    continue
                lo, hi = v["accuracy_minus_full_ci95"]
                z = v.get("accuracy_minus_ratio0")
                zci = v.get("accuracy_minus_ratio0_ci95", (0, 0))
                lines.append(f"| {k} | {v['accuracy']:.1%} | {100 * v['accuracy_minus_full']:+.1f} "
                             f"({100 * lo:+.1f}, {100 * hi:+.1f}) | "
                             + (f"{100 * z:+.1f} ({100 * zci[0]:+.1f}, {100 * zci[1]:+.1f})" if z is not None else "")
                             + f" | {v['greedy32_all_equal']:.1%} | {v['greedy32_common_prefix_mean']:.1f} | "
                             f"{v['first_token_kl_mean']:.4f} | {v['recomputed_tokens']} / {v['blended_tokens']} | "
                             + _teacher_forced_cells(v.get("teacher_forced")) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="ttft,quality")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)),
                    help='CacheBlend ratios and APE settings ("ape:TEMPERATURE:SCALE", kv_reuse parallel)')
    ap.add_argument("--num-docs", type=int, default=100)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--docs-per-prompt", type=int, default=4)
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--ttft-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segment-context", choices=("prefix", "none"), default="prefix",
                    help="what the cached documents' KV was computed after (blend_segment_context)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", metavar="JSON")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    from kvserve.engine.llm_engine import LLM

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    llm = LLM(dtype=args.dtype, num_threads=args.num_threads, kv_cache_memory_gb=args.kv_cache_memory_gb,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              batch_reorder=False, blend_segment_context=args.segment_context)
    docs = make_documents(llm.engine.tokenizer, args.num_docs, args.doc_tokens, args.seed)
    ratios = [setting_label(r) for r in args.ratios.split(",")]
    tasks = args.tasks.split(",")
    result = {"args": vars(args)}
    lengths = [len(llm.engine.tokenizer.encode(d, add_special_tokens=False)) for d, _ in docs]
    log(f"{len(docs)} documents, {min(lengths)}-{max(lengths)} tokens")
    if "ttft" in tasks:
        qs = make_questions(docs, args.ttft_prompts + 1, args.docs_per_prompt, args.seed + 1, distinct_first=True)
        result["ttft"] = run_ttft(llm, docs, qs, ratios, log)
    if "quality" in tasks:
        qs = make_questions(docs, args.questions, args.docs_per_prompt, args.seed + 2)
        def save(partial):  # after every ratio, so a stopped run keeps what it measured
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({**result, "quality": partial}, f, indent=1)

        result["quality"] = run_quality(llm, docs, qs, ratios, args.max_tokens, log, save)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(report([args.out]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
