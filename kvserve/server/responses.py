"""Response bodies out: SSE framing, OpenAI's optional-field conventions, logprob objects and usage."""

from __future__ import annotations

import json
import math
from typing import Iterable

from pydantic import BaseModel
from starlette.responses import JSONResponse

from kvserve.outputs import PositionLogprobs, RequestOutput
from kvserve.server import protocol as p

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens this way too


def sse(data: dict | BaseModel) -> bytes:
    if isinstance(data, BaseModel):
        data = dump(data)
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
OPTIONAL_KEYS = ("token_ids", "prompt_token_ids", "kv_transfer_params")


def dump(model: BaseModel, keep_usage: bool = True) -> dict:
    """model_dump without the opt-in extension fields when they were not asked for."""
    data = model.model_dump()
    for key in OPTIONAL_KEYS:
        if data.get(key, 0) is None:
            del data[key]
    for choice in data.get("choices") or ():
        for key in OPTIONAL_KEYS:
            if choice.get(key, 0) is None:
                del choice[key]
        if "delta" in choice:  # a delta carries only what changed, as OpenAI's chunks do
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if not keep_usage:
        data.pop("usage", None)
    elif data.get("usage") and data["usage"].get("prompt_tokens_details", 0) is None:
        del data["usage"]["prompt_tokens_details"]
    elif data.get("usage") and data["usage"].get("prompt_tokens_details"):
        details = data["usage"]["prompt_tokens_details"]
        for key in ("blended_tokens", "recomputed_tokens"):  # only for segmented prompts
            if details.get(key, 0) is None:
                del details[key]
    return data


def json_response(model: BaseModel) -> JSONResponse:
    return JSONResponse(dump(model))


# ---------------------------------------------------------------------------------------------------------- logprobs
def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def completion_logprobs(tok, entries: Iterable[tuple[int, PositionLogprobs | None]], offset: int) \
        -> tuple[p.CompletionLogprobs, int]:
    """OpenAI's legacy logprobs object for (token id, logprobs at that position) pairs; returns it and the new offset."""
    out = p.CompletionLogprobs()
    for tid, pos in entries:
        if pos is None or tid not in pos:
            piece, value, top = tok.id_to_piece(tid), None, None
        else:
            piece = pos[tid].decoded_token or ""
            value = _lp(pos[tid].logprob)
            top = {(lp.decoded_token or ""): _lp(lp.logprob) for lp in pos.values()}
        out.tokens.append(piece)
        out.token_logprobs.append(value)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(piece)
    return out, offset


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int) -> p.ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid)
        if chosen is None:
            continue
        tops = sorted((lp for lp in pos.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        piece = chosen.decoded_token or ""
        content.append(p.TokenLogprob(
            token=piece, logprob=_lp(chosen.logprob), bytes=list(piece.encode("utf-8")),
            top_logprobs=[p.TopLogprob(token=lp.decoded_token or "", logprob=_lp(lp.logprob),
                                       bytes=list((lp.decoded_token or "").encode("utf-8"))) for lp in tops]))
    return p.ChatLogprobs(content=content)


def usage(finals: Iterable[RequestOutput], report_cached: bool) -> p.Usage:
    """`report_cached`: include prompt_tokens_details.cached_tokens (see ServerState.report_cached_tokens)."""
    prompt = completion = cached = evicted = blended = recomputed = 0
    for out in finals:
        prompt += len(out.prompt_token_ids)
        completion += sum(len(o.token_ids) for o in out.outputs)
        cached += out.num_cached_tokens
        evicted += out.num_evicted_tokens
        blended += out.num_blended_tokens
        recomputed += out.num_recomputed_tokens
    details = None
    if report_cached:  # segment reuse tells the same as cached tokens: under the same consent
        details = p.PromptTokensDetails(cached_tokens=cached, blended_tokens=blended if blended else None,
                                        recomputed_tokens=recomputed if blended else None)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=details, kv_evicted_tokens=evicted or None)


# ------------------------------------------------------------------------------------------------------- completions


def transfer_out(req, out: RequestOutput, block_size: int, kv_store: bool) -> p.KVTransferOut | None:
    """A prefill instance's kv_transfer_params for the decode request (docs/scaleout.md): each choice's token ids
    and the prompt tokens its KV was published for (down to the block; none without a KV store)."""
    t = req.kv_transfer_params
    if t is None or not t.do_remote_decode:
        return None
    published = len(out.prompt_token_ids) // block_size * block_size if kv_store else 0
    return p.KVTransferOut(output_token_ids=[list(o.token_ids) for o in out.outputs],
                           num_published_tokens=published)
