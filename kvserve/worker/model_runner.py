"""SchedulerOutput -> ForwardBatch -> model -> sampler -> ModelOutput. Allocates no KV and knows no requests' fate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.core.outputs import (
    DRAFT_PENDING,
    KVCompact,
    KVRerotate,
    KVSwapIn,
    KVSwapOut,
    ModelOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from kvserve.model.batch import ForwardBatch, PrefillSeq
from kvserve.model.blend import BlendChunk
from kvserve.model.layers import GEMV_MAX_TOKENS
from kvserve.model.llama import LlamaModel
from kvserve.worker.eviction import KVEvictor
from kvserve.worker.kv_cache import KVCache
from kvserve.worker.kv_swap import SwapBuffer
from kvserve.worker.kv_transfer import KVTransfer, NullKVTransfer
from kvserve.worker.sampler import Sampler, token_logprobs


def bucket(n: int) -> int:
    """Pad step token counts to a few shapes so oneDNN builds (and caches) few kernels."""
    if n <= 16:
        return 1 << (n - 1).bit_length()  # 1, 2, 4, 8, 16: small decode batches pay for no padding
    if n <= 128:
        return -(-n // 16) * 16
    if n <= 1024:
        return -(-n // 64) * 64
    return -(-n // 256) * 256


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, kv_transfer: KVTransfer | NullKVTransfer | None = None,
                 sampler: Sampler | None = None, pad_shapes: bool = True, swap: SwapBuffer | None = None,
                 drafter=None, evictor: KVEvictor | None = None, blend_check_layer: int = 1):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_transfer = kv_transfer or NullKVTransfer()
        self.swap = swap  # the swap space's memory (swap-or-recompute preemption); None: never swaps
        self.block_size = kv_cache.block_size
        self.sampler = sampler or Sampler()
        self.pad_shapes = pad_shapes
        # speculative verification runs as decode rows (below) only in a step of at most this many tokens, and
        # only for contexts up to decode_rows_max_context (None: any); elsewhere as a prefill chunk. Since the decode
        # kernel reads a sequence's KV once for all its rows (from 1,024 tokens on), rows measure cheaper at every
        # context (docs/benchmarks.md, the step-cost curve), so no context limit by default
        self.max_decode_rows = GEMV_MAX_TOKENS
        self.decode_rows_max_context: int | None = None
        self.drafter = drafter  # kvserve.worker.drafter.ModelDrafter for layer_skip / draft_model; else None
        self.evictor = evictor  # KV eviction's scores and policies; None: no request evicts
        self.blend_check_layer = blend_check_layer  # CacheBlend: where reused tokens' KV deviation is measured

    def padded_size(self, n: int) -> int:
        return bucket(n) if self.pad_shapes else n

    def build_batch(self, scheduled: list[ScheduledRequest]) -> tuple[ForwardBatch, list[int], dict]:
        """Decodes first (one batched attention call), then prefill chunks. Returns the batch, the logits row of
        each request that samples, and the logits rows of prompt positions for prompt-logprob requests."""
        bs = self.block_size
        # A request verifying k speculative drafts runs either as a prefill chunk of 1 + k tokens or as k + 1
        # decode rows over its one block table, row j attending to positions < start + j + 1 (each layer writes
        # every row's K/V before any row attends, so row j sees the drafts before it). Rows keep a small step on the
        # one-call decode path (`DecodePlan`); with more tokens in the step the prefill kernel costs less
        # (docs/benchmarks.md, the step-cost curve).
        rows_ok = sum(s.num_new_tokens for s in scheduled) <= self.max_decode_rows

        def as_decode(s: ScheduledRequest) -> bool:
            if s.start == 0 or s.num_new_tokens != 1 + len(s.spec_token_ids):
                return False
            limit = self.decode_rows_max_context
            return s.num_new_tokens == 1 or (rows_ok and (limit is None or s.kv_start + s.num_new_tokens <= limit))

        decodes = [s for s in scheduled if as_decode(s)]
        prefills = [s for s in scheduled if not as_decode(s)]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_lens: list[int] = []
        decode_tables: list[list[int]] = []
        decode_spans: list = []
        # a token's position feeds RoPE; its KV index (kv_start + j: the same until the request's first eviction)
        # picks its slot and the context it attends to
        for s in decodes:
            toks = s.token_ids
            for j in range(s.num_new_tokens):
                i = s.kv_start + j
                ids.append(toks[j])
                positions.append(s.start + j)
                slots.append(s.block_ids[i // bs] * bs + i % bs)
                decode_lens.append(i + 1)
                decode_tables.append(s.block_ids)
                decode_spans.append(s.key_span)
        num_decode_rows = len(ids)
        seqs = []
        for s in prefills:
            seqs.append(PrefillSeq(len(ids), s.num_new_tokens, s.kv_start,
                                   torch.tensor(s.block_ids[: -(-(s.kv_start + s.num_new_tokens) // bs)]),
                                   s.key_span))
            ids.extend(s.token_ids)
            positions.extend(range(s.start, s.start + s.num_new_tokens))
            kv = range(s.kv_start, s.kv_start + s.num_new_tokens)
            slots.extend(s.block_ids[i // bs] * bs + i % bs for i in kv)
        num_real = len(ids)
        # decode rows alone, up to 8 (or, for an int8/4-bit model, up to its decode plan's rows), run on kvserve's
        # own kernels (gemv, int8/4-bit, the decode plan), which need no shape buckets: padding 5 verification rows
        # to 8 cost as much as 3 more rows, and padded rows would keep a batch of 60 off the plan
        padded = (num_real if not prefills and num_real <= self.model.unpadded_decode_rows
                  else self.padded_size(num_real))
        pad = padded - num_real
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        slots.extend([self.kv_cache.scratch_slot] * pad)

        # logits rows: sampled requests' last token, plus every covered prompt position of prompt-logprob requests
        rows: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: dict[str, tuple[int, int, int]] = {}  # request id -> (first row in logits, count, first pos)
        row_of = {}
        offset = 0
        for s in decodes + prefills:
            row_of[id(s)] = offset
            offset += s.num_new_tokens
        ordered = decodes + prefills
        for s in ordered:
            first = row_of[id(s)]
            if s.prompt_logprobs:
                last_pos = min(s.start + s.num_new_tokens, s.request.num_prompt_tokens - 1)
                count = max(last_pos - s.start, 0)
                if count:
                    prompt_rows[s.request_id] = (len(rows), count, s.start + 1)
                    rows.extend(range(first, first + count))
            if s.sample:  # the last token's row, and one per draft (each verifies the next draft)
                k = len(s.spec_token_ids)
                sample_rows.extend(range(len(rows), len(rows) + k + 1))
                rows.extend(range(first + s.num_new_tokens - 1 - k, first + s.num_new_tokens))

        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            prefills=seqs,
            logits_indices=torch.tensor(rows, dtype=torch.long),
        )
        if seqs:
            batch.prefill_token_starts = torch.tensor([q.token_start for q in seqs], dtype=torch.long)
            batch.prefill_num_tokens = torch.tensor([q.num_tokens for q in seqs], dtype=torch.long)
            batch.prefill_ctx_starts = torch.tensor([q.ctx_start for q in seqs], dtype=torch.long)
            width = max(q.block_ids.numel() for q in seqs)
            batch.prefill_block_tables = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, q in enumerate(seqs):
                batch.prefill_block_tables[i, :q.block_ids.numel()] = q.block_ids
        if decodes:
            max_blocks = -(-max(decode_lens) // bs)
            table = torch.zeros(num_decode_rows, max_blocks, dtype=torch.long)
            for i, (blocks, n) in enumerate(zip(decode_tables, decode_lens)):
                nb = -(-n // bs)
                table[i, :nb] = torch.tensor(blocks[:nb])
            batch.num_decodes = num_decode_rows
            batch.decode_block_tables = table
            batch.decode_seq_lens = torch.tensor(decode_lens, dtype=torch.int32)
            if any(span is not None for span in decode_spans):
                batch.decode_key_spans = decode_spans
        if self.evictor is not None:
            self.evictor.prepare(batch, decodes, prefills, row_of)
        return batch, ordered, (sample_rows, prompt_rows)

    def apply_kv_ops(self, ops) -> None:
        """In list order (a copy out must read blocks before a later op or this step's forward overwrites them)."""
        for op in ops:
            if isinstance(op, (KVSwapOut, KVSwapIn)):
                self.swap.apply(op)
            elif isinstance(op, KVRerotate):
                self.kv_cache.rerotate(op.src_slots, op.dst_slots, op.delta, self.model.rotary)
            elif isinstance(op, KVCompact):
                self.kv_cache.copy_slots(op.src_slots, op.dst_slots)
                if self.evictor is not None:
                    self.evictor.apply(op)
            else:
                self.kv_transfer.apply([op])

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.sampler.drop(sched.finished_ids)
        if self.drafter is not None:
            self.drafter.drop(sched.finished_ids)
        if self.evictor is not None:
            self.evictor.drop(sched.finished_ids)
        self.apply_kv_ops(sched.kv_ops)
        out = ModelOutput()
        if self.swap is not None:
            out.kv_copy_bytes, out.kv_copy_seconds = self.swap.take_measurement()
        if not sched.scheduled:
            return out
        pending = [s for s in sched.scheduled if s.spec_token_ids and s.spec_token_ids[0] == DRAFT_PENDING]
        if pending:
            out.draft_iterations, out.draft_seconds, out.draft_total_seconds = self.drafter.propose(pending)
        if sched.scheduled[0].decode_steps > 1:
            self.run_decode_steps(sched.scheduled, out)
            return out
        main = [s for s in sched.scheduled if not s.blend_reused]
        batch, ordered, sample_rows, prompt_rows, parts = None, [], [], {}, []
        if main:
            batch, ordered, (sample_rows, prompt_rows) = self.build_batch(main)
            parts.append(self.model.forward(batch, self.kv_cache.layers))
        num_rows = parts[0].shape[0] if parts else 0
        for s in sched.scheduled:  # CacheBlend chunks: their own forward each (rows shrink past the check layer)
            if s.blend_reused:
                last, chosen = self.model.forward_blend(self.blend_chunk(s), self.kv_cache.layers,
                                                        self.blend_check_layer)
                out.blend_recomputed[s.request_id] = chosen.numel()
                if s.sample:
                    parts.append(last)
                    sample_rows.append(num_rows)
                    ordered.append(s)
                    num_rows += 1
        if num_rows == 0:
            if batch is not None:
                self._evict(batch, sched, out)  # scores of an observation window spanning chunks
            return out
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
        logits = self.model.compute_logits(hidden)  # (R, vocab) float32
        sampling = [s for s in ordered if s.sample]
        if sampling:
            rows = logits if len(sample_rows) == logits.shape[0] else logits[sample_rows]  # (S + drafts, vocab)
            drafts = [s.spec_token_ids for s in sampling]
            tokens, lps = self.sampler(rows, [s.request for s in sampling], drafts if any(drafts) else None)
            for s, toks, lp in zip(sampling, tokens, lps):
                out.sampled[s.request_id] = toks
                if lp is not None:
                    out.logprobs[s.request_id] = lp
            for s in pending:
                self.drafter.observe_accepted(s, len(out.sampled[s.request_id]) - 1)
        if batch is not None:
            self._evict(batch, sched, out)
        for s in ordered:
            if s.request_id not in prompt_rows:
                continue
            first, count, first_pos = prompt_rows[s.request_id]
            lp = torch.log_softmax(logits[first:first + count], dim=-1)
            targets = torch.tensor(s.request.token_ids[first_pos:first_pos + count], dtype=torch.long)
            out.prompt_logprobs[s.request_id] = (first_pos, token_logprobs(lp, targets,
                                                                           s.request.sampling_params.prompt_logprobs))
        return out

    def run_decode_steps(self, scheduled: list[ScheduledRequest], out: ModelOutput) -> None:
        """k greedy decode steps of every scheduled request (the scheduler's decode_steps), each step's argmax the
        next one's input: one batch layout for all k, no sampling pass, scheduler round or output between them."""
        k = scheduled[0].decode_steps
        if any(s.decode_steps != k or s.num_new_tokens != k or s.spec_token_ids or s.blend_reused
               for s in scheduled):
            raise ValueError("decode steps run only as plain decodes of one step count for the whole batch")
        bs = self.block_size
        b = len(scheduled)
        kv0 = torch.tensor([s.kv_start for s in scheduled])
        pos0 = torch.tensor([s.start for s in scheduled])
        width = -(-(max(s.kv_start for s in scheduled) + k) // bs)
        table = torch.zeros(b, width, dtype=torch.long)  # (B, blocks): every block the k steps write or read
        for i, s in enumerate(scheduled):
            blocks = s.block_ids[:width]
            table[i, :len(blocks)] = torch.tensor(blocks)
        kv = kv0 + torch.arange(k)[:, None]  # (k, B): KV index of each step's input token
        slots = (table.gather(1, (kv // bs).T).T * bs + kv % bs).contiguous()  # (k, B)
        ids = torch.tensor([s.request.token_ids[s.start] for s in scheduled])
        tokens = self.model.run_decode_steps(ids, pos0, slots, table, (kv0 + 1).to(torch.int32), self.kv_cache.layers)
        if tokens is None:  # where the plan cannot take them (float32, PyTorch ops, > 8 bf16 rows): a forward pass each
            tokens = torch.empty(k, b, dtype=torch.long)
            # rows beyond what kvserve's kernels take go through oneDNN: padded to a bucket as build_batch pads them
            pad = 0 if b <= self.model.unpadded_decode_rows else self.padded_size(b) - b
            pad_slots = torch.full((pad,), self.kv_cache.scratch_slot, dtype=torch.long)
            for j in range(k):
                batch = ForwardBatch(input_ids=F.pad(ids, (0, pad)), positions=F.pad(pos0 + j, (0, pad)),
                                     slot_mapping=torch.cat([slots[j], pad_slots]), num_decodes=b,
                                     logits_indices=torch.arange(b) if pad else None, decode_block_tables=table,
                                     decode_seq_lens=(kv[j] + 1).to(torch.int32))
                ids = self.sampler.argmax(self.model.compute_logits(self.model.forward(batch, self.kv_cache.layers)))
                tokens[j] = ids
        for s, toks in zip(scheduled, tokens.T.tolist()):
            out.sampled[s.request_id] = toks

    def blend_chunk(self, s: ScheduledRequest) -> BlendChunk:
        bs = self.block_size
        n = s.num_new_tokens
        kv = range(s.kv_start, s.kv_start + n)
        reused = torch.zeros(n, dtype=torch.bool)
        for lo, hi in s.blend_reused:
            reused[lo - s.start:hi - s.start] = True
        return BlendChunk(
            input_ids=torch.tensor(s.token_ids, dtype=torch.long),
            positions=torch.arange(s.start, s.start + n),
            slots=torch.tensor([s.block_ids[i // bs] * bs + i % bs for i in kv], dtype=torch.long),
            block_ids=torch.tensor(s.block_ids[: -(-(s.kv_start + n) // bs)], dtype=torch.long),
            ctx_start=s.kv_start, reused=reused, ratio=s.blend_ratio, key_span=s.key_span)

    def _evict(self, batch: ForwardBatch, sched: SchedulerOutput, out: ModelOutput) -> None:
        if self.evictor is not None:
            out.evicted = self.evictor.after_step(batch, sched.scheduled, out.sampled)
            out.eviction_seconds = self.evictor.take_seconds()
