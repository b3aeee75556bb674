"""CacheBlend's selective recompute (docs/kvreuse.md): one prefill chunk whose reused tokens already hold KV copied
(and re-rotated) from the segment cache.

Every token runs through the layers up to the check layer, overwriting the reused KV with fresh values there. At the
check layer the fresh V of each reused token is compared with its cached V; the `ratio` share that deviates most,
plus every token that was not reused, go on through the remaining layers, attending over the blended KV (their own
fresh KV, the other reused tokens' cached KV). Ratio 1 recomputes everything: the plain prefill, exactly. Ratio 0
computes only the tokens that were not reused, at every layer: naive concatenation of the cached KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.config import KeySpan
from kvserve.model.batch import ForwardBatch, PrefillSeq


@dataclass
class BlendChunk:
    input_ids: torch.Tensor  # (n,) int64
    positions: torch.Tensor  # (n,) int64
    slots: torch.Tensor  # (n,) int64: where each token's K/V lives (reused ones: already filled)
    block_ids: torch.Tensor  # (num_blocks,) int64: the request's blocks up to the chunk's end
    ctx_start: int  # the request's KV tokens before the chunk
    reused: torch.Tensor  # (n,) bool: the token's KV came from the segment cache
    ratio: float
    key_span: KeySpan | None = None  # APE (ratio 0): the tokens after the segments attend to them tempered


def num_to_recompute(num_reused: int, ratio: float) -> int:
    return min(num_reused, int(round(ratio * num_reused)))


def select_recompute(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending) of the round(ratio * m) largest deviations among m reused tokens."""
    k = num_to_recompute(deviation.numel(), ratio)
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.topk(deviation, k, sorted=False).indices.sort().values


def _chunk_batch(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, chunk: BlendChunk) -> ForwardBatch:
    """All of the chunk's rows as one prefill sequence (the native prefill kernel's layout)."""
    n = ids.numel()
    seq = PrefillSeq(0, n, chunk.ctx_start, chunk.block_ids, chunk.key_span)
    return ForwardBatch(ids, positions, slots, prefills=[seq],
                        prefill_token_starts=torch.tensor([0]), prefill_num_tokens=torch.tensor([n]),
                        prefill_ctx_starts=torch.tensor([chunk.ctx_start]), prefill_block_tables=chunk.block_ids[None])


def forward_blend(model, chunk: BlendChunk, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                  check_layer: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Returns the final hidden state of the chunk's last token (1, hidden; None when that token was reused and not
    recomputed: no logits are needed there) and the chunk rows of the reused tokens recomputed past the check
    layer."""
    c = model.config
    ops = model.attention.ops
    n = chunk.input_ids.numel()
    q_size, kv_size = model.q_size, model.kv_size
    reused_idx = chunk.reused.nonzero().flatten()
    fresh_idx = (~chunk.reused).nonzero().flatten()
    kv_index = torch.arange(chunk.ctx_start, chunk.ctx_start + n)
    chosen = torch.zeros(0, dtype=torch.long)
    rows = None  # None: every row of the chunk; else the row indices still computed
    if chunk.ratio <= 0.0:
        rows = fresh_idx  # naive reuse: the cached KV stands at every layer
    elif chunk.ratio >= 1.0:
        chosen = reused_idx  # every layer recomputes every token: the plain prefill
        check_layer = len(model.layers)

    def sub(idx):
        ids, pos, slots = ((t if idx is None else t[idx]) for t in (chunk.input_ids, chunk.positions, chunk.slots))
        return _chunk_batch(ids, pos, slots, chunk)

    h = F.embedding(chunk.input_ids if rows is None else chunk.input_ids[rows], model.embed)  # (m, hidden)
    batch = sub(rows)
    rope = ops.rope_tables(batch.positions)
    x = ops.rms_norm(h, model.layers[0].input_norm, c.rms_norm_eps)
    for i, (lw, (k_cache, v_cache)) in enumerate(zip(model.layers, kv_caches)):
        m = h.shape[0]
        if m == 0:
            break  # every token of the chunk was reused and none is recomputed from here on
        qkv = lw.qkv(x)  # (m, (H + 2 Hkv) D)
        deviation = None
        if i == check_layer and rows is None and reused_idx.numel():
            # fresh V against the cached (re-rotated) copy, before this layer overwrites it
            v_new = qkv[reused_idx, q_size + kv_size:].float()
            v_old = v_cache.view(-1, kv_size)[chunk.slots[reused_idx]].float()
            deviation = ((v_new - v_old) ** 2).sum(dim=-1)  # (num reused,)
        ops.rope_qkv_write_(qkv, batch, rope, k_cache, v_cache, c.num_heads, c.num_kv_heads)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(m, c.num_heads, c.head_dim)
        if rows is None:  # contiguous: the model's prefill attention
            attn = model.attention(q, k.view(m, c.num_kv_heads, c.head_dim), v.view(m, c.num_kv_heads, c.head_dim),
                                   k_cache, v_cache, batch, model.scale)
        else:
            attn = model.attention.scattered(q, k_cache, v_cache, chunk.block_ids, kv_index[rows], model.scale,
                                             chunk.key_span)
        x = ops.add_rms_norm_(h, lw.o(attn.reshape(m, q_size)), lw.post_norm, c.rms_norm_eps)
        mlp = lw.down(ops.silu_mul(lw.gate_up(x)))
        if i + 1 < len(model.layers):
            x = ops.add_rms_norm_(h, mlp, model.layers[i + 1].input_norm, c.rms_norm_eps)
        else:
            h.add_(mlp)
        if deviation is not None:  # from the next layer on: the fresh tokens and the most deviating reused ones
            chosen = reused_idx[select_recompute(deviation, chunk.ratio)]
            rows = torch.cat([fresh_idx, chosen]).sort().values
            h, x = h[rows].contiguous(), x[rows].contiguous()
            batch = sub(rows)
            rope = ops.rope_tables(batch.positions)
    last = h[-1:] if rows is None or (rows.numel() and int(rows[-1]) == n - 1) else None
    if last is None:
        return None, chosen
    return ops.rms_norm(last.contiguous(), model.norm, c.rms_norm_eps), chosen
