"""A model runner without a model: it writes (token, position) into a fake slot store through the block tables and,
when sampling, reads the whole context back through the block table. A wrong block table, a prefix-cache hit on the
wrong block or a block reused while still referenced therefore shows up as a wrong context, not just a wrong count."""

from __future__ import annotations

import hashlib

from kvserve.core.outputs import ModelOutput, SchedulerOutput


def next_token(context: list[int], vocab: int = 1000) -> int:
    digest = hashlib.sha256(str(context).encode()).digest()
    return 3 + int.from_bytes(digest[:4], "little") % (vocab - 3)


class FakeRunner:
    def __init__(self, block_size: int, eos: int | None = None, eos_after: int | None = None):
        self.block_size = block_size
        self.slots: dict[int, tuple[int, int]] = {}
        self.steps: list[SchedulerOutput] = []
        self.eos = eos
        self.eos_after = eos_after

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.steps.append(sched)
        out = ModelOutput()
        bs = self.block_size
        for load in sched.kv_loads:  # fetched "KV" is a list of (token, position) pairs, like the slots
            first = load.fetched.start + load.src_offset
            for i in range(load.num_tokens):
                p = first + i
                slot = load.block_ids[i // bs] * bs + p % bs
                self.slots[slot] = load.fetched.kv[load.src_offset + i]
        for sr in sched.scheduled:
            toks = sr.request.token_ids
            for p in range(sr.start, sr.start + sr.num_new_tokens):
                slot = sr.block_ids[p // bs] * bs + p % bs
                self.slots[slot] = (toks[p], p)
            if sr.sample:
                end = sr.start + sr.num_new_tokens
                context = []
                for p in range(end):
                    tok, pos = self.slots[sr.block_ids[p // bs] * bs + p % bs]
                    assert pos == p, f"{sr.request_id}: slot for position {p} holds position {pos}"
                    context.append(tok)
                assert context == toks[:end], f"{sr.request_id}: KV context differs from the request's tokens"
                tok = next_token(context)
                if self.eos is not None and self.eos_after is not None and \
                        end - sr.request.num_prompt_tokens + 1 >= self.eos_after:
                    tok = self.eos
                out.sampled[sr.request_id] = tok
        return out
