"""A model runner without a model: it writes (token, position) into a fake slot store through the block tables and,
when sampling, reads the whole context back through the block table. A wrong block table, a prefix-cache hit on the
wrong block or a block reused while still referenced therefore shows up as a wrong context, not just a wrong count."""

from __future__ import annotations

import hashlib

from kvserve.core.outputs import KVRerotate, KVSave, KVSwapIn, KVSwapOut, ModelOutput, SchedulerOutput


def next_token(context: list[int], vocab: int = 1000, seed: str = "") -> int:
    digest = hashlib.sha256((seed + str(context)).encode()).digest()
    return 3 + int.from_bytes(digest[:4], "little") % (vocab - 3)


class FakeRunner:
    """`sampling=True`: the next token depends on the sequence (its id seeds it, like a per-sequence sampler seed) as
    well as on the context read back, so n > 1 siblings of one prompt diverge, and a sibling running on another
    sequence's KV produces other tokens. Off, decoding is greedy: equal contexts give equal tokens."""

    def __init__(self, block_size: int, eos: int | None = None, eos_after: int | None = None, store=None,
                 sampling: bool = False, poison_swapped: bool = False):
        self.block_size = block_size
        self.sampling = sampling
        self.store = store  # receives KVSave operations (a test connector with a `chunks` dict)
        self.slots: dict[int, tuple[int, int]] = {}
        self.swap: dict[int, list] = {}  # swap slot -> a block's slot contents (None where never written)
        # overwrite blocks once copied out, so a resume that skipped its copy back reads garbage (only for tests
        # without shared prefixes: a shared block stays in use by others)
        self.poison_swapped = poison_swapped
        self.steps: list[SchedulerOutput] = []
        self.eos = eos
        self.eos_after = eos_after

    def apply_kv_ops(self, ops) -> None:
        """In order, like the real runner: saves copy (token, position) pairs out into `store.chunks`, loads write
        fetched pairs into their blocks."""
        bs = self.block_size
        for op in ops:
            if isinstance(op, KVSwapOut):
                for b, s in zip(op.block_ids, op.slots):
                    self.swap[s] = [self.slots.get(b * bs + i) for i in range(bs)]
                    if self.poison_swapped:
                        for i in range(bs):
                            self.slots[b * bs + i] = (-1, -1)
                continue
            if isinstance(op, KVSwapIn):
                for s, b in zip(op.slots, op.block_ids):
                    for i, v in enumerate(self.swap.pop(s)):
                        if v is not None:
                            self.slots[b * bs + i] = v
                continue
            if isinstance(op, KVRerotate):  # a segment's (token, position) pairs, moved by +delta positions
                moved = [self.slots[s] for s in op.src_slots]
                for d, (tok, pos) in zip(op.dst_slots, moved):
                    self.slots[d] = (tok, pos + op.delta)
                continue
            if isinstance(op, KVSave):
                for h, block_ids in op.chunks:
                    self.store.chunks[h] = [self.slots[b * bs + i] for b in block_ids for i in range(bs)]
                continue
            first = op.fetched.start + op.src_offset
            for i in range(op.num_tokens):
                p = first + i
                self.slots[op.block_ids[i // bs] * bs + p % bs] = op.fetched.kv[op.src_offset + i]

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.steps.append(sched)
        out = ModelOutput()
        bs = self.block_size
        self.apply_kv_ops(sched.kv_ops)
        for sr in sched.scheduled:
            if sr.decode_steps > 1:
                out.sampled[sr.request_id] = self._decode_steps(sr)
                continue
            toks = sr.token_ids  # the request's tokens, then any speculative drafts
            reused = {p for lo, hi in sr.blend_reused for p in range(lo, hi)}
            for i, p in enumerate(range(sr.start, sr.start + sr.num_new_tokens)):
                if p in reused:
                    continue  # as CacheBlend at ratio 0: the re-rotated copy stands (its content is checked below)
                slot = sr.block_ids[p // bs] * bs + p % bs
                self.slots[slot] = (toks[i], p)
            if sr.sample:
                drafts = sr.spec_token_ids
                end = sr.start + sr.num_new_tokens - len(drafts)
                context = []
                for p in range(end):
                    tok, pos = self.slots[sr.block_ids[p // bs] * bs + p % bs]
                    assert pos == p, f"{sr.request_id}: slot for position {p} holds position {pos}"
                    context.append(tok)
                assert context == sr.request.token_ids[:end], \
                    f"{sr.request_id}: KV context differs from the request's tokens"
                # verification as the real sampler does it: a draft is kept while it equals the token sampled at
                # its position (each draft's context includes the drafts before it)
                sampled = []
                for j in range(len(drafts) + 1):
                    tok = next_token(context + drafts[:j], seed=sr.request_id if self.sampling else "")
                    if self.eos is not None and self.eos_after is not None and \
                            end + j - sr.request.num_prompt_tokens + 1 >= self.eos_after:
                        tok = self.eos
                    sampled.append(tok)
                    if j == len(drafts) or tok != drafts[j]:
                        break
                out.sampled[sr.request_id] = sampled
        return out

    def _decode_steps(self, sr) -> list[int]:
        """decode_steps greedy steps as the real runner takes them: step j writes its input token (the request's last,
        then each token sampled before it) at position start + j and reads the whole context back."""
        bs = self.block_size
        assert not self.sampling and self.eos is None and sr.num_new_tokens == sr.decode_steps and sr.sample
        known = sr.request.token_ids[:sr.start + 1]
        sampled: list[int] = []
        for j in range(sr.decode_steps):
            p = sr.start + j
            self.slots[sr.block_ids[p // bs] * bs + p % bs] = ((known + sampled)[p], p)
            context = []
            for q in range(p + 1):
                tok, pos = self.slots[sr.block_ids[q // bs] * bs + q % bs]
                assert pos == q, f"{sr.request_id}: slot for position {q} holds position {pos}"
                context.append(tok)
            assert context == known + sampled, f"{sr.request_id}: KV context differs from the request's tokens"
            sampled.append(next_token(context))
        return sampled
