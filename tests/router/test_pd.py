"""The router's P/D rewriting (kvserve/router/pd.py), pure: which requests are split, the two request bodies, and
the prefill answer checked and turned into the client's first stream chunk or whole answer."""

from __future__ import annotations

import json

import pytest

from kvserve.router.pd import PrefillResult, decode_body, prefill_body, splittable
from kvserve.router.prompt import CHAT_PATH, COMPLETIONS_PATH

C, CHAT = COMPLETIONS_PATH, CHAT_PATH
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,data,split", [
    (C, {"prompt": "hello", "max_tokens": 8}, True),
    (C, {"prompt": [1, 2, 3]}, True),  # max_tokens defaults to 16
    (C, {"prompt": ["a", "b"]}, False),  # several prompts
    (C, {"prompt": "hello", "echo": True}, False),
    (C, {"prompt": "hello", "logprobs": 2}, False),
    (C, {"prompt": "hello", "max_tokens": 1}, False),  # nothing left to decode
    (C, {"prompt_segments": ["a", "b"]}, False),
    (C, {"prompt": "hello", "n": "2"}, False),  # malformed: the backend answers the error
    (C, {"prompt": "hello", "kv_transfer_params": {"do_remote_decode": True}}, False),  # the client's own
    (CHAT, {"messages": MSGS}, True),  # no max_tokens: until the context ends
    (CHAT, {"messages": MSGS, "max_completion_tokens": 1}, False),
    (CHAT, {"messages": MSGS, "logprobs": True}, False),
    (CHAT, {"messages": MSGS, "kv_reuse": "blend"}, False),
    ("/v1/embeddings", {"input": "x"}, False),
    (C, ["not", "an", "object"], False),
])
def test_what_is_split(path, data, split):
    assert splittable(path, data) is split


def test_bodies():
    data = {"model": "m", "messages": MSGS, "max_completion_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "seed": 3, "n": 2, "kv_pin_seconds": 30, "session_id": "s"}
    pre = json.loads(prefill_body(CHAT, data))
    assert pre == {"model": "m", "messages": MSGS, "seed": 3, "n": 2, "session_id": "s", "max_tokens": 1,
                   "kv_transfer_params": {"do_remote_decode": True}}
    transfer = {"output_token_ids": [[5], [6]], "num_published_tokens": 32}
    assert json.loads(decode_body(data, transfer)) == {**data, "kv_transfer_params": transfer}


def _answer(choices, transfer=None):
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m", "choices": choices,
            "usage": {"prompt_tokens": 40, "completion_tokens": len(choices), "total_tokens": 40 + len(choices)},
            "kv_transfer_params": transfer or {"output_token_ids": [[5]] * len(choices), "num_published_tokens": 32}}


def test_prefill_result_continues_stops_or_is_rejected():
    r = PrefillResult(_answer([{"index": 1, "text": " b", "finish_reason": "length"},
                               {"index": 0, "text": " a", "finish_reason": "length"}],
                              {"output_token_ids": [[5], [6]], "num_published_tokens": 32}), 2)
    assert r.continues and not r.finished
    assert r.transfer == {"output_token_ids": [[5], [6]], "num_published_tokens": 32}
    chunks = [json.loads(x[len(b"data: "):]) for x in r.first_chunks(C, final=False).split(b"\n\n") if x]
    assert [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] \
        == [(0, " a", None), (1, " b", None)]
    with_ids = r.first_chunks(C, final=False, token_ids=True)
    assert [json.loads(x[len(b"data: "):])["choices"][0]["token_ids"] for x in with_ids.split(b"\n\n") if x] \
        == [[5], [6]]  # in index order, as the prefill instance lists them
    done = PrefillResult(_answer([{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": 2}]), 1)
    assert done.finished and not done.continues
    assert "kv_transfer_params" not in json.loads(done.final_body())
    (chunk,) = [json.loads(x[len(b"data: "):]) for x in done.first_chunks(CHAT, final=True).split(b"\n\n") if x]
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] == "stop"
    mixed = PrefillResult(_answer([{"index": 0, "text": "x", "finish_reason": "stop"},
                                   {"index": 1, "text": "y", "finish_reason": "length"}]), 2)
    assert not mixed.finished and not mixed.continues  # served whole
    with pytest.raises(ValueError):
        PrefillResult(_answer([{"index": 0, "text": "x", "finish_reason": "length"}]), 2)  # wrong number of choices
    with pytest.raises(ValueError):
        PrefillResult(_answer([{"index": 0, "text": "x", "finish_reason": "length"}],
                              {"output_token_ids": "5", "num_published_tokens": 32}), 1)
