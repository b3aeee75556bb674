"""Pydantic v2 models of the OpenAI API subset we serve.

Requests are strict (no "1" for 1, no true for 1) and closed: an unknown field, or a known OpenAI field we do not
implement set to anything but its no-op value, fails validation so the API answers 400 naming it. Nothing is silently
ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from kvserve.engine.protocol import KVTransferParams, PromptSegments
from kvserve.sampling import SamplingParams


def _clean_text(s: str) -> str:
    """JSON may carry lone surrogates (\\ud800); they cannot be tokenized or echoed back as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "string contains invalid Unicode (a lone surrogate)") from None
    return s


def _invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """A model-level error that still names the parameter at fault (error ctx "param")."""
    return PydanticCustomError("invalid_value", message, {"param": param} if param else None)


Text = Annotated[str, AfterValidator(_clean_text)]
TokenIds = list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    # OpenAI fields we do not implement -> the values that mean "off" (accepted and dropped); anything else is a 400.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # OpenAI's spec makes optional fields nullable: null means "the default" (n: null -> 1)
        fields = cls.model_fields
        data = {k: v for k, v in data.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}
        for name, noops in cls.UNSUPPORTED.items():
            if name not in data:
                continue
            value = data[name]
            if any(type(value) is type(v) and value == v for v in noops) or value is None:
                data = {k: v for k, v in data.items() if k != name}
            else:
                raise PydanticCustomError("unsupported_parameter", "unsupported parameter: {name}", {"name": name})
        return data


class StreamOptions(_Strict):
    include_usage: bool | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"continuous_usage_stats": (False,)}


CacheSalt = Annotated[Text, Field(min_length=1, max_length=256)]


class SpeculativeOverride(_Strict):
    """Per-request speculative decoding: at most this many drafts per step (0: none)."""

    num_speculative_tokens: int = Field(ge=0)


class KVTransferIn(_Strict):
    """P/D disaggregation (docs/scaleout.md), vLLM's field name: what a front end (kvserve router) tells a prefill
    instance (do_remote_decode) and then a decode instance (the prefill response's kv_transfer_params)."""

    do_remote_decode: bool = False  # prefill: publish the prompt's KV down to the block; answer with the token ids
    output_token_ids: list[list[int]] | None = None  # decode: per choice, the tokens the prefill instance sampled
    num_published_tokens: int = Field(0, ge=0)  # decode: the prompt tokens whose KV the prefill instance published

    def params(self) -> KVTransferParams:
        return KVTransferParams(self.do_remote_decode, self.output_token_ids, self.num_published_tokens)


