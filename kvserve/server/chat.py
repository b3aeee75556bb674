"""POST /v1/chat/completions: messages through the model's chat template, one assistant message per choice."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, Request
from starlette.responses import Response

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import protocol as p
from kvserve.server.errors import ApiError
from kvserve.server.inputs import EngineInput, parse_request, sampling_params
from kvserve.server.responses import chat_logprobs, dump, json_response, sse, transfer_out, usage
from kvserve.server.session import Session, aborted, generate
from kvserve.server.state import ServerState
from kvserve.server.tenants import request_tenant

log = logging.getLogger("kvserve.server")
router = APIRouter()



def apply_template(tok, messages: list[dict], add_generation_prompt: bool,
                    add_special_tokens: bool = False) -> EngineInput:
    try:
        if not add_special_tokens:
            return EngineInput(None, tok.apply_chat_template(messages, add_generation_prompt))
        text = tok.render_chat_template(messages, add_generation_prompt)
        return EngineInput(None, tok.encode(text, add_special_tokens=True))
    except Exception as e:  # noqa: BLE001 - template errors (jinja, no template) are the caller's input problem
        raise ApiError(400, f"messages: the chat template could not be applied: {e}", "messages",
                       "invalid_value") from None


def apply_template_segments(tok, messages: list[dict], req: p.ChatCompletionRequest) -> EngineInput:
    try:
        ids, starts = tok.chat_segments(messages, req.content_parts(), req.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors are the caller's input problem
        raise ApiError(400, f"messages: the chat template could not be applied as segments: {e}", "messages",
                       "invalid_value") from None
    return EngineInput(None, ids, req.segments(starts))


def _chat_choice(req: p.ChatCompletionRequest, o: CompletionOutput) -> p.ChatChoice:
    logprobs = chat_logprobs(o.token_ids, o.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
    return p.ChatChoice(index=o.index, message=p.AssistantMessage(content=o.text), logprobs=logprobs,
                        finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                        token_ids=list(o.token_ids) if req.return_token_ids else None)


class _ChatStreamer:
    def __init__(self, state: ServerState, req: p.ChatCompletionRequest, rid: str):
        self.state, self.req, self.rid, self.created = state, req, rid, int(time.time())
        self.report_cached = state.report_cached_tokens(req.cache_salt)
        self.last: RequestOutput | None = None
        self.started: set[int] = set()
        self.lp_sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def _chunk(self, choice: p.ChatChunkChoice) -> bytes:
        chunk = p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.state.model_name,
                                      choices=[choice])
        return sse(dump(chunk, self.req.include_usage_in_stream))

    def chunks(self, out: RequestOutput) -> list[bytes]:
        self.last = out
        if aborted(out):
            return []
        result = []
        for o in out.outputs:
            if o.index in self.finished:
                continue
            if o.index not in self.started:  # OpenAI sends the role first, with empty content
                self.started.add(o.index)
                result.append(self._chunk(p.ChatChunkChoice(index=o.index,
                                                            delta=p.DeltaMessage(role="assistant", content=""))))
            logprobs = None
            if self.req.logprobs:
                sent = self.lp_sent.get(o.index, 0)
                new = (o.logprobs or [])[sent:]
                self.lp_sent[o.index] = sent + len(new)
                logprobs = chat_logprobs(o.token_ids[sent:sent + len(new)], new, self.req.top_logprobs or 0)
            if o.finish_reason is not None:
                self.finished.add(o.index)
            if not o.delta_text and o.finish_reason is None and not (logprobs and logprobs.content):
                continue
            result.append(self._chunk(p.ChatChunkChoice(
                index=o.index, delta=p.DeltaMessage(content=o.delta_text or None), logprobs=logprobs,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                token_ids=list(o.delta_token_ids) if self.req.return_token_ids else None)))
        return result

    def usage_chunk(self) -> bytes:
        chunk = p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.state.model_name, choices=[],
                                      usage=usage([self.last] if self.last is not None else [], self.report_cached))
        return sse(chunk)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    req: p.ChatCompletionRequest = await parse_request(request, p.ChatCompletionRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    names = {"logprobs": "top_logprobs", "max_tokens": req.max_tokens_param, "prompt": "messages"}
    params = sampling_params(req, names)
    messages = req.template_messages()
    state.check_text_length(sum(len(m["content"]) for m in messages), "messages")
    state.check_cache_salt(req.cache_salt)
    scope = state.request_scope(request_tenant(request), req.priority, req.session_id, req.kv_pin_seconds)
    session = Session(state, params.n, params.n, "n", scope)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log.debug("%s: %d message(s), user=%r", rid, len(messages), req.user)
    try:
        if req.kv_reuse is not None:
            inp = await state.tokenize(apply_template_segments, state.tokenizer, messages, req)
        elif (name := req.reuse_field_without_segments()) is not None:
            raise ApiError(400, f'{name} needs "kv_reuse": "blend" or "parallel"', name, "invalid_value")
        else:
            inp = await state.tokenize(apply_template, state.tokenizer, messages, req.add_generation_prompt)
        inp = inp.with_transfer(req)
        state.validate_input(inp, params, req.cache_salt, names, session.scope)
        session.start(rid, [inp], params, req.cache_salt)
    except BaseException:
        session.close("error")
        raise
    streamer = _ChatStreamer(state, req, rid)

    def respond(finals: list[RequestOutput]) -> Response:
        out = finals[0]
        return json_response(p.ChatCompletionResponse(
            id=rid, model=state.model_name, choices=[_chat_choice(req, o) for o in out.outputs], usage=usage(finals, streamer.report_cached),
            prompt_token_ids=list(out.prompt_token_ids) if req.return_token_ids else None,
            kv_transfer_params=transfer_out(req, out, state.info.block_size, state.info.kv_store)))

    return await generate(request, session, bool(req.stream), lambda i, out: streamer.chunks(out),
                           streamer.usage_chunk if req.include_usage_in_stream else None, respond)


