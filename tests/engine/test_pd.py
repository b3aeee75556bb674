"""P/D disaggregation in the engine, on the real SmolLM2 weights (float32): a prefill engine publishes a prompt's KV
to a shared disk tier down to the block, and a decode engine continuing from the prefill's first tokens gives
exactly the colocated output (greedy, seeded sampling with n > 1 and penalties, stop strings) while loading that
KV; a transfer that never arrives is recomputed after the timeout; bad transfers are refused with clear errors."""

from __future__ import annotations

import time

import pytest

from kvserve.config import ConfigError
from kvserve.engine.core import EngineArgs
from kvserve.engine.protocol import KVTransferParams
from kvserve.sampling import ParamError, SamplingParams

pytestmark = pytest.mark.slow

TEXT = ("The harbour master kept a handwritten log of every repair since the day she took the job; the ledger lists "
        "hulls, dates and the names of the welders. ") * 9


def _run(engine, ids, params, transfer=None):
    rid = engine.add_request(None, {"prompt_token_ids": ids}, params, kv_transfer=transfer)
    final = None
    while engine.has_unfinished_requests():  # on: the published KV is saved by the step after the answer
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    return final


def _split(make_engine, store, ids, params, **decode_kw):
    pre = make_engine(kv_store=store, role="prefill")
    first = _run(pre, ids, params.replace(max_tokens=1), KVTransferParams(publish=True))
    dec = make_engine(kv_store=store, role="decode", **decode_kw)
    out = _run(dec, ids, params, KVTransferParams(output_token_ids=[list(o.token_ids) for o in first.outputs],
                                                  num_published_tokens=len(ids) // 16 * 16))
    return first, out, dec.stats()


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, n=2, presence_penalty=0.5, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.0, stop=(" welders",), ignore_eos=True),
], ids=["greedy", "seeded-n2-penalties", "stop-string"])
def test_split_equals_colocated_and_loads_the_prompt(make_engine, fp32_parts, tmp_path, params):
    _, tok, _ = fp32_parts
    ids = tok.encode(TEXT)[:298]  # a full 256-token chunk, then 2 more full blocks and a partial one
    assert len(ids) == 298
    ref = _run(make_engine(), ids, params)
    first, out, stats = _split(make_engine, f"disk:{tmp_path}:256MB", ids, params)
    for r, f, o in zip(ref.outputs, first.outputs, out.outputs):
        assert o.token_ids == r.token_ids and o.text == r.text and o.finish_reason == r.finish_reason
        # what the client saw from the prefill instance, then from the decode instance, is the colocated text
        assert r.text.startswith(f.text)
    assert stats.prompt_tokens_loaded == 288 and stats.prompt_tokens_computed == params.n * (298 - 288)  # each sequence its partial block


def test_a_transfer_that_never_arrives_is_recomputed(make_engine, fp32_parts, tmp_path):
    _, tok, _ = fp32_parts
    ids = tok.encode(TEXT)[:200]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = _run(make_engine(), ids, params)
    dec = make_engine(kv_store=f"disk:{tmp_path}:64MB", role="decode", kv_transfer_timeout_s=0.3)
    t0 = time.monotonic()
    out = _run(dec, ids, params, KVTransferParams(output_token_ids=[ref.outputs[0].token_ids[:1]],
                                                  num_published_tokens=192))
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert time.monotonic() - t0 < 5
    s = dec.stats()
    assert s.prompt_tokens_loaded == 0 and s.prompt_tokens_computed == 200 and s.kv_store.counters["transfer_waits"]


def test_bad_transfers_and_roles_are_refused(make_engine, tmp_path):
    plain = make_engine()
    with pytest.raises(ParamError, match="needs a KV store"):
        plain.add_request(None, {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4),
                          kv_transfer=KVTransferParams(publish=True))
    dec = make_engine(kv_store=f"disk:{tmp_path}:64MB", role="decode")
    bad = [(KVTransferParams(output_token_ids=[[5]]), SamplingParams(max_tokens=4, n=2), "one non-empty list"),
           (KVTransferParams(output_token_ids=[[5, 6]]), SamplingParams(max_tokens=2), "reach max_tokens"),
           (KVTransferParams(output_token_ids=[[10**6]]), SamplingParams(max_tokens=4), "integers in"),
           (KVTransferParams(num_published_tokens=99), SamplingParams(max_tokens=4), "num_published_tokens")]
    for transfer, params, msg in bad:
        with pytest.raises(ParamError, match=msg):
            dec.add_request(None, {"prompt_token_ids": [1, 2, 3]}, params, kv_transfer=transfer)
    assert not dec.has_unfinished_requests()
    with pytest.raises(ConfigError, match="--kv-store"):
        EngineArgs(role="decode")
    with pytest.raises(ConfigError, match="lossy codec"):
        EngineArgs(role="prefill", kv_store=f"disk:{tmp_path}:64MB:int8")
    EngineArgs(role="prefill", kv_store=f"disk:{tmp_path}:64MB:int8", kv_transfer_lossy=True)
