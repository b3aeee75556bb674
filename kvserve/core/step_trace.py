"""What one engine step is made of, in the goodput planner's cost terms (kvserve bench plan), and an optional trace
of a served engine's steps (`kvserve serve --step-trace PATH`) that the planner fits its step-cost model to.

Pure Python, no torch: the features come from a SchedulerOutput alone.
"""

from __future__ import annotations

import json

# a step's features: a constant, tokens through the GEMMs, decoding sequences, decode context read (thousands of
# tokens) and prefill attention work (millions of token pairs)
BASE = ("step", "gemm_tokens", "decode_seqs", "decode_context_k", "prefill_attention_m")


def step_features(so, loaded: frozenset[str] = frozenset()) -> tuple[list[float], int]:
    """(features, prompt tokens whose KV is loaded rather than computed) of one SchedulerOutput. A request in
    `loaded` (a decode instance of a P/D pair) costs its prompt as a transfer, not as compute."""
    prefill = decode = rows = 0
    ctx = att = 0.0
    moved = 0
    for s in so.scheduled:
        n = s.num_new_tokens
        if s.request.request_id in loaded and s.start < s.request.num_prompt_tokens:
            prompt_part = min(n, s.request.num_prompt_tokens - s.start)
            moved += prompt_part
            n -= prompt_part
            if n <= 0:
                if s.sample:  # the loaded prompt's last position still samples: a decode row's work
                    decode += 1
                    ctx += s.start + prompt_part
                continue
        if n <= 1 + len(s.spec_token_ids):
            decode += 1
            ctx += s.start + n
            rows += n
        else:
            prefill += n
            att += n * (s.start + n / 2)
    # a step with a prefill chunk runs every token through the GEMMs; a decode-only step uses the small-batch kernels
    # (weights read once: the constant), so its rows cost only their per-sequence term
    gemm = prefill + rows if prefill else 0
    return [1.0, float(gemm), float(decode), ctx / 1e3, att / 1e6], moved


class StepTrace:
    """Appends one JSON line per busy step: its BASE features and the seconds until the next step began (the engine
    loop's whole cycle under serving: schedule, forward, sampling, update, the core's messaging). A step after
    which the engine went idle has no next step to measure against and is not written."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # a line per step, written at once
        self._pending: tuple[list[float], float] | None = None

    def step_started(self, now: float) -> None:
        if self._pending is not None:
            features, started = self._pending
            self._file.write(json.dumps({"base": features, "cycle_s": round(now - started, 6)}) + "\n")
            self._pending = None

    def step_done(self, so, started: float, busy: bool) -> None:
        """`busy`: requests remain, so the next step follows at once and closes this one's cycle."""
        self._pending = (step_features(so)[0], started) if so.scheduled and busy else None

    def idle(self) -> None:
        self._pending = None

    def close(self) -> None:
        self._file.close()
