"""Serving workloads, generated from a seed with nothing downloaded; the served model's tokenizer measures lengths.

Every generator takes (tokenizer, num_requests, seed, **params) and returns a list of BenchRequest, the same list for
the same arguments (all randomness comes from random.Random seeded from `seed`). Text is English-like: sentences
assembled from fixed word lists, cut to the exact token count the workload drew. Requests carry chat `messages`;
the completions endpoint sends their contents joined by blank lines.

Workloads and their parameters (`-W key=value` on the command line; defaults in brackets):

- sharegpt-like: independent requests; prompt lengths log-normal around `input_median` [256] (sigma
  `input_sigma` [1.0]) in [`min_input` 32, `max_input` 2048], output lengths log-normal around `output_median` [128]
  (sigma [0.9]) in [`min_output` 16, `max_output` 512]: a long tail like ShareGPT's. [1000 requests]
- shared-prefix: many users, `num_prefixes` [4] system prompts of `prefix_len` [1024] tokens; each request picks one
  at random and adds its own question of `question_min`..`question_max` [32..128] tokens; outputs
  `output_min`..`output_max` [32..128]. [400 requests]
- multi-turn: conversations of `turns_min`..`turns_max` [2..8] turns; a `system_len` [64]-token system prompt, user
  turns of `user_min`..`user_max` [32..256] tokens, answers of `output_min`..`output_max` [32..128] tokens. Turn k is
  sent only after turn k-1 finished, with the whole history (the real answers included) resent; `num_systems` [0]:
  conversations share that many system prompts (0: each its own); `think_time` [0]
  seconds between a turn's answer and the next turn (drawn uniformly up to `think_time_max` when that is larger:
  an agent's tool calls). The request rate applies to first turns. `num_requests` counts
  turns: conversations are drawn until they add up to it. [200 turns]
- rag: `num_docs` [16] shared documents of `doc_len` [512] tokens; each request asks a `question_min`..
  `question_max` [16..64]-token question over `k` [4] of them, in random order, after a short fixed instruction:
  documents are reused at varying positions (non-prefix reuse). Outputs `output_min`..`output_max` [32..128]. [200]
- stall: `num_streams` [8] decoding streams (prompt `stream_prompt` [64], output `stream_output` [1024] tokens) start
  at once; `num_long` [6] prompts of `long_prompt` [4096] tokens (output `long_output` [16]) arrive at
  `first_long_at` [3] s and then every `long_interval` [4] s. Fixed arrival times (the request rate is ignored);
  groups "stream" and "long-prompt" are summarized apart: the streams' p99 / max ITL is the decode stall.
- repetitive: outputs that repeat their input (speculative decoding's case), in turn: a `block_min`..`block_max`
  [300..600]-token Python block to rewrite with a rename, a JSON config to rewrite with one change, a passage to
  repeat, an agent's second tool call whose report repeats the tool output (its history holds the first call and
  report); max_tokens = block + `extra_output` [64]. [32]
- trace: replays `path` (JSONL, one request per line: `timestamp`, `input_length`, `output_length`, optional
  `hash_ids`, optional `prompt` text or `messages`). Timestamps are in `time_unit` [ms] (Mooncake's format) or s,
  shifted to start at 0 and multiplied by `time_scale` [1.0]. Requests sharing a hash id share that
  `block_size` [512]-token block of text (prefix reuse as in the trace); without hash ids each prompt is fresh text.
  `num_requests` keeps the first N lines.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass
class BenchRequest:
    request_id: str
    messages: list[dict]  # for multi-turn: this turn's new messages only; the history is added at run time
    max_tokens: int
    content_tokens: int  # tokens of the message contents (no chat template), measured with the tokenizer
    arrival: float | None = None  # seconds after the start; None: the runner draws arrivals from the request rate
    conversation: int | None = None
    turn: int | None = None
    group: str | None = None
    think_time: float = 0.0  # multi-turn: pause after the previous turn's answer
    # the completions prompt as segments (rag: instruction, each document, the question), joined = prompt_text();
    # sent as prompt_segments with `kvserve bench serve --prompt-segments` (CacheBlend, docs/kvreuse.md)
    segments: list[str] | None = None

    def prompt_text(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages)

    def to_dict(self) -> dict:
        return asdict(self)


# ================================================================================================== text
SUBJECTS = ["the harbour master", "a young engineer", "the old librarian", "a retired sailor", "the baker",
            "a visiting scientist", "the mayor", "a group of students", "the night nurse", "a ferry captain",
            "the museum guide", "a quiet farmer", "the station manager", "a travelling musician", "the gardener",
            "an accountant from the city", "the lighthouse keeper", "a curious child", "the chef", "a tired pilot"]
VERBS = ["repaired", "described", "questioned", "painted", "measured", "ignored", "rebuilt", "discovered",
         "explained", "followed", "carried", "studied", "replaced", "borrowed", "defended", "remembered", "tested",
         "photographed", "counted", "admired"]
ADJECTIVES = ["narrow", "ancient", "bright", "careful", "heavy", "quiet", "broken", "golden", "strange", "patient",
              "crowded", "forgotten", "modest", "elegant", "rusty", "generous", "distant", "fragile", "busy", "calm"]
NOUNS = ["bridge", "engine", "map", "letter", "lantern", "crane", "garden", "clock", "notebook", "market",
         "telescope", "boat", "library", "tower", "recipe", "pump", "railway", "orchard", "harbour", "theory"]
PLACES = ["harbour", "old town", "reading room", "square", "workshop", "valley", "station", "market hall",
          "lighthouse", "kitchen", "north pier", "museum", "school", "hill road", "boatyard"]
TIMES = ["Early in the morning", "Late that evening", "During the winter", "Every spring", "After the storm",
         "Before the ferry left", "On a rainy Tuesday", "Years later", "By the end of the week", "At noon"]
ADVERBS = ["slowly", "carefully", "suddenly", "quietly", "eagerly", "patiently", "reluctantly", "proudly"]
CONNECTORS = ["because", "although", "while", "so that", "even though", "until", "after", "before"]
TEMPLATES = [
    "{Subj} {verb} the {adj} {noun} near the {place}.",
    "{time}, {subj} {verb} a {adj} {noun} {conn} {subj2} {verb2} the {noun2}.",
    "Nobody in the {place} had {verb} the {noun} so {adv} before.",
    "{Subj} said that the {noun} was {adj} and that the {noun2} looked {adj2}.",
    "In the {place}, {subj} {adv} {verb} every {noun} {conn} the {adj} {noun2} was {verb2}.",
    "The {adj} {noun} in the {place} was {verb} twice, and each time {subj} wrote it down.",
    "{time}, the {noun} and the {noun2} were {verb} by {subj}.",
    "It was {subj} who first {verb} the {adj} {noun}, {conn} the {place} was still {adj2}.",
]
QUESTIONS = [
    "What happened to the {adj} {noun} in the {place}?",
    "Can you explain why {subj} {verb} the {noun}?",
    "Summarize what {subj} did near the {place}, in a few sentences.",
    "Write a short story about a {adj} {noun} and {subj}.",
    "Which details about the {noun} and the {noun2} matter most, and why?",
    "How would {subj} describe the {adj} {noun} to a visitor?",
    "List the steps {subj} took to repair the {noun}.",
    "Compare the {noun} with the {noun2} and say which one is more {adj}.",
]


def _fill(rng: random.Random, template: str) -> str:
    subj = rng.choice(SUBJECTS)
    words = dict(subj=subj, Subj=subj[0].upper() + subj[1:], subj2=rng.choice(SUBJECTS), verb=rng.choice(VERBS),
                 verb2=rng.choice(VERBS), adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES),
                 noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), place=rng.choice(PLACES), time=rng.choice(TIMES),
                 adv=rng.choice(ADVERBS), conn=rng.choice(CONNECTORS))
    return template.format(**words)


def sentence(rng: random.Random) -> str:
    return _fill(rng, rng.choice(TEMPLATES))


def question(rng: random.Random) -> str:
    return _fill(rng, rng.choice(QUESTIONS))


class TextMaker:
    """English-like text of an exact token length under one tokenizer (anything with encode/decode)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def text(self, rng: random.Random, n_tokens: int, opening: str = "") -> str:
        """`opening` followed by sentences, cut to n_tokens tokens (paragraph breaks every few sentences).

        Decoding a cut token list and encoding it again can move a boundary by a token, so the result is checked
        and trimmed until it encodes to at most n_tokens tokens (almost always exactly n_tokens)."""
        if n_tokens <= 0:
            return ""
        parts = [opening] if opening else []
        chars = len(opening)
        while chars < 6 * n_tokens + 16:  # ~4-5 characters a token in English; encode once, extend if short
            s = sentence(rng)
            sep = "\n\n" if parts and rng.random() < 0.15 else " "
            parts.append(sep + s if parts else s)
            chars += len(s) + len(sep)
        text = "".join(parts)
        ids = self.tok.encode(text, add_special_tokens=False)
        while len(ids) < n_tokens:
            text += " " + sentence(rng)
            ids = self.tok.encode(text, add_special_tokens=False)
        cut = n_tokens
        while True:
            text = self.tok.decode(ids[:cut], skip_special_tokens=True)
            if self.count(text) <= n_tokens or cut <= 1:
                return text
            cut -= 1

    def question(self, rng: random.Random, n_tokens: int) -> str:
        """A question followed by background sentences, n_tokens tokens in all."""
        return self.text(rng, n_tokens, opening=question(rng))


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal draw around `median`, redrawn until it falls in [lo, hi] (clipped after 100 tries)."""
    for _ in range(100):
        x = int(round(rng.lognormvariate(math.log(median), sigma)))
        if lo <= x <= hi:
            return x
    return min(hi, max(lo, x))


# ================================================================================================== workloads
def sharegpt_like(tok, num_requests: int | None, seed: int, min_input: int = 32, max_input: int = 2048,
                  min_output: int = 16, max_output: int = 512, input_median: float = 256, input_sigma: float = 1.0,
                  output_median: float = 128, output_sigma: float = 0.9) -> list[BenchRequest]:
    n = 1000 if num_requests is None else num_requests
    rng = random.Random(seed)
    maker = TextMaker(tok)
    out = []
    for i in range(n):
        plen = _lognormal_int(rng, input_median, input_sigma, min_input, max_input)
        olen = _lognormal_int(rng, output_median, output_sigma, min_output, max_output)
        q = question(rng)
        text = maker.text(rng, plen, opening=q)
        out.append(BenchRequest(f"sharegpt-{i}", [{"role": "user", "content": text}], olen, maker.count(text)))
    return out


def shared_prefix(tok, num_requests: int | None, seed: int, num_prefixes: int = 4, prefix_len: int = 1024,
                  question_min: int = 32, question_max: int = 128, output_min: int = 32,
                  output_max: int = 128) -> list[BenchRequest]:
    n = 400 if num_requests is None else num_requests
    rng = random.Random(seed)
    maker = TextMaker(tok)
    systems = [maker.text(rng, prefix_len, opening=f"You are assistant number {p} of the harbour town. "
                                                   "Here is what you know about the town.")
               for p in range(num_prefixes)]
    sys_len = [maker.count(s) for s in systems]
    out = []
    for i in range(n):
        p = rng.randrange(num_prefixes)
        q = maker.question(rng, rng.randint(question_min, question_max))
        out.append(BenchRequest(f"shared-prefix-{i}", [{"role": "system", "content": systems[p]},
                                                       {"role": "user", "content": q}],
                                rng.randint(output_min, output_max), sys_len[p] + maker.count(q), group=None))
    return out


def multi_turn(tok, num_requests: int | None, seed: int, turns_min: int = 2, turns_max: int = 8,
               system_len: int = 64, user_min: int = 32, user_max: int = 256, output_min: int = 32,
               output_max: int = 128, think_time: float = 0.0, think_time_max: float = 0.0,
               num_systems: int = 0) -> list[BenchRequest]:
    n = 200 if num_requests is None else num_requests
    rng = random.Random(seed)
    maker = TextMaker(tok)
    # num_systems > 0: conversations share that many system prompts (drawn from their own generator, so the default
    # workload, one system prompt per conversation, is unchanged)
    srng = random.Random(seed + 1)
    shared = [maker.text(srng, system_len, opening=f"You are guide number {k} to the harbour town.")
              for k in range(num_systems)]
    out: list[BenchRequest] = []
    conv = 0
    while len(out) < n:
        turns = min(rng.randint(turns_min, turns_max), n - len(out))
        system = srng.choice(shared) if shared else \
            maker.text(rng, system_len, opening="You are a helpful guide to the harbour town.")
        for t in range(turns):
            msgs = [{"role": "system", "content": system}] if t == 0 else []
            q = maker.question(rng, rng.randint(user_min, user_max))
            msgs.append({"role": "user", "content": q})
            out.append(BenchRequest(f"conv-{conv}-turn-{t}", msgs, rng.randint(output_min, output_max),
                                    sum(maker.count(m["content"]) for m in msgs), conversation=conv, turn=t,
                                    think_time=0.0 if not t else think_time if think_time_max <= think_time
                                    else rng.uniform(think_time, think_time_max)))
        conv += 1
    return out


RAG_INSTRUCTION = "Answer the question using only the documents below. Cite the documents you use."


def rag(tok, num_requests: int | None, seed: int, num_docs: int = 16, doc_len: int = 512, k: int = 4,
        question_min: int = 16, question_max: int = 64, output_min: int = 32,
        output_max: int = 128) -> list[BenchRequest]:
    n = 200 if num_requests is None else num_requests
    if not 1 <= k <= num_docs:
        raise ValueError(f"rag: need 1 <= k <= num_docs, got k={k}, num_docs={num_docs}")
    rng = random.Random(seed)
    maker = TextMaker(tok)
    docs = [maker.text(rng, doc_len, opening=f"Document {d}.") for d in range(num_docs)]
    out = []
    for i in range(n):
        chosen = rng.sample(range(num_docs), k)  # random subset in random order
        q = maker.question(rng, rng.randint(question_min, question_max))
        body = "\n\n".join(docs[d] for d in chosen) + "\n\nQuestion: " + q
        msgs = [{"role": "system", "content": RAG_INSTRUCTION}, {"role": "user", "content": body}]
        segments = [RAG_INSTRUCTION + "\n\n", *(docs[d] + "\n\n" for d in chosen), "Question: " + q]
        out.append(BenchRequest(f"rag-{i}", msgs, rng.randint(output_min, output_max),
                                sum(maker.count(m["content"]) for m in msgs), group=None, segments=segments))
    return out


def stall(tok, num_requests: int | None, seed: int, num_streams: int = 8, stream_prompt: int = 64,
          stream_output: int = 1024, num_long: int = 6, long_prompt: int = 4096, long_output: int = 16,
          first_long_at: float = 3.0, long_interval: float = 4.0) -> list[BenchRequest]:
    del num_requests  # fixed by the parameters
    rng = random.Random(seed)
    maker = TextMaker(tok)
    out = []
    for i in range(num_streams):
        text = maker.text(rng, stream_prompt, opening=question(rng))
        out.append(BenchRequest(f"stream-{i}", [{"role": "user", "content": text}], stream_output,
                                maker.count(text), arrival=0.0, group="stream"))
    for j in range(num_long):
        text = maker.text(rng, long_prompt, opening=f"Read this report and summarize it. {question(rng)}")
        out.append(BenchRequest(f"long-{j}", [{"role": "user", "content": text}], long_output, maker.count(text),
                                arrival=first_long_at + j * long_interval, group="long-prompt"))
    return out


def trace(tok, num_requests: int | None, seed: int, path: str = "", time_unit: str = "ms",
          time_scale: float = 1.0, block_size: int = 512) -> list[BenchRequest]:
    if not path:
        raise ValueError("trace: give the JSONL file with -W path=FILE")
    if time_unit not in ("ms", "s"):
        raise ValueError("trace: time_unit is ms or s")
    rows = []
    with open(os.path.expanduser(path)) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"trace {path}:{ln}: not JSON: {e}") from None
            if "timestamp" not in row or "output_length" not in row or not (
                    "input_length" in row or "prompt" in row or "messages" in row):
                raise ValueError(f"trace {path}:{ln}: needs timestamp, output_length and input_length (or prompt "
                                 "/ messages)")
            rows.append(row)
            if num_requests is not None and len(rows) >= num_requests:
                break
    if not rows:
        raise ValueError(f"trace {path}: no requests")
    unit = 1e-3 if time_unit == "ms" else 1.0
    t0 = min(float(r["timestamp"]) for r in rows)
    maker = TextMaker(tok)
    blocks: dict = {}

    def block(h) -> str:  # the same hash id is the same text in every request
        if h not in blocks:
            blocks[h] = maker.text(random.Random(f"{seed}:{h}"), block_size)
        return blocks[h]

    out = []
    for i, r in enumerate(rows):
        rng = random.Random(f"{seed}:row:{i}")
        if "messages" in r:
            msgs = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        elif "prompt" in r:
            msgs = [{"role": "user", "content": str(r["prompt"])}]
        else:
            n_in = int(r["input_length"])
            hashes = r.get("hash_ids") or []
            if hashes:
                text = "".join(block(h) for h in hashes)
                ids = tok.encode(text, add_special_tokens=False)
                if len(ids) > n_in:
                    text = tok.decode(ids[:n_in], skip_special_tokens=True)
                elif len(ids) < n_in:
                    text += " " + maker.text(rng, n_in - len(ids))
            else:
                text = maker.text(rng, n_in, opening=question(rng))
            msgs = [{"role": "user", "content": text}]
        arrival = (float(r["timestamp"]) - t0) * unit * time_scale
        out.append(BenchRequest(f"trace-{i}", msgs, int(r["output_length"]),
                                sum(maker.count(m["content"]) for m in msgs), arrival=arrival))
    return out


def _code_block(rng: random.Random, n_tokens: int, maker: TextMaker) -> str:
    """Python functions over random names until the block has about n_tokens tokens."""
    names = [rng.choice(NOUNS) + "_" + rng.choice(ADJECTIVES) for _ in range(12)]
    funcs = []
    while maker.count("\n\n".join(funcs)) < n_tokens:
        a, b, c = rng.sample(names, 3)
        op = rng.choice(["+", "-", "*", "//", "%"])
        k = rng.randrange(2, 99)
        funcs.append(f"def {rng.choice(VERBS)}_{a}({a}, {b}):\n"
                     f"    \"\"\"Return the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} of {a} and {b}.\"\"\"\n"
                     f"    {c} = {a} {op} {b}\n"
                     f"    if {c} > {k}:\n        return {c} - {k}\n"
                     f"    return {c} {op} {k}")
    return "\n\n".join(funcs)


def _json_block(rng: random.Random, n_tokens: int, maker: TextMaker) -> list[dict]:
    """Inventory records until their JSON has about n_tokens tokens."""
    rows: list[dict] = []
    while maker.count(json.dumps(rows, indent=1)) < n_tokens:
        rows.append({"id": len(rows) + 1, "name": f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
                     "owner": rng.choice(SUBJECTS), "place": rng.choice(PLACES), "count": rng.randrange(1, 500),
                     "status": rng.choice(["open", "closed", "pending"])})
    return rows


def _config_block(rng: random.Random, n_tokens: int, maker: TextMaker) -> str:
    cfg: dict = {}
    while maker.count(json.dumps(cfg, indent=2)) < n_tokens:
        key = f"{rng.choice(NOUNS)}_{rng.choice(ADJECTIVES)}_{len(cfg)}"
        cfg[key] = rng.choice([rng.randrange(1000), rng.choice(PLACES), True, False])
    return json.dumps(cfg, indent=2)


def repetitive(tok, num_requests: int | None, seed: int, block_min: int = 300, block_max: int = 600,
               extra_output: int = 64) -> list[BenchRequest]:
    """Outputs that repeat their input (speculative decoding's case), in turn: rewrite a Python block with a
    function renamed, rewrite a JSON config with its true values set to false, repeat a passage, and an agent's
    second tool call whose report repeats the new tool output (the history holds the first call and its report).
    Prompts are phrased so that SmolLM2-135M-Instruct does repeat (it answers "return this JSON" with its first
    record only). `block_min`..`block_max` [300..600]-token blocks; max_tokens = block + `extra_output` [64]. [32]"""
    n = 32 if num_requests is None else num_requests
    rng = random.Random(seed)
    maker = TextMaker(tok)
    out = []
    for i in range(n):
        size = rng.randrange(block_min, block_max + 1)
        kind = ("code", "config", "quote", "agent")[i % 4]
        if kind == "code":
            block = _code_block(rng, size, maker)
            old = block.split("(")[0].removeprefix("def ")
            msgs = [{"role": "user", "content": f"Rewrite this Python code, renaming the function {old} to "
                                                f"{old}_v2 and changing nothing else:\n\n{block}"}]
        elif kind == "config":
            block = _config_block(rng, size, maker)
            msgs = [{"role": "user", "content": f"Here is a JSON config:\n```json\n{block}\n```\nRewrite the "
                                                "config with every true value set to false. Output the full config."}]
        elif kind == "quote":
            block = maker.text(rng, size)
            msgs = [{"role": "user", "content": f"{block}\n\nRepeat the text above exactly."}]
        else:
            rows = _json_block(rng, size, maker)
            first = json.dumps(rows, indent=1)
            block = json.dumps([dict(r, count=r["count"] + rng.randrange(-3, 4)) for r in rows], indent=1)
            msgs = [{"role": "system", "content": "You are an inventory agent. Report tool results in full."},
                    {"role": "user", "content": "List the inventory."},
                    {"role": "assistant", "content": "Calling tool inventory.list()"},
                    {"role": "user", "content": f"Tool result:\n{first}"},
                    {"role": "assistant", "content": f"Here is the inventory:\n{first}"},
                    {"role": "user", "content": "List the inventory again."},
                    {"role": "assistant", "content": "Calling tool inventory.list()"},
                    {"role": "user", "content": f"Tool result:\n{block}"}]
        content = sum(maker.count(m["content"]) for m in msgs)
        out.append(BenchRequest(f"repetitive-{kind}-{i}", msgs, maker.count(block) + extra_output, content,
                                group=kind))
    return out


WORKLOADS: dict[str, Callable] = {"repetitive": repetitive, "sharegpt-like": sharegpt_like, "shared-prefix": shared_prefix,
                                  "multi-turn": multi_turn, "rag": rag, "stall": stall, "trace": trace}


def parse_params(name: str, items: list[str]) -> dict:
    """["key=value", ...] -> kwargs of workload `name`, each value converted to its default's type."""
    import inspect

    fn = WORKLOADS[name]
    sig = inspect.signature(fn)
    known = {p: v.default for p, v in sig.parameters.items() if p not in ("tok", "num_requests", "seed")}
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"workload {name}: unknown parameter {item!r}; known: "
                             + ", ".join(f"{k}={v}" for k, v in known.items()))
        default = known[key]
        if isinstance(default, bool):
            out[key] = val.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(val)
        elif isinstance(default, float):
            out[key] = float(val)
        else:
            out[key] = val
    return out


