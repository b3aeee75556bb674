"""Attention over the paged KV cache, and the backend a model runs it and its elementwise ops with.

The backend is chosen once, when the model is built: the native kernels where they built, PyTorch otherwise. A kernel
that declines a call (a dtype or head layout it does not cover) falls back to PyTorch for that call only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kvserve import kernels
from kvserve.config import KeySpan
from kvserve.model.batch import ForwardBatch, PrefillSeq
from kvserve.model.layers import NativeOps, RotaryEmbedding, TorchOps, native_ops


def temper_(scores: torch.Tensor, span: KeySpan) -> None:
    """APE: scores (..., L) of queries past the span; its keys' logits become logit / T + log S, in place."""
    part = scores[..., span.lo:span.hi]
    part.mul_(span.inv_temperature).add_(span.log_scale)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, scores_out: torch.Tensor | None = None,
                           key_spans: list[KeySpan | None] | None = None) -> torch.Tensor:
    """Single-token queries of many requests at once: gather their blocks, mask past each length. `scores_out`
    (B, Hkv, S) float32, if given, gets the probabilities summed over each KV head's query heads added to it.
    `key_spans`: per row, APE's tempered keys (for a query past them) or None."""
    nd = q.shape[0]
    num_heads, d = q.shape[1:]
    num_kv = k_cache.shape[2]
    group = num_heads // num_kv
    max_len = tables.shape[1] * k_cache.shape[1]  # tables: (B, MB)
    keys = k_cache[tables].view(nd, max_len, num_kv, d)  # (B, L, Hkv, D)
    values = v_cache[tables].view(nd, max_len, num_kv, d)
    qg = q.view(nd, num_kv, group, d)  # (B, Hkv, G, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg.float(), keys.float()) * scale  # (B, Hkv, G, L)
    for b, span in enumerate(key_spans or ()):
        if span is not None and int(seq_lens[b]) > span.hi:  # the query (at seq_len - 1) is past the span
            temper_(scores[b], span)
    pos = torch.arange(max_len)
    mask = pos[None, :] >= seq_lens[:, None].long()  # (B, L)
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if scores_out is not None:
        n = min(max_len, scores_out.shape[2])  # probabilities past a length are 0
        scores_out[:, :, :n] += probs.sum(dim=2)[:, :, :n]
    out = torch.einsum("bkgl,blkd->bkgd", probs, values.float())  # (B, Hkv, G, D)
    return out.reshape(nd, num_heads, d).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """One request's chunk: causal within the chunk, full over the KV it already has in the cache."""
    n = seq.num_tokens
    num_heads, d = q.shape[1:]
    num_kv = k_cache.shape[2]
    if seq.ctx_start == 0:
        keys, values, mask, causal = k, v, None, True  # (n, Hkv, D): nothing cached before this chunk
    else:
        ctx = seq.ctx_len
        keys = k_cache[seq.block_ids].view(-1, num_kv, d)[:ctx]  # (ctx, Hkv, D)
        values = v_cache[seq.block_ids].view(-1, num_kv, d)[:ctx]
        qpos = torch.arange(seq.ctx_start, ctx)
        mask = torch.arange(ctx)[None, :] <= qpos[:, None]  # (n, ctx) bool, True = attend
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, H, n, D)
        keys.transpose(0, 1).unsqueeze(0),  # (1, Hkv, ctx, D)
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=num_heads != num_kv)
    return out.squeeze(0).transpose(0, 1).reshape(n, num_heads, d)


