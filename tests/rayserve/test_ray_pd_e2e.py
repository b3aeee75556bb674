"""`kvserve ray-serve --prefill 1 --decode 1` on a local Ray cluster (docs/scaleout.md): the ingress splits each
request over a prefill replica and a decode replica sharing a disk KV tier, as `kvserve router` does; answers are
the engine's own (greedy, streamed, seeded n > 1) and the decode replica loads the prompt's KV instead of computing
it."""

from __future__ import annotations


import openai
import pytest

from kvserve.engine.llm_engine import LLM
from kvserve.sampling import SamplingParams
from tests.rayserve.conftest import ray_serve

MODEL = "SmolLM2-135M-Instruct"
DOC = ("The lighthouse keeper wrote down every ship that passed, its flag, its cargo and the weather, in a ledger "
       "that now fills a whole shelf of the harbour museum. ") * 10


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raypd")
    with ray_serve(["--replicas", "0", "--prefill", "1", "--decode", "1", "--cpus-per-replica", "1",
                    "--kv-store", f"disk:{tmp / 'kv'}:256MB", "--kv-store-load", "always",
                    "--enable-prompt-tokens-details"], tmp / "ray-serve.log") as url:
        yield url


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
