"""Request bodies in: read with a size cap and a deadline, JSON-decoded and validated by the pydantic models, all
turned into ApiErrors that name the offending parameter. Large bodies are parsed off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvserve.engine.protocol import KVTransferParams, PromptSegments
from kvserve.sampling import ParamError, SamplingParams
from kvserve.server.errors import ApiError

DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body is read and dropped up to here, so the client sees the 413
BODY_READ_TIMEOUT_S = 60.0
PARSE_INLINE_BYTES = 32 * 1024  # larger bodies are parsed in a worker thread: the event loop serves every stream


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _is_type_tag(part: Any) -> bool:
    """Pydantic puts union member names ('list[int]', 'function-after[...]') in error locations; users need not."""
    return isinstance(part, str) and ("[" in part or "(" in part)


def validation_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False, include_input=False)
    err = errors[0]
    loc = [str(x) for x in err["loc"] if not _is_type_tag(x)]
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "unsupported_parameter":
        loc.append(str(ctx.get("name")))
        path = ".".join(loc)
        detail = f" ({ctx['detail']})" if ctx.get("detail") else ""
        return ApiError(400, f"unsupported parameter: {path}{detail}", path, "unsupported_parameter")
    if not loc and ctx.get("param"):  # a model-level check that names its parameter in the message already
        return ApiError(400, err["msg"], str(ctx["param"]), "invalid_value")
    path = ".".join(loc)
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter: {path}", path, "unsupported_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {path}", path, "missing_required_parameter")
    message = f"{path}: {err['msg']}" if path else err["msg"]
    return ApiError(400, message, path or None, "invalid_value")


def parse_model(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None


async def read_body(request: Request, cap: int) -> bytes:
    """The body, or 413 past `cap` bytes (checked on Content-Length first and again while reading)."""
    declared = request.headers.get("content-length")
    too_big = False
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        too_big = int(declared) > cap
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    too_big = True
                if too_big:
                    if size > DRAIN_LIMIT:
                        break
                    continue
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} seconds",
                       code="timeout") from None
    if too_big:
        raise ApiError(413, f"the request body is larger than the limit of {cap} bytes", code="request_too_large")
    return b"".join(chunks)


def _parse_body(cls: type[BaseModel], body: bytes) -> Any:
    return parse_model(cls, parse_json(body))


async def parse_request(request: Request, cls: type[BaseModel], max_body_bytes: int) -> Any:
    body = await read_body(request, max_body_bytes)
    if len(body) <= PARSE_INLINE_BYTES:
        return _parse_body(cls, body)
    return await asyncio.get_running_loop().run_in_executor(None, _parse_body, cls, body)


def sampling_params(req, names: dict[str, str] | None = None) -> SamplingParams:
    try:
        return req.sampling_params()
    except ParamError as e:
        raise ApiError.from_param_error(e, names) from None


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    if any(t < 0 or t >= vocab for t in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param, "invalid_value")


@dataclass(frozen=True)
class EngineInput:
    """One prompt as the engine takes it: token ids, plus the text when the client sent text (echo needs it), and
    where its segments start when it was sent as segments (CacheBlend)."""

    text: str | None
    ids: list[int]
    segments: PromptSegments | None = None
    kv_transfer: KVTransferParams | None = None  # P/D disaggregation (docs/scaleout.md)

    def engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.ids, "prompt": self.text, "segments": self.segments,
                "kv_transfer": self.kv_transfer}

    def with_transfer(self, req) -> "EngineInput":
        """This input with the request's kv_transfer_params (if any)."""
        t = req.kv_transfer_params
        return self if t is None else dataclasses.replace(self, kv_transfer=t.params())
