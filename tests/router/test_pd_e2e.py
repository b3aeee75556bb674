"""P/D disaggregation end to end on 127.0.0.1 (docs/scaleout.md): a prefill instance and a decode instance sharing a
disk KV tier, behind `kvserve router`, driven with the official openai client. Split requests give exactly the
decode instance's own colocated answers (greedy, seeded n > 1, chat, streamed) while the decode instance loads the
prompt's KV instead of computing it; a killed prefill instance costs recompute, never an answer; a killed decode
instance ends its streams with an error, and later requests get a clean 503."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.router.test_router_e2e import _router, _wait_status
from tests.serving import start_kvserve

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
DOC = ("The harbour master kept a handwritten log of every repair since the day she took the job; the ledger "
       "lists hulls, dates and the names of the welders who worked through each winter storm. ") * 12


def _instance(tmp: Path, name: str, role: str):
    return start_kvserve(["--dtype", "float32", "--kv-cache-memory-gb", "0.05", "--num-threads", "1",
                          "--role", role, "--kv-store", f"disk:{tmp / 'kv'}:256MB", "--kv-store-load", "always",
                          "--log-level", "warning", "--no-access-log"], tmp / f"{name}.log",
                         drop_env=("KVSERVE_API_KEY",))


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    (tmp / "key").write_text("unused\n")
    procs, routers = [], []
    try:
        procs.append(_instance(tmp, "prefill", "prefill"))
        procs.append(_instance(tmp, "decode", "decode"))
        router, url = _router(tmp, [u for _, u in procs], "router")
        routers.append(router)
        status = _wait_status(url, tmp / "router.log", lambda b: b[0]["healthy"] and b[1]["healthy"])
        assert [b["role"] for b in status["backends"]] == ["prefill", "decode"]
        yield {"url": url, "prefill": procs[0], "decode": procs[1], "tmp": tmp}
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(10)
        for r in routers:
            r.terminate()
            r.wait(10)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _split(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r'^kvserve_router:pd_requests_total{outcome="split"} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


CASES = [
    dict(prompt=DOC + "Question: who worked through the storms?", max_tokens=12, temperature=0.0),
    dict(prompt="Second copy. " + DOC[:700] + "Summarise the ledger.", max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=2),
]


def test_split_requests_match_colocated_and_load_the_prompt(pd):
    router, decode_url = _client(pd["url"]), pd["decode"][1]
    direct = _client(decode_url)
    loaded0 = _metric(decode_url, "kvserve:prompt_tokens_loaded_total")
    published = 0
    for i, case in enumerate(CASES):
        ref = direct.completions.create(model=MODEL, **case, extra_body={"ignore_eos": True, "cache_salt": f"ref{i}"})
        split0 = _split(pd["url"])
        got = router.completions.create(model=MODEL, **case, extra_body={"ignore_eos": True})
        assert _split(pd["url"]) == split0 + 1
        assert [c.text for c in got.choices] == [c.text for c in ref.choices]
        assert got.usage.completion_tokens == ref.usage.completion_tokens
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens
        published += got.usage.prompt_tokens // 16 * 16  # the prompt down to the block
        # streamed: the first chunk comes from the prefill instance, the rest from the decode instance
        pieces: dict[int, str] = {}
        for chunk in router.completions.create(model=MODEL, **case, stream=True, extra_body={"ignore_eos": True}):
            for c in chunk.choices:
                pieces[c.index] = pieces.get(c.index, "") + c.text
        assert [pieces[k] for k in sorted(pieces)] == [c.text for c in ref.choices]
    # the decode instance loaded each prompt's published KV, down to the block, rather than computing it (the
    # streamed repeats found it in its own prefix cache)
    assert _metric(decode_url, "kvserve:prompt_tokens_loaded_total") - loaded0 == published
    msgs = [{"role": "system", "content": DOC[:900]}, {"role": "user", "content": "Name one welder."}]
    ref = direct.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                         extra_body={"cache_salt": "chat-ref"})
    got = router.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == ref.choices[0].message.content


def test_killed_prefill_then_killed_decode(pd):
    router, direct = _client(pd["url"]), _client(pd["decode"][1])
    cases = [dict(prompt=f"Ledger {k}. " + DOC[:400] + "Continue the ledger:", max_tokens=8, temperature=0.0)
             for k in range(4)]
    refs = [direct.completions.create(model=MODEL, **c, extra_body={"cache_salt": "kill"}).choices[0].text
            for c in cases]
    # the prefill instance dies while requests are in flight: each is split, or served whole by the decode
    # instance (which computes the prompt), and every answer is the colocated one
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(router.completions.create, model=MODEL, **c) for c in cases]
        time.sleep(0.3)
        pd["prefill"][0].kill()
        got = [f.result().choices[0].text for f in futures]
    pd["prefill"][0].wait(10)
    assert got == refs
    assert router.completions.create(model=MODEL, **cases[0]).choices[0].text == refs[0]
    # the decode instance dies mid-stream: the stream ends (with an error) instead of hanging
    stream = router.completions.create(model=MODEL, prompt=DOC, max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    t0 = time.monotonic()
    with _Ends():
        for k, _ in enumerate(stream):
            if k == 2:
                pd["decode"][0].kill()
    assert time.monotonic() - t0 < 60
    _wait_status(pd["url"], pd["tmp"] / "router.log", lambda b: not b[0]["healthy"] and not b[1]["healthy"])
    with pytest.raises(openai.APIStatusError) as e:
        router.completions.create(model=MODEL, **cases[0])
    assert e.value.status_code == 503


class _Ends:
    """The stream may end quietly or with a client error: either way it ends."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is None or issubclass(kind, (openai.APIError, httpx.HTTPError))
