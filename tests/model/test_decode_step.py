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

    # int8/4-bit layers take any row count: the plan runs batches past gemv's 8 rows too (the loop pads them to 16)
    many = [f"{p} {i}" for i in range(4) for p in prompts] if quantization != "none" else []
    assert model.plan_rows == (8 if quantization == "none" else 256)

    def run():
        # three sequences (a decode batch of 3, run unpadded), one, and 12 for the int8/4-bit formats
        outs = llm.generate(prompts, params, use_tqdm=False) + llm.generate(prompts[:1], params, use_tqdm=False)
        outs += llm.generate(many, params, use_tqdm=False) if many else []
        return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                      o.outputs[0].token_ids)]) for o in outs]

    with_plan, without = with_and_without_plan(model, run)
    assert with_plan == without  # same kernels, same order, same roundings: same tokens and logprobs
    if many:  # one prefill step, then one decode step of all 12 rows: through the plan, unpadded
        model.decode_plan.set_profile(True)
        try:
            llm.generate(many, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
            assert model.decode_plan.take_profile()[0] > 0
        finally:
            model.decode_plan.set_profile(False)
    model.decode_plan.set_profile(True)  # what kvserve.bench.token_cost turns on: timing only, same results
    try:
        assert run() == with_plan
        spent = model.decode_plan.take_profile()  # seconds in matmuls, attention, elementwise, run_steps' output
        assert len(spent) == 4 and all(s > 0 for s in spent[:3]) and spent[3] == 0  # no run_steps here
        assert model.decode_plan.take_profile() == [0.0] * 4  # taking it resets it
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


@pytest.mark.parametrize("quantization", ["none", "q4_1"])
def test_decode_steps_in_one_call_give_the_tokens_of_single_steps(loaded, fp32_parts, quantization):
    """decode_steps > 1: the plan's run_steps (embedding, layers, final norm, lm_head - gemv for bf16, q8_0 for
    q4_1 - and argmax per step, in one call) and, for more than 8 bf16 rows or without the plan, the runner's loop of
    forward passes, give the tokens of one engine step per token, stops and max_tokens included. (Where a batch's
    sequences end at different tokens, single steps continue in a smaller batch and a run keeps the ended rows to
    its end; bf16 kernels round a row differently at another row count, so the stop runs are one sequence.)"""
    from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    _, tok, name = fp32_parts
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization=quantization)

    def llm(steps):
        return LLM.from_engine(LLMEngine(EngineArgs(kv_cache_memory_gb=0.1, decode_steps=steps), model=model,
                                         tokenizer=tok, model_name=name))

    single, multi = llm(1), llm(6)
    native = []
    run_steps = model.run_decode_steps
    model.run_decode_steps = lambda *a: native.append(out := run_steps(*a)) or out
    prompts = ["The capital of France is", "Write a poem about the sea.", "def fib(n):"]
    batches = [prompts, prompts[:1], [f"{p} {i}" for i in range(4) for p in prompts[:3]]]  # 3, 1 and 12 rows
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (23, 9)]
    for batch in batches:
        for p in params:
            want = [o.outputs[0].token_ids for o in single.generate(batch, p, use_tqdm=False)]
            assert [o.outputs[0].token_ids for o in multi.generate(batch, p, use_tqdm=False)] == want
    for prompt in prompts:
        free = single.generate(prompt, params[0], use_tqdm=False)[0].outputs[0].token_ids
        stop = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True, stop_token_ids=(free[8],))
        want = single.generate(prompt, stop, use_tqdm=False)[0].outputs[0].token_ids
        assert multi.generate(prompt, stop, use_tqdm=False)[0].outputs[0].token_ids == want
        assert want[-1] == free[8] and len(want) == free.index(free[8]) + 1
    model.decode_plan.set_profile(True)
    try:
        multi.generate(prompts, params[1], use_tqdm=False)
        assert model.decode_plan.take_profile()[3] > 0  # run_steps times its output side
    finally:
        model.decode_plan.set_profile(False)
    assert any(t is not None for t in native), "the plan never took the steps"
    if quantization == "none":  # bf16: gemv's 8 rows at most
        assert model.plan_step_rows == 8 and any(t is None for t in native), "12 rows take the runner's loop"
    else:  # 4-bit layers and a q8_0 lm_head take any row count
        assert model.plan_step_rows == 256 and all(t is not None for t in native)
    model.run_decode_steps = run_steps
    plan, model.decode_plan = model.decode_plan, None  # no plan: the runner's loop for every batch
    try:
        assert [o.outputs[0].token_ids for o in multi.generate(prompts, params[0], use_tqdm=False)] == \
            [o.outputs[0].token_ids for o in single.generate(prompts, params[0], use_tqdm=False)]
    finally:
        model.decode_plan = plan
    with pytest.raises(RuntimeError, match="out of the vocabulary"):
        ids = torch.tensor([loaded.config.vocab_size])
        model.run_decode_steps(ids, torch.tensor([0]), torch.tensor([[0]]), torch.zeros(1, 1, dtype=torch.long),
                               torch.tensor([1], dtype=torch.int32), single.engine.core.kv_cache.layers)


def test_small_pages_plan_leaves_the_models_weights_and_gives_the_same_tokens(loaded, fp32_parts):
    """decode1 --small-pages: a plan over copies of the weights off the huge-page arena, the model's own untouched."""
    from kvserve.bench.decode1 import small_pages_plan
    from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    _, tok, name = fp32_parts
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q4_1")
    own = [getattr(obj, attr) for obj, attr in model.streamed_weights()]
    plan = small_pages_plan(model)
    assert all(getattr(obj, attr) is t for (obj, attr), t in zip(model.streamed_weights(), own))
    llm = LLM.from_engine(LLMEngine(EngineArgs(kv_cache_memory_gb=0.1, decode_steps=4), model=model, tokenizer=tok,
                                    model_name=name))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def run():
        return llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0].token_ids

    on_arena = run()
    arena_plan, model.decode_plan = model.decode_plan, plan
    try:
        assert run() == on_arena
    finally:
        model.decode_plan = arena_plan
