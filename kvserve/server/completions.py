"""POST /v1/completions: prompts (text or token ids, one or many) in, choices out, streamed or not."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import protocol as p
from kvserve.server.errors import ApiError
from kvserve.server.inputs import EngineInput, check_token_ids, parse_request, sampling_params
from kvserve.server.responses import completion_logprobs, dump, json_response, sse, transfer_out, usage
from kvserve.server.session import Session, aborted, generate
from kvserve.server.state import ServerState
from kvserve.server.tenants import request_tenant

log = logging.getLogger("kvserve.server")
router = APIRouter()


def _tokenize_prompts(tok, prompts: list, add_special_tokens: bool, echo: bool) -> list[EngineInput]:
    inputs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            inputs.append(EngineInput(prompt, tok.encode(prompt, add_special_tokens=add_special_tokens)))
        else:
            text = tok.decode(prompt, skip_special_tokens=False) if echo else None
            inputs.append(EngineInput(text, list(prompt)))
    return inputs


def _tokenize_segments(tok, segments: list, add_special_tokens: bool, req: p.CompletionRequest) -> list[EngineInput]:
    try:
        ids, starts = tok.encode_segments(segments, add_special_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), "prompt_segments", "invalid_value") from None
    text = "".join(segments) if all(isinstance(x, str) for x in segments) else None
    return [EngineInput(text, ids, req.segments(starts))]


def _completion_choice(state: ServerState, req: p.CompletionRequest, i: int, out: RequestOutput,
                       o: CompletionOutput) -> p.CompletionChoice:
    tok, prefix = state.tokenizer, (out.prompt or "") if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        entries: list = []
        if req.echo:
            plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            entries += list(zip(out.prompt_token_ids, plp))
        entries += list(zip(o.token_ids, o.logprobs or []))
        logprobs, _ = completion_logprobs(tok, entries, 0)
    return p.CompletionChoice(index=i * req.n + o.index, text=prefix + o.text, logprobs=logprobs,
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                              token_ids=list(o.token_ids) if req.return_token_ids else None,
                              prompt_token_ids=list(out.prompt_token_ids) if req.return_token_ids else None)


class _CompletionStreamer:
    """Per-choice state for streamed completions: echo sent, logprobs sent, text offset, finish sent."""

    def __init__(self, state: ServerState, req: p.CompletionRequest, rid: str, num_prompts: int):
        self.state, self.req, self.rid, self.created = state, req, rid, int(time.time())
        self.report_cached = state.report_cached_tokens(req.cache_salt)
        self.last: list[RequestOutput | None] = [None] * num_prompts
        self.echoed: set[int] = set()
        self.lp_sent: dict[int, int] = {}
        self.offset: dict[int, int] = {}
        self.finished: set[int] = set()

    def chunks(self, i: int, out: RequestOutput) -> list[bytes]:
        self.last[i] = out
        if aborted(out):
            return []  # the session reports why
        result = []
        for o in out.outputs:
            index = i * self.req.n + o.index
            if index in self.finished:
                continue
            choice = self._choice(index, out, o)
            if choice is not None:
                chunk = p.CompletionChunk(id=self.rid, created=self.created, model=self.state.model_name,
                                          choices=[choice])
                result.append(sse(dump(chunk, self.req.include_usage_in_stream)))
        return result

    def _choice(self, index: int, out: RequestOutput, o: CompletionOutput) -> p.CompletionChoice | None:
        req, text, entries = self.req, o.delta_text, []
        if req.echo and index not in self.echoed:
            if not o.token_ids and o.finish_reason is None:
                return None  # the prompt is still being computed (its logprobs arrive chunk by chunk)
            self.echoed.add(index)
            text = (out.prompt or "") + text
            if req.logprobs is not None:
                entries += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
        if req.logprobs is not None:
            sent = self.lp_sent.get(index, 0)
            new = (o.logprobs or [])[sent:]
            entries += list(zip(o.token_ids[sent:sent + len(new)], new))
            self.lp_sent[index] = sent + len(new)
        if o.finish_reason is not None:
            self.finished.add(index)
        if not text and not entries and o.finish_reason is None:
            return None
        logprobs = None
        if req.logprobs is not None:
            logprobs, self.offset[index] = completion_logprobs(self.state.tokenizer, entries,
                                                                self.offset.get(index, 0))
        return p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason,
                                  token_ids=list(o.delta_token_ids) if req.return_token_ids else None)

    def usage_chunk(self) -> bytes:
        chunk = p.CompletionChunk(id=self.rid, created=self.created, model=self.state.model_name, choices=[],
                                  usage=usage([o for o in self.last if o is not None], self.report_cached))
        return sse(chunk)


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    req: p.CompletionRequest = await parse_request(request, p.CompletionRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    params = sampling_params(req, {})
    prompts = req.prompts()
    field = "prompt_segments" if req.prompt_segments is not None else "prompt"
    num_prompts = 1 if req.prompt_segments is not None else len(prompts)
    if req.prompt_segments is None and (name := req.reuse_field_without_segments()) is not None:
        raise ApiError(400, f"{name} applies to prompt_segments only", name, "invalid_value")
    if req.prompt_segments is not None:
        state.check_text_length(sum(len(x) for x in prompts if isinstance(x, str)), field)
    for prompt in prompts:
        if isinstance(prompt, str):
            state.check_text_length(len(prompt), field)
        else:
            check_token_ids(prompt, state.info.vocab_size, field)
    state.check_cache_salt(req.cache_salt)
    scope = state.request_scope(request_tenant(request), req.priority, req.session_id, req.kv_pin_seconds)
    session = Session(state, num_prompts * params.n, params.n, "prompt" if num_prompts > 1 else "n", scope)
    rid = f"cmpl-{uuid.uuid4().hex}"
    log.debug("%s: %d prompt(s), user=%r", rid, num_prompts, req.user)
    try:
        if req.prompt_segments is not None:
            inputs = await state.tokenize(_tokenize_segments, state.tokenizer, prompts, req.add_special_tokens, req)
        else:
            inputs = await state.tokenize(_tokenize_prompts, state.tokenizer, prompts, req.add_special_tokens,
                                          req.echo)
        if req.kv_transfer_params is not None:
            if num_prompts != 1 or req.echo:
                raise ApiError(400, "kv_transfer_params needs one prompt and no echo", "kv_transfer_params",
                               "invalid_value")
            inputs = [inputs[0].with_transfer(req)]
        for inp in inputs:
            state.validate_input(inp, params, req.cache_salt, {"prompt": field}, scope=session.scope)
        session.start(rid, inputs, params, req.cache_salt)
    except BaseException:
        session.close("error")
        raise
    streamer = _CompletionStreamer(state, req, rid, num_prompts)

    def respond(finals: list[RequestOutput]) -> Response:
        choices = [_completion_choice(state, req, i, out, o) for i, out in enumerate(finals) for o in out.outputs]
        return json_response(p.CompletionResponse(
            id=rid, model=state.model_name, choices=choices, usage=usage(finals, streamer.report_cached),
            kv_transfer_params=transfer_out(req, finals[0], state.info.block_size, state.info.kv_store)))

    return await generate(request, session, bool(req.stream), streamer.chunks,
                           streamer.usage_chunk if req.include_usage_in_stream else None, respond)


