"""The one-call decode step (kernels/decode_step.cpp) computes exactly what the Python layer loop computes."""

from __future__ import annotations

import pytest
import torch

from kvserve import kernels

pytestmark = pytest.mark.skipif(kernels.decode_step_module() is None, reason="decode_step kernel did not build")


@pytest.fixture(scope="module")
def loaded():
    from kvserve.model.loader import load_model

    return load_model(None)


def with_and_without_plan(model, run):
    """run()'s result with the model's decode plan, then with the plan taken away (the layer loop)."""
    with_plan = run()
    plan, model.decode_plan = model.decode_plan, None
    try:
        return with_plan, run()
    finally:
        model.decode_plan = plan


@pytest.mark.parametrize("quantization", ["none", "q8_0", "q4_1", "w8a8"])
def test_decode_plan_is_bit_identical_to_the_layer_loop(loaded, fp32_parts, quantization):
    from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    _, tok, name = fp32_parts
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization=quantization)
    assert model.decode_plan is not None
    llm = LLM.from_engine(LLMEngine(EngineArgs(kv_cache_memory_gb=0.1), model=model, tokenizer=tok,
                                    model_name=name))
    prompts = ["The capital of France is", "Write a poem about the sea.", "def fib(n):"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    def run():
        # three sequences (a decode batch of 3, run unpadded) and one
        outs = llm.generate(prompts, params, use_tqdm=False) + llm.generate(prompts[:1], params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                      o.outputs[0].token_ids)]) for o in outs]

    with_plan, without = with_and_without_plan(model, run)
    assert with_plan == without  # same kernels, same order, same roundings: same tokens and logprobs
    model.decode_plan.set_profile(True)  # what kvserve.bench.token_cost turns on: timing only, same results
    try:
        assert run() == with_plan
        spent = model.decode_plan.take_profile()  # seconds in matmuls, attention, elementwise
        assert len(spent) == 3 and all(s > 0 for s in spent)
        assert model.decode_plan.take_profile() == [0.0, 0.0, 0.0]  # taking it resets it
    finally:
        model.decode_plan.set_profile(False)


def test_plan_checks_its_weights_once(loaded):
    """The plan reads K and N off the packed weights when it is built (its steps then run on raw pointers), so a
    layer list that does not chain, or a kind it does not know, is refused there with a clear message."""
    from kvserve.model.llama import LlamaModel

    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q8_0")
    lw = model.layers[0]
    c = model.config
    norms = [lw.input_norm, lw.post_norm]
    lins = [lw.qkv, lw.o, lw.gate_up, lw.down]
    mod = kernels.decode_step_module()

    def plan(kinds, lins_):
        return mod.DecodePlan(norms, kinds, [x.packed for x in lins_], [x.scales for x in lins_], c.num_heads,
                              c.num_kv_heads, c.rms_norm_eps, model.scale)

    plan([1, 1, 1, 1], lins)  # the layer as the model builds it
    with pytest.raises(RuntimeError, match="linear kind must be"):
        plan([1, 1, 3, 1], lins)
    with pytest.raises(RuntimeError, match="do not chain"):
        plan([1, 1, 1, 1], [lw.qkv, lw.o, lw.down, lw.gate_up])  # gate_up and down swapped
    with pytest.raises(RuntimeError, match="packed weights"):
        plan([2, 1, 1, 1], lins)  # q8_0 codes read as 4-bit


def test_no_plan_where_a_piece_is_not_native(loaded):
    from kvserve.model.llama import LlamaModel

    assert LlamaModel(loaded.config, loaded.weights, torch.float32).decode_plan is None  # gemv is bf16-only
    assert LlamaModel(loaded.config, loaded.weights, torch.bfloat16, native_kernels=False).decode_plan is None


def test_apes_tempered_decode_rows_take_the_layer_loop(loaded, fp32_parts):
    """The plan has no per-key temperature: a decode batch with an APE row (kv_reuse "parallel") must go through the
    layer loop, so the outputs with and without the plan are the same (with the plan taken they differ)."""
    from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    from tests.blend.test_blend_model import SEGMENTS

    _, tok, name = fp32_parts
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16)
    llm = LLM.from_engine(LLMEngine(EngineArgs(kv_cache_memory_gb=0.1), model=model, tokenizer=tok,
                                    model_name=name))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)

    def run():
        llm.engine.reset_prefix_cache()
        out, = llm.generate({"prompt_segments": SEGMENTS, "kv_reuse": "parallel", "ape_temperature": 0.5,
                             "ape_scale": 0.5}, params, use_tqdm=False)
        return out.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs,
                                                                         out.outputs[0].token_ids)]

    with_plan, without = with_and_without_plan(model, run)
    assert with_plan == without
