"""Messages between the API server and the engine-core process: msgspec structs, msgpack-encoded, one per ZeroMQ frame.

Nothing here is pickled. Every frame is decoded into a declared type; a frame that is too large or does not decode is
dropped and counted by the receiver, never executed. The sockets live in a private (0700) temporary directory.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from kvserve.engine.protocol import EngineCoreRequest, EngineInfo, EngineStats, KVSummary, SessionKey, StepOutputs

MAX_FRAME_BYTES = 256 * 1024 * 1024  # larger frames are dropped unread (a prompt at the context limit is ~100 KB)


# ---------------------------------------------------------------------------------------------- front end -> core
class AddRequests(msgspec.Struct, frozen=True, tag="add"):
    requests: list[EngineCoreRequest]


class FinishRequests(msgspec.Struct, frozen=True, tag="finish"):
    ids: list[str]  # request ids (every sequence) or sequence ids (`rid#i`)
    stopped: bool  # True: a stop string matched in the front end; False: aborted


class UtilityCall(msgspec.Struct, frozen=True, tag="call"):
    call_id: int
    method: Literal["stats", "reset_prefix_cache", "release_session", "kv_summary"]
    session: SessionKey | None = None  # release_session's argument
    since: str | None = None  # kv_summary's argument


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


CoreInput = AddRequests | FinishRequests | UtilityCall | Shutdown


# ---------------------------------------------------------------------------------------------- core -> front end
class Ready(msgspec.Struct, frozen=True, tag="ready"):
    epoch: int
    info: EngineInfo


class Outputs(msgspec.Struct, frozen=True, tag="outputs"):
    epoch: int
    step: StepOutputs


class Rejected(msgspec.Struct, frozen=True, tag="rejected"):
    """The core refused a request the front end had accepted (e.g. a duplicate id sent by another front end)."""

    epoch: int
    request_id: str
    message: str
    param: str | None
    code: str


class UtilityResult(msgspec.Struct, frozen=True, tag="result"):
    epoch: int
    call_id: int
    stats: EngineStats | None = None
    value: bool | None = None
    count: int | None = None  # release_session: tokens unpinned
    summary: KVSummary | None = None
    error: str | None = None


CoreOutput = Ready | Outputs | Rejected | UtilityResult


class Codec:
    """Typed encode/decode of one direction's messages; `decode` returns None for a frame it refuses."""

    def __init__(self, kind: type):
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(kind)
        self.dropped = 0

    def encode(self, msg) -> bytes:
        return self.encoder.encode(msg)

    def decode(self, frame: bytes | memoryview):
        if len(frame) > MAX_FRAME_BYTES:
            self.dropped += 1
            return None
        try:
            return self.decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            # ValueError: SamplingParams' own checks (ParamError) while decoding a request
            self.dropped += 1
            return None


def input_codec() -> Codec:
    return Codec(CoreInput)


def output_codec() -> Codec:
    return Codec(CoreOutput)
