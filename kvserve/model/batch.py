"""ForwardBatch: everything one forward pass needs, as flat tensors. Built by the model runner, read by the model
and its attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.config import KeySpan


@dataclass
class PrefillSeq:
    """A chunk of `num_tokens` query tokens of one request at positions [ctx_start, ctx_start + num_tokens)."""

    token_start: int  # row of its first token in the flattened batch
    num_tokens: int
    ctx_start: int  # tokens of this request already in the KV cache before this chunk
    block_ids: torch.Tensor  # (num_blocks,) int64
    key_span: KeySpan | None = None  # APE: queries past the span attend to its keys tempered (PyTorch path)

    @property
    def ctx_len(self) -> int:
        return self.ctx_start + self.num_tokens


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset where each token's K/V is written
    # The first `num_decodes` rows are single-token decodes, attended in one batched call.
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (num_decodes, max_blocks) int64, padded with block 0
    decode_seq_lens: torch.Tensor | None = None  # (num_decodes,) int32: context length including the new token
    decode_key_spans: list[KeySpan | None] | None = None  # per decode row (APE); None: no row has one
    prefills: list[PrefillSeq] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # (R,) rows whose logits are needed
    # The prefill chunks again as flat tensors for a native kernel that attends to all of them in one call:
    # (S,) int64 each, and (S, max_blocks) int64 block tables padded with block 0. None when there are no prefills.
    prefill_token_starts: torch.Tensor | None = None
    prefill_num_tokens: torch.Tensor | None = None
    prefill_ctx_starts: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    # KV eviction's per-key attention mass (kvserve.worker.eviction), summed over the step's layers and the query
    # heads of each KV head; None where no request scores. Decode rows add into decode_scores (num_decodes, Hkv, S);
    # score rows (prefill rows in an observation window, given as rows of the flattened batch) run once more
    # through the decode kernel, only for score_out (R, Hkv, S), over score_block_tables (R, MB) / score_seq_lens (R,)
    decode_scores: torch.Tensor | None = None
    score_rows: torch.Tensor | None = None
    score_block_tables: torch.Tensor | None = None
    score_seq_lens: torch.Tensor | None = None
    score_out: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
