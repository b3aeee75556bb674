"""Prefill/decode disaggregation through the router (docs/scaleout.md): pure request and response rewriting, no I/O.

A request is split when the backends include prefill- and decode-role instances: the prefill instance gets it with
max_tokens 1, no streaming and `kv_transfer_params: {"do_remote_decode": true}`; it computes the prompt, publishes the
prompt's KV through the shared KV store and answers with each choice's first token ids. The decode instance gets the
client's request plus those ids (`kv_transfer_params`); it loads the published KV, continues every choice from its
first token (seeded draws included) and streams the rest. The client first sees the prefill's text, then the
decode's: the same text, token ids and usage as colocated serving.

The request rewriting is pure; `split_stream` and `prefill_only` assemble the client's response from whatever
transport the caller uses (`kvserve router`: HTTP to instances; `kvserve ray-serve`: Ray Serve handles), through the
small `Upstream` interface.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from kvserve.router.prompt import CHAT_PATH, COMPLETIONS_PATH
from kvserve.server.errors import ApiError
from kvserve.server.responses import SSE_DONE, sse

log = logging.getLogger("kvserve.router")

ROLES = ("both", "prefill", "decode")


def splittable(path: str, data: object) -> bool:
    """Whether a request can go through P/D; the rest is served whole by one instance. Not split: what the client
    already marked for a transfer, several prompts, echo and logprobs (their first position would have to be
    stitched), segments (CacheBlend), max_tokens of 1 (nothing is left to decode), scoring (max_tokens 0)."""
    if not isinstance(data, dict) or data.get("kv_transfer_params") is not None:
        return False
    n = data.get("n", 1)
    if type(n) is not int or n < 1:
        return False  # the backend answers the error
    if data.get("prompt_segments") is not None or data.get("kv_reuse") is not None:
        return False
    if path == COMPLETIONS_PATH:
        prompt = data.get("prompt")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
        if not single or data.get("echo") or data.get("logprobs") is not None:
            return False
        max_tokens = data.get("max_tokens", 16)
    elif path == CHAT_PATH:
        if data.get("logprobs"):
            return False
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    else:
        return False
    return max_tokens is None or (type(max_tokens) is int and max_tokens > 1)


PREFILL_DROPS = ("stream", "stream_options", "max_completion_tokens", "kv_pin_seconds")


def prefill_body(path: str, data: dict) -> bytes:
    """The prefill instance's request: one token per choice, not streamed, KV published. A session's KV pin is
    left to the decode instance, which holds the whole turn."""
    body = {k: v for k, v in data.items() if k not in PREFILL_DROPS}
    body["max_tokens"] = 1
    body["kv_transfer_params"] = {"do_remote_decode": True}
    return json.dumps(body).encode()


def decode_body(data: dict, transfer: dict) -> bytes:
    """The decode instance's request: the client's, continuing the prefill's choices."""
    return json.dumps({**data, "kv_transfer_params": transfer}).encode()


