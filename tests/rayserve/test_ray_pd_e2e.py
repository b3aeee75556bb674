"""`kvserve ray-serve --prefill 1 --decode 1` on a local Ray cluster (docs/scaleout.md): the ingress splits each
request over a prefill replica and a decode replica sharing a disk KV tier, as `kvserve router` does; answers are
the engine's own (greedy, streamed, seeded n > 1) and the decode replica loads the prompt's KV instead of computing
it."""

from __future__ import annotations

import signal
import subprocess

import openai
import pytest

from kvserve.engine.llm_engine import LLM
from kvserve.sampling import SamplingParams
from tests.serving import start_kvserve

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (make install installs ray[serve])")

MODEL = "SmolLM2-135M-Instruct"
DOC = ("The lighthouse keeper wrote down every ship that passed, its flag, its cargo and the weather, in a ledger "
       "that now fills a whole shelf of the harbour museum. ") * 10


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raypd")
    log = tmp / "ray-serve.log"
    try:
        proc, url = start_kvserve(["--replicas", "0", "--prefill", "1", "--decode", "1", "--num-cpus", "2",
                                   "--cpus-per-replica", "1", "--dtype", "float32", "--num-threads", "1",
                                   "--kv-cache-memory-gb", "0.05", "--kv-store", f"disk:{tmp / 'kv'}:256MB",
                                   "--kv-store-load", "always", "--enable-prompt-tokens-details",
                                   "--log-level", "warning", "--no-access-log"],
                                  log, timeout=420, drop_env=("KVSERVE_API_KEY",), command="ray-serve")
    except RuntimeError as e:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Started a local Ray instance" not in text:
            pytest.skip(f"Ray could not start a local cluster here: {str(e)[-600:]}")
        raise
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_split_requests_are_the_engines_own_answers_from_loaded_kv(app, make_engine):
    client = openai.OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0, timeout=120)
    local = LLM.from_engine(make_engine())
    prompt = DOC + "Question: what did the keeper write down?"
    ref = local.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == ref
    # the decode replica computed none of the prompt's full blocks: it loaded them
    assert whole.usage.prompt_tokens_details.cached_tokens >= (whole.usage.prompt_tokens // 16 - 1) * 16
    stream = client.completions.create(model=MODEL, prompt="Again. " + prompt, max_tokens=12, temperature=0,
                                       stream=True)
    ref2 = local.generate(["Again. " + prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert "".join(c.choices[0].text for c in stream if c.choices) == ref2
    seeded = dict(max_tokens=10, temperature=0.9, top_p=0.95, seed=5, n=2)
    got = client.completions.create(model=MODEL, prompt="Third. " + prompt, **seeded)
    refs = local.generate(["Third. " + prompt], SamplingParams(**seeded))[0].outputs
    assert sorted(c.text for c in got.choices) == sorted(o.text for o in refs)