class _SamplingFields(_Strict):
    """Fields shared by completions and chat: the OpenAI sampling parameters plus vLLM's common extensions."""

    model: Text
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None
    cache_salt: CacheSalt | None = None
    return_token_ids: bool | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's: lower runs first (--scheduling-policy priority)
    session_id: Annotated[Text, Field(min_length=1, max_length=256)] | None = None  # an agent's conversation
    kv_pin_seconds: float | None = Field(None, ge=0)  # keep this turn's KV for the session's next turn
    # speculative decoding for this request: false turns it off, {"num_speculative_tokens": k} lowers k
    speculative: SpeculativeOverride | bool | None = None
    # KV eviction: keep at most this many tokens' KV once the prompt is computed (0: none; absent: the server's
    # --kv-eviction budget)
    kv_budget_tokens: int | None = Field(None, ge=0)
    # KV reuse of segments (docs/kvreuse.md): completions' prompt_segments, or (chat) each text part of a message's
    # content; "blend" (the default with segments) or "parallel" (APE)
    kv_reuse: Literal["blend", "parallel"] | None = None
    # CacheBlend: the share of reused segment tokens recomputed (absent: the server's default)
    blend_recompute_ratio: float | None = Field(None, ge=0, le=1)
    # APE (kv_reuse "parallel"): attention temperature over the segments and scale of their weight (absent: the
    # server's --ape-temperature / --ape-scale); the engine checks their range
    ape_temperature: float | None = None
    ape_scale: float | None = None
    kv_transfer_params: KVTransferIn | None = None

    @model_validator(mode="before")
    @classmethod
    def _speculative_shape(cls, data: Any) -> Any:
        spec = data.get("speculative") if isinstance(data, dict) else None
        k = spec.get("num_speculative_tokens") if isinstance(spec, dict) else None
        if spec is not None and not isinstance(spec, bool) and not (
                isinstance(spec, dict) and set(spec) == {"num_speculative_tokens"} and type(k) is int and k >= 0):
            raise _invalid('speculative must be true, false or {"num_speculative_tokens": k} with an integer k >= 0',
                           "speculative")
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options is only allowed when stream is true", "stream_options")
        return self

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def segments(self, starts: list[int]) -> PromptSegments:
        """How this request's segments (starting at `starts`) reuse KV; the engine checks the combination."""
        return PromptSegments(starts, self.blend_recompute_ratio, self.kv_reuse or "blend",
                              ape_temperature=self.ape_temperature, ape_scale=self.ape_scale)

    def reuse_field_without_segments(self) -> str | None:
        """The first KV-reuse field set on a request that has no segments (each is refused there)."""
        names = ("blend_recompute_ratio", "ape_temperature", "ape_scale", "kv_reuse")
        return next((n for n in names if getattr(self, n) is not None), None)

    def _sampling_kwargs(self) -> dict:
        kw: dict[str, Any] = {"n": self.n}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seed", "min_tokens", "ignore_eos", "include_stop_str_in_output",
                     "skip_special_tokens"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.stop is not None:
            kw["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.stop_token_ids is not None:
            kw["stop_token_ids"] = tuple(self.stop_token_ids)
        if self.kv_budget_tokens is not None:
            kw["kv_budget_tokens"] = self.kv_budget_tokens
        if self.speculative is False:
            kw["num_speculative_tokens"] = 0
        elif isinstance(self.speculative, SpeculativeOverride):
            kw["num_speculative_tokens"] = self.speculative.num_speculative_tokens
        return kw


DEFAULT_COMPLETION_MAX_TOKENS = 16
PromptInput = Text | list[Text] | TokenIds | list[TokenIds]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput | None = None
    # instead of prompt: one prompt as segments whose KV may be reused wherever they appear (docs/kvreuse.md)
    prompt_segments: list[Text | TokenIds] | None = None
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS  # null means the default, as in OpenAI's API
    echo: bool = False
    logprobs: int | None = None
    add_special_tokens: bool = True
    best_of: int | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"suffix": ("",), "logit_bias": ({},)}
    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.prompt_segments is None):
            raise _invalid("give exactly one of prompt and prompt_segments", "prompt_segments"
                           if self.prompt_segments is not None else "prompt")
        if self.prompt_segments is not None and not self.prompt_segments:
            raise _invalid("prompt_segments must not be an empty list", "prompt_segments")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _invalid("prompt must not be an empty list", "prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise PydanticCustomError("unsupported_parameter", "unsupported parameter: {name} (only best_of == n)",
                                      {"name": "best_of"})
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of texts or token-id lists (the segments, for prompt_segments)."""
        if self.prompt_segments is not None:
            return list(self.prompt_segments)
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        kw = self._sampling_kwargs()
        kw["max_tokens"] = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
            if self.echo:
                kw["prompt_logprobs"] = self.logprobs
        return SamplingParams(**kw)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"name": (), "tool_calls": ([],), "tool_call_id": (),
                                                "function_call": (), "refusal": (), "audio": ()}

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        """Images, audio and files need a multimodal model; say so instead of a type error."""
        content = data.get("content") if isinstance(data, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError("unsupported_parameter", "unsupported parameter: {name}",
                                          {"name": "content", "detail": f"content parts of type {kind!r}; "
                                                                        "this server takes text only"})
        return data

    def as_template_dict(self) -> dict:
        """developer is OpenAI's newer name for system; content parts are joined into one string."""
        role = "system" if self.role == "developer" else self.role
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
        "parallel_tool_calls": (), "response_format": ({"type": "text"},), "logit_bias": ({},),
        "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "store": (False,),
        "metadata": (), "service_tier": ("auto", "default"), "web_search_options": (), "verbosity": (),
        "prompt_cache_key": (), "safety_identifier": (),
    }
    @model_validator(mode="after")
    def _check(self):
        if not self.messages:
            raise _invalid("messages must contain at least one message", "messages")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise _invalid("set only one of max_tokens and max_completion_tokens", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict]:
        return [m.as_template_dict() for m in self.messages]

    def content_parts(self) -> list[list[str]]:
        """Each message's text parts (a string content is one part), in the order the template renders them."""
        return [[m.content] if isinstance(m.content, str) else [x.text for x in m.content] for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        kw = self._sampling_kwargs()
        kw["max_tokens"] = self.effective_max_tokens
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**kw)


class ReleaseSessionRequest(_Strict):
    session_id: Annotated[Text, Field(min_length=1, max_length=256)]
    cache_salt: CacheSalt | None = None


class ReleaseSessionResponse(BaseModel):
    session_id: str
    released_tokens: int  # 0: nothing was pinned (expired, taken over, or never pinned)


class KVSummaryResponse(BaseModel):
    """GET /kv/summary (docs/scaleout.md); the router reads it with this same model."""

    object: Literal["kv.summary"] = "kv.summary"
    model: str  # the served model name
    kv_identity: str  # model fingerprint, dtype and block size: engines that differ never share a prefix hash
    block_size: int
    hash_bytes: int  # bytes of each block hash listed
    version: str
    hashes: str | None  # base64 of the concatenated truncated hashes; null: unchanged since the `since` sent
    num_running: int
    num_waiting: int
    kv_usage: float
    max_num_seqs: int
    role: Literal["both", "prefill", "decode"] = "both"  # P/D disaggregation: what the router sends it


class TokenizeRequest(_Strict):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise _invalid("give exactly one of prompt and messages", "prompt")
        if self.messages is not None and not self.messages:
            raise _invalid("messages must contain at least one message", "messages")
        return self


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------------------- responses
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVTransferOut(_Out):
    """A prefill instance's answer to do_remote_decode: pass it as the decode request's kv_transfer_params."""

    output_token_ids: list[list[int]]
    num_published_tokens: int


class PromptTokensDetails(_Out):
    cached_tokens: int = 0
    # CacheBlend (prompt_segments / kv_reuse): tokens whose KV came from the segment cache (within cached_tokens)
    # and how many of those were recomputed; absent for plain prompts
    blended_tokens: int | None = None
    recomputed_tokens: int | None = None


class Usage(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # only where cached counts may be told (server.md)
    kv_evicted_tokens: int | None = None  # KV eviction: tokens whose KV the request dropped (only when it evicts)


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    kv_transfer_params: KVTransferOut | None = None  # P/D prefill (do_remote_decode)


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    kv_transfer_params: KVTransferOut | None = None  # P/D prefill (do_remote_decode)
    prompt_token_ids: list[int] | None = None


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Out):
    prompt: str