class PrefillResult:
    """A prefill instance's answer, checked: its choices in index order and what the decode request needs."""

    def __init__(self, response: dict, n: int):
        choices = response.get("choices")
        transfer = response.get("kv_transfer_params")
        if not isinstance(choices, list) or len(choices) != n or not isinstance(transfer, dict):
            raise ValueError("the prefill instance's answer has no kv_transfer_params or the wrong choices")
        self.response = response
        self.choices = sorted(choices, key=lambda c: c.get("index", 0))
        ids = transfer.get("output_token_ids")
        if not isinstance(ids, list) or len(ids) != n or not isinstance(transfer.get("num_published_tokens"), int):
            raise ValueError("the prefill instance's kv_transfer_params are malformed")
        self.transfer = {"output_token_ids": ids, "num_published_tokens": transfer["num_published_tokens"]}

    @property
    def finished(self) -> bool:
        """Every choice ended at its first token (a stop, EOS): the prefill's answer is the whole answer."""
        return all(c.get("finish_reason") not in (None, "length") for c in self.choices)

    @property
    def continues(self) -> bool:
        """Every choice stopped only because of the prefill's max_tokens 1: all continue on a decode instance."""
        return all(c.get("finish_reason") == "length" for c in self.choices)

    def final_body(self) -> bytes:
        """The prefill's answer as the client's non-streamed response."""
        out = {k: v for k, v in self.response.items() if k != "kv_transfer_params"}
        return json.dumps(out).encode()

    def first_chunks(self, path: str, final: bool, token_ids: bool = False) -> bytes:
        """SSE chunks carrying each choice's first text (with its finish_reason when `final`, and its token ids
        when the client asked for return_token_ids)."""
        r = self.response
        created = r.get("created", int(time.time()))
        out = []
        for c, ids in zip(self.choices, self.transfer["output_token_ids"]):
            reason = c.get("finish_reason") if final else None
            if path == CHAT_PATH:
                text = (c.get("message") or {}).get("content") or ""
                choice = {"index": c.get("index", 0), "delta": {"role": "assistant", "content": text},
                          "logprobs": None, "finish_reason": reason}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": c.get("index", 0), "text": c.get("text", ""), "logprobs": None,
                          "finish_reason": reason}
                obj = "text_completion"
            if final and c.get("stop_reason") is not None:
                choice["stop_reason"] = c["stop_reason"]
            if token_ids:
                choice["token_ids"] = ids
            out.append(sse({"id": r.get("id"), "object": obj, "created": created, "model": r.get("model"),
                            "choices": [choice]}))
        return b"".join(out)

    def usage_chunk(self, path: str) -> bytes:
        r = self.response
        obj = "chat.completion.chunk" if path == CHAT_PATH else "text_completion"
        return sse({"id": r.get("id"), "object": obj, "created": r.get("created", int(time.time())),
                    "model": r.get("model"), "choices": [], "usage": r.get("usage")})


class UpstreamBroken(Exception):
    """The instance serving a response died after its first byte."""


class Upstream(Protocol):
    """A response being received from an instance (an HTTP response, a Ray Serve call)."""

    status: int

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...  # raises UpstreamBroken

    async def close(self) -> None: ...


def broken_stream_event(message: str) -> bytes:
    """What a client's stream ends with when the instance serving it died (instead of a cut connection)."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "backend_error"}}) \
        + SSE_DONE


def prefill_only(result: PrefillResult, path: str, data: dict) -> tuple[bytes, str]:
    """(body, media type) when every choice ended at its first token: the prefill's answer is the whole answer."""
    if not data.get("stream"):
        return result.final_body(), "application/json"
    usage = (data.get("stream_options") or {}).get("include_usage")
    return (result.first_chunks(path, True, bool(data.get("return_token_ids")))
            + (result.usage_chunk(path) if usage else b"") + SSE_DONE), "text/event-stream"


async def split_stream(result: PrefillResult, path: str, data: dict,
                       open_decode: Callable[[], Awaitable[Upstream]]) -> AsyncIterator[bytes]:
    """A split, streamed request's SSE: the prefill's first token, then the decode instance's stream relayed. A
    decode instance that cannot be reached, answers an error, or dies mid-stream ends the stream with an error
    event."""
    yield result.first_chunks(path, False, bool(data.get("return_token_ids")))
    try:
        up = await open_decode()
    except ApiError as e:
        yield sse({"error": e.body()["error"]}) + SSE_DONE
        return
    try:
        if up.status != 200:
            raw = await up.read()
            try:
                err = json.loads(raw).get("error")
            except (ValueError, AttributeError):
                err = None
            yield sse({"error": err or {"message": f"the decode instance answered {up.status}",
                                        "type": "server_error", "param": None, "code": "backend_error"}}) + SSE_DONE
            return
        async for chunk in up.chunks():
            yield chunk
    except UpstreamBroken as e:
        log.warning("a decode instance broke a stream: %s", e)
        yield broken_stream_event("the decode instance serving this stream died")
    finally:
        await up.close()
