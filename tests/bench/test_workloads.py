"""Workload generators: the same seed gives the same requests, another seed other ones; lengths as drawn."""

from __future__ import annotations

import json
import random

import pytest

from kvserve.bench import workloads as W

SMALL = {  # small shapes so the whole file runs in seconds
    "sharegpt-like": dict(num_requests=12, max_input=300, max_output=64),
    "shared-prefix": dict(num_requests=12, num_prefixes=3, prefix_len=96),
    "multi-turn": dict(num_requests=14, user_max=64),
    "rag": dict(num_requests=8, num_docs=6, doc_len=48, k=3),
    "stall": dict(num_requests=None, num_streams=3, num_long=2, long_prompt=400),
}


@pytest.fixture(scope="module")
def tok():
    return W.load_tokenizer()


def gen(tok, name, seed, **over):
    kw = dict(SMALL[name])
    kw.update(over)
    n = kw.pop("num_requests")
    return W.generate(name, tok, n, seed, **kw)


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic_per_seed(tok, name):
    a = [r.to_dict() for r in gen(tok, name, 1)]
    b = [r.to_dict() for r in gen(tok, name, 1)]
    c = [r.to_dict() for r in gen(tok, name, 2)]
    assert a == b
    assert a != c
    assert json.loads(json.dumps(a)) == a  # plain JSON
    assert len({r["request_id"] for r in a}) == len(a)
    for r in a:
        assert r["max_tokens"] >= 1 and r["content_tokens"] >= 1
        assert all(m["role"] in ("system", "user") and m["content"] for m in r["messages"])


def test_text_exact_length(tok):
    maker = W.TextMaker(tok)
    for n in (1, 7, 16, 100, 1000):
        text = maker.text(random.Random(n), n, opening="Once upon a time.")
        assert n - 1 <= maker.count(text) <= n


def test_sharegpt_like_lengths(tok):
    reqs = gen(tok, "sharegpt-like", 0, num_requests=60, max_input=2048, max_output=512)
    assert all(30 <= r.content_tokens <= 2048 for r in reqs)
    assert all(16 <= r.max_tokens <= 512 for r in reqs)
    assert len({r.content_tokens for r in reqs}) > 30  # a spread, not one length
    assert all(r.arrival is None and r.conversation is None for r in reqs)


def test_shared_prefix_reuses_few_system_prompts(tok):
    reqs = gen(tok, "shared-prefix", 0, num_requests=30)
    systems = {r.messages[0]["content"] for r in reqs}
    assert len(systems) <= 3
    assert len({r.messages[1]["content"] for r in reqs}) == 30  # every user asks their own question


def test_multi_turn_structure(tok):
    reqs = gen(tok, "multi-turn", 0)
    assert len(reqs) == 14  # turns add up to num_requests
    by_conv: dict = {}
    for r in reqs:
        by_conv.setdefault(r.conversation, []).append(r)
    for turns in by_conv.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert turns[0].messages[0]["role"] == "system"
        assert all(len(t.messages) == 1 and t.messages[0]["role"] == "user" for t in turns[1:])


def test_rag_reuses_documents_in_varying_order(tok):
    reqs = gen(tok, "rag", 3, num_requests=12)
    docs_per_req = []
    for r in reqs:
        body = r.messages[1]["content"]
        docs = [chunk.split(".")[0] for chunk in body.split("\n\n") if chunk.startswith("Document ")]
        assert len(docs) == 3 and len(set(docs)) == 3
        docs_per_req.append(docs)
    assert len({tuple(d) for d in docs_per_req}) > 1
    firsts = {d[0] for d in docs_per_req}
    assert len(firsts) > 1  # not a shared prefix: the first document changes
    assert len({r.messages[0]["content"] for r in reqs}) == 1  # the instruction is shared
    # the same prompt as segments (instruction, each document, the question) for --prompt-segments
    assert all("".join(r.segments) == r.prompt_text() and len(r.segments) == 5 for r in reqs)


def test_stall_arrivals_and_groups(tok):
    reqs = gen(tok, "stall", 0, first_long_at=2.0, long_interval=3.0)
    streams = [r for r in reqs if r.group == "stream"]
    longs = [r for r in reqs if r.group == "long-prompt"]
    assert len(streams) == 3 and all(r.arrival == 0.0 and r.max_tokens == 1024 for r in streams)
    assert [r.arrival for r in longs] == [2.0, 5.0]
    assert all(395 <= r.content_tokens <= 400 for r in longs)


def test_trace_replay(tok, tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 1000, "input_length": 300, "output_length": 8, "hash_ids": [1, 2]},
            {"timestamp": 1500, "input_length": 200, "output_length": 4, "hash_ids": [1]},
            {"timestamp": 4000, "input_length": 50, "output_length": 2},
            {"timestamp": 4100, "prompt": "Hello there", "output_length": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = W.generate("trace", tok, None, 0, path=str(path), block_size=128)
    assert [r.arrival for r in reqs] == pytest.approx([0.0, 0.5, 3.0, 3.1])
    assert [r.max_tokens for r in reqs] == [8, 4, 2, 3]
    a, b = reqs[0].prompt_text(), reqs[1].prompt_text()
    assert a[:200] == b[:200]  # hash id 1: the same first block of text
    assert reqs[0].content_tokens == pytest.approx(300, abs=2) and reqs[2].content_tokens == pytest.approx(50, abs=2)
    assert reqs[3].prompt_text() == "Hello there"
    again = W.generate("trace", tok, 2, 0, path=str(path), time_unit="ms", time_scale=2.0, block_size=128)
    assert [r.arrival for r in again] == pytest.approx([0.0, 1.0])
    assert [r.to_dict()["messages"] for r in again] == [r.to_dict()["messages"] for r in reqs[:2]]


def test_bad_parameters(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown parameter"):
        W.parse_params("rag", ["nope=1"])
    assert W.parse_params("rag", ["k=2", "doc-len=64"]) == {"k": 2, "doc_len": 64}
    with pytest.raises(ValueError, match="above"):
        W.generate("multi-turn", tok, 2, 0, output_max=8)
    with pytest.raises(ValueError, match="k <= num_docs"):
        W.generate("rag", tok, 2, 0, k=5, num_docs=3)
    with pytest.raises(ValueError, match="path"):
        W.generate("trace", tok, 2, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="needs"):
        W.generate("trace", tok, None, 0, path=str(bad))