def _slots(block_ids: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """The cache slots of a request's first n KV tokens."""
    return (block_ids[:, None] * block_size + torch.arange(block_size)).flatten()[:n]


def tempered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                       q_index: torch.Tensor, scale: float, span: KeySpan) -> torch.Tensor:
    """APE's attention for queries of one request past its span: q (m, H, D) at ascending KV indices q_index (m,),
    each over the keys up to its own index, the span's keys tempered and scaled. Returns (m, H, D). PyTorch only:
    the native kernels have no per-key temperature."""
    m, num_heads, d = q.shape
    num_kv = k_cache.shape[2]
    ctx = int(q_index[-1]) + 1
    slots = _slots(block_ids, k_cache.shape[1], ctx)
    keys = k_cache.view(-1, num_kv, d).index_select(0, slots).float()  # (ctx, Hkv, D)
    values = v_cache.view(-1, num_kv, d).index_select(0, slots).float()
    qg = q.view(m, num_kv, num_heads // num_kv, d).float()  # (m, Hkv, G, D)
    scores = torch.einsum("mkgd,lkd->mkgl", qg, keys) * scale  # (m, Hkv, G, ctx)
    temper_(scores, span)
    mask = torch.arange(ctx)[None, :] > q_index[:, None]  # (m, ctx) True = masked
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    out = torch.einsum("mkgl,lkd->mkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(m, num_heads, d).to(q.dtype)


def _past_span(q_index: torch.Tensor, span: KeySpan | None) -> int:
    """Where the queries past the span start among ascending KV indices: len(q_index) when none is or no span."""
    if span is None:
        return q_index.numel()
    return int(torch.searchsorted(q_index, span.hi))


@dataclass(frozen=True)
class AttentionBackend:
    """How a model attends over the paged KV cache and runs a layer's elementwise ops."""

    ops: TorchOps  # norms, RoPE + KV write, SiLU: NativeOps where the fused kernels built
    decode_kernel: Callable | None = None  # kvserve.kernels.decode_attention_kernel(); None: PyTorch
    prefill_kernel: Callable | None = None  # kvserve.kernels.prefill_attention_kernel(); None: SDPA per chunk

    @classmethod
    def build(cls, rotary: RotaryEmbedding, native_kernels: bool = True) -> AttentionBackend:
        """Each native kernel where it builds, PyTorch for the rest; only PyTorch when native_kernels is False."""
        if not native_kernels:
            return cls(TorchOps(rotary))
        return cls(native_ops(rotary) or TorchOps(rotary), kernels.decode_attention_kernel(),
                   kernels.prefill_attention_kernel())

    @property
    def native(self) -> bool:
        """Whether any native kernel runs (the attention kernels may still decline some calls)."""
        return (self.decode_kernel is not None or self.prefill_kernel is not None
                or isinstance(self.ops, NativeOps))

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, scores_out: torch.Tensor | None = None,
               key_spans: list[KeySpan | None] | None = None) -> torch.Tensor:
        """q: (B, H, D), one query per row over its block table. Returns (B, H, D); adds attention mass into
        scores_out (B, Hkv, S) when given. Rows with a key span (APE) are attended again in PyTorch, tempered."""
        out = None
        if self.decode_kernel is not None:
            out = self.decode_kernel(q, k_cache, v_cache, tables, seq_lens, scale, scores_out)
        if out is None:
            return decode_attention_torch(q, k_cache, v_cache, tables, seq_lens, scale, scores_out, key_spans)
        rows = [i for i, span in enumerate(key_spans or ()) if span is not None]
        if rows:
            r = torch.tensor(rows)
            out[r] = decode_attention_torch(q[r], k_cache, v_cache, tables[r], seq_lens[r], scale,
                                            key_spans=[key_spans[i] for i in rows])
        return out

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: ForwardBatch, out: torch.Tensor, scale: float) -> None:
        """Writes the rows of every prefill chunk into out (T, H, D): in one kernel call, else chunk by chunk."""
        if not (self.prefill_kernel is not None and self.prefill_kernel(
                q, k_cache, v_cache, batch.prefill_token_starts, batch.prefill_num_tokens, batch.prefill_ctx_starts,
                batch.prefill_block_tables, out, scale)):
            for seq in batch.prefills:
                s, e = seq.token_start, seq.token_start + seq.num_tokens
                out[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache, seq, scale)
        for seq in batch.prefills:  # APE: the rows past a span again, tempered
            if seq.key_span is None:
                continue
            q_index = torch.arange(seq.ctx_start, seq.ctx_len)
            first = _past_span(q_index, seq.key_span)
            if first < seq.num_tokens:
                s, e = seq.token_start + first, seq.token_start + seq.num_tokens
                out[s:e] = tempered_attention(q[s:e], k_cache, v_cache, seq.block_ids, q_index[first:], scale,
                                              seq.key_span)

    def scattered(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                  kv_index: torch.Tensor, scale: float, key_span: KeySpan | None = None) -> torch.Tensor:
        """Queries at scattered, ascending KV indices of one request (CacheBlend's recomputed tokens), each over the
        keys up to its own index; those past `key_span` (APE) tempered. q: (m, H, D); returns (m, H, D)."""
        first = _past_span(kv_index, key_span)
        out = self._scattered(q, k_cache, v_cache, block_ids, kv_index, scale)
        if first < kv_index.numel():
            out[first:] = tempered_attention(q[first:], k_cache, v_cache, block_ids, kv_index[first:], scale, key_span)
        return out

    def _scattered(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                   kv_index: torch.Tensor, scale: float) -> torch.Tensor:
        m = q.shape[0]
        ctx_end = int(kv_index[-1]) + 1
        if self.prefill_kernel is not None:
            out = torch.empty_like(q)
            if self.prefill_kernel(q, k_cache, v_cache, torch.zeros(1, dtype=torch.long),
                                   torch.tensor([m]), torch.tensor([ctx_end - m]), block_ids[None].contiguous(),
                                   out, scale, kv_index.contiguous()):
                return out
        num_heads, d = q.shape[1:]
        num_kv = k_cache.shape[2]
        keys = k_cache.view(-1, num_kv, d).index_select(0, _slots(block_ids, k_cache.shape[1], ctx_end))
        values = v_cache.view(-1, num_kv, d).index_select(0, _slots(block_ids, k_cache.shape[1], ctx_end))
        mask = torch.arange(ctx_end)[None, :] <= kv_index[:, None]  # (m, ctx) True = attend
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv)  # (1, H, m, D)
        return out.squeeze(0).transpose(0, 1).contiguous()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, batch: ForwardBatch, scale: float) -> torch.Tensor:
        """q: (T, H, D), k/v: (T, Hkv, D), already written into their cache slots. Returns (T, H, D): the decode
        rows first, then the prefill chunks."""
        nd = batch.num_decodes
        if batch.score_rows is not None:  # eviction scores of prefill rows: their attention again, mass only
            self.decode(q[batch.score_rows], k_cache, v_cache, batch.score_block_tables, batch.score_seq_lens, scale,
                        batch.score_out)
        if not batch.prefills and nd == q.shape[0]:
            return self.decode(q, k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale,
                               batch.decode_scores, batch.decode_key_spans)
        out = torch.zeros_like(q)  # rows of padding tokens stay zero
        if nd:
            out[:nd] = self.decode(q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale,
                                   batch.decode_scores, batch.decode_key_spans)
        if batch.prefills:
            self.prefill(q, k, v, k_cache, v_cache, batch, out, scale)
        return out
