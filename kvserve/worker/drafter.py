"""Model drafters for speculative decoding: a model proposes each request's drafts greedily, at the start of the step
that verifies them (the scheduler has allocated slots for all of them by then).

- layer_skip: the target's own first N layers, its final norm and head (LayerSkip's early exit, untrained). Its KV
  is the target's KV of those layers: exact for every computed token, so drafting starts at the request's last
  token. Draft positions' K/V of the first N layers is written into the target's slots and overwritten by the
  verification pass.
- draft_model: a second model with the same tokenizer and its own KV cache, indexed by the target's block ids
  (same pool layout, so no allocator of its own). It keeps KV for the tokens it has seen; the first draft
  iteration catches up on what it missed (the prompt, a bonus token, a rejected draft's position) as one chunk.

Drafts are argmax tokens: a deterministic proposal, which the sampler's verification keeps lossless for greedy and
sampled requests alike (docs/speculative.md).
"""

from __future__ import annotations

import time

import torch

from kvserve.core.outputs import ScheduledRequest
from kvserve.model.batch import ForwardBatch
from kvserve.model.llama import LlamaModel


class ModelDrafter:
    def __init__(self, model: LlamaModel, kv_layers: list, runner, shares_target_kv: bool):
        """`runner`: a ModelRunner over `model` and `kv_layers`' cache (its batch builder and padding are reused)."""
        self.model = model
        self.kv_layers = kv_layers
        self.runner = runner
        self.shares_target_kv = shares_target_kv
        self.block_size = runner.block_size
        self._seen: dict[str, tuple[int, int]] = {}  # draft_model: request id -> (preemptions, tokens with draft KV)

    def drop(self, request_ids) -> None:
        for rid in request_ids:
            self._seen.pop(rid, None)

    def _first_uncomputed(self, sr: ScheduledRequest) -> int:
        if self.shares_target_kv:
            return sr.start
        preemptions, n = self._seen.get(sr.request_id, (-1, 0))
        if preemptions != sr.request.num_preemptions:
            return 0  # its blocks were freed and refilled: the draft KV in them is not this request's
        return min(n, sr.start)

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledRequest]) -> tuple[int, float, float]:
        """Fill each request's pending drafts in place. Returns (passes, their seconds, all seconds): the passes of
        one token per request are what each further draft costs; a first pass that also caught up on a prompt is
        left out of them (a one-time cost, like the target's own prefill) but not out of all seconds."""
        t0 = time.perf_counter()
        k_of = {id(sr): len(sr.spec_token_ids) for sr in scheduled}
        # iteration 0: every token from the first one without draft KV up to the last real token
        first = [ScheduledRequest(sr.request, c, sr.start + 1 - c, sr.block_ids, True, False)
                 for sr in scheduled for c in [self._first_uncomputed(sr)]]
        batch, ordered, (sample_rows, _) = self.runner.build_batch(first)
        tokens = self._argmax(batch)
        order = {id(s.request): i for i, s in enumerate(ordered)}
        drafts = {id(sr): [tokens[sample_rows[order[id(sr.request)]]]] for sr in scheduled}
        caught_up = any(s.num_new_tokens > 1 for s in first)
        iterations = 0 if caught_up else 1
        t1 = time.perf_counter() if caught_up else t0
        live = [sr for sr in scheduled if k_of[id(sr)] > 1]
        j = 1
        while live:
            batch = self._decode_rows([(drafts[id(sr)][-1], sr.start + j, sr.block_ids) for sr in live])
            tokens = self._argmax(batch)
            for sr, t in zip(live, tokens):
                drafts[id(sr)].append(t)
            iterations += 1
            j += 1
            live = [sr for sr in live if len(drafts[id(sr)]) < k_of[id(sr)]]
        for sr in scheduled:
            sr.spec_token_ids[:] = drafts[id(sr)]
            if not self.shares_target_kv:
                # draft KV now covers the real tokens and the drafts fed back in (positions < start + k); only the
                # accepted ones will hold the request's tokens, which update() tells us through start next time
                self._seen[sr.request_id] = (sr.request.num_preemptions, sr.start + 1)
        end = time.perf_counter()
        return iterations, end - t1, end - t0

    def observe_accepted(self, sr: ScheduledRequest, num_accepted: int) -> None:
        """After verification: draft KV holds accepted drafts fed back in (all but the last drafted one)."""
        if not self.shares_target_kv and sr.request_id in self._seen:
            p, _ = self._seen[sr.request_id]
            k = len(sr.spec_token_ids)
            self._seen[sr.request_id] = (p, sr.start + 1 + min(num_accepted, k - 1))

    def _argmax(self, batch: ForwardBatch) -> list[int]:
        hidden = self.model.forward(batch, self.kv_layers)
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()

    def _decode_rows(self, rows: list[tuple[int, int, list[int]]]) -> ForwardBatch:
        """One decode row per (token, position, block ids), padded to the runner's shape buckets."""
        bs = self.block_size
        ids = [t for t, _, _ in rows]
        positions = [p for _, p, _ in rows]
        slots = [blocks[p // bs] * bs + p % bs for _, p, blocks in rows]
        lens = [p + 1 for p in positions]
        width = -(-max(lens) // bs)
        table = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (_, p, blocks) in enumerate(rows):
            n = -(-(p + 1) // bs)
            table[i, :n] = torch.tensor(blocks[:n])
        pad = self.runner.padded_size(len(ids)) - len(ids)
        scratch = self.runner.kv_cache.scratch_slot
        return ForwardBatch(input_ids=torch.tensor(ids + [0] * pad, dtype=torch.long),
                            positions=torch.tensor(positions + [0] * pad, dtype=torch.long),
                            slot_mapping=torch.tensor(slots + [scratch] * pad, dtype=torch.long),
                            num_decodes=len(rows), decode_block_tables=table,
                            decode_seq_lens=torch.tensor(lens, dtype=torch.int32),
                            logits_indices=torch.arange(len(rows), dtype=torch.long))