def generate(name: str, tok, num_requests: int | None = None, seed: int = 0, **params) -> list[BenchRequest]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    import inspect

    merged = {p: v.default for p, v in inspect.signature(WORKLOADS[name]).parameters.items()
              if v.default is not inspect.Parameter.empty}
    merged.update(params)
    for key, val in merged.items():  # every x_min / min_x must not exceed its x_max / max_x
        for lo, hi in (("_min", "_max"), ("min_", "max_")):
            other = key.replace(lo, hi) if lo in key else None
            if other and other in merged and isinstance(val, (int, float)) and val > merged[other]:
                raise ValueError(f"workload {name}: {key}={val} is above {other}={merged[other]}")
        if isinstance(val, (int, float)) and not isinstance(val, bool) and val < 0:
            raise ValueError(f"workload {name}: {key}={val} is negative")
    return WORKLOADS[name](tok, num_requests, seed, **params)


def load_tokenizer(path: str | None = None):
    """The tokenizer that measures lengths: an HF directory, a GGUF file, or (None) the embedded default model's.

    Returns an object with encode(text, add_special_tokens), decode(ids, skip_special_tokens) and
    apply_chat_template(messages) -> ids (kvserve.model.tokenizer.Tokenizer)."""
    from kvserve.model.tokenizer import Tokenizer

    if path is None:
        from kvserve.model.loader import default_model_path
        path = default_model_path()
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return Tokenizer((path, None))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return Tokenizer((os.path.dirname(os.path.abspath(path)), os.path.basename(path)))
    raise FileNotFoundError(f"tokenizer: {path} is neither an HF model directory nor a .gguf file")
