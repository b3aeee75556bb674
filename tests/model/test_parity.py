"""Token-for-token greedy parity with HF transformers (float32, real SmolLM2 weights) on every path that must not
change outputs: batching, chunked prefill at several budgets, prefix caching on/off, and forced preemption."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams

NEW_TOKENS = 24
MARGIN = 1e-2

PARAGRAPH = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run many tasks. Compilers turned formulas into "
    "instructions, operating systems shared one processor among many users, and networks joined machines across "
    "continents. Each layer hid the details beneath it, so that people could think about problems instead of wires. "
    "Today a request typed into a phone may touch thousands of computers before an answer returns. "
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 50.",
    "Summarize the following text in one sentence: " + PARAGRAPH * 3,
    "Translate 'good morning, how are you?' into Spanish and German.",
]
RAW_LENGTHS = [5, 9, 33, 120, 260, 480, 900, 1300, 2000]


def build_prompts(tok) -> list[list[int]]:
    corpus = tok.encode(PARAGRAPH * 60 + " ".join(QUESTIONS) * 5)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    for i, n in enumerate(RAW_LENGTHS):
        start = (i * 37) % 200
        prompts.append(corpus[start:start + n])
    # shares a 480-token prefix with the 900-token prompt: a prefix-cache hit inside one batch
    prompts.append(prompts[len(QUESTIONS) + 6][:480] + tok.encode(" In short, the answer is"))
    assert len(prompts) == 16
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] <= 5 and lengths[-1] >= 2000
    return prompts


@pytest.fixture(scope="module")
def prompts(fp32_parts):
    return build_prompts(fp32_parts[1])


@pytest.fixture(scope="module")
def hf_reference(hf_model, prompts):
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True, pad_token_id=2)
            tokens = out.sequences[0, len(ids):].tolist()
            margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            refs.append((tokens, margins))
    return refs


def assert_parity(ours: list[int], ref: tuple[list[int], list[float]], label: str) -> None:
    tokens, margins = ref
    for j, (a, b) in enumerate(zip(ours, tokens)):
        if a != b:
            assert margins[j] < MARGIN, (f"{label}: token {j} differs ({a} vs HF {b}) where HF's top-2 margin is "
                                         f"{margins[j]:.4f}")
            return  # a near-tie: the continuations legitimately fork here
    assert len(ours) == len(tokens), f"{label}: {len(ours)} tokens vs HF {len(tokens)}"


def run_batch(engine, prompts):
    llm = LLM.from_engine(engine)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


# tiny chunks with caching (the slowest, and where prefix hits split chunks), medium chunks without it, one step's
# worth with it: each chunk size and both caching modes once, not the full cross product (CI time)
@pytest.mark.parametrize(("budget", "caching"), [(16, True), (64, False), (512, True)])
def test_greedy_parity_mixed_batch(make_engine, prompts, hf_reference, budget, caching):
    engine = make_engine(max_num_batched_tokens=budget, enable_prefix_caching=caching, max_num_seqs=16,
                         kv_cache_memory_gb=1.0)  # room to keep every prompt cached for the second pass
    got, outs = run_batch(engine, prompts)
    for i, (g, ref) in enumerate(zip(got, hf_reference)):
        assert_parity(g, ref, f"prompt {i} (len {len(prompts[i])}) budget={budget} caching={caching}")
    if caching:
        assert outs[-1].num_cached_tokens >= 480 - 16  # the in-batch shared prefix was reused
        again, outs2 = run_batch(engine, prompts)  # everything is cached now
        assert again == got
        assert all(o.num_cached_tokens >= (len(p) - 1) // 16 * 16 for o, p in zip(outs2, prompts))
    else:
        assert all(o.num_cached_tokens == 0 for o in outs)
    assert engine.stats().kv_blocks_used == 0
    engine.core.scheduler.check_invariants()


def test_greedy_parity_under_forced_preemption(make_engine, prompts, hf_reference):
    engine = make_engine(max_num_batched_tokens=64, num_blocks=160, max_num_seqs=16)
    got, _ = run_batch(engine, prompts)
    assert engine.stats().num_preemptions > 0, "the tiny KV budget should have forced preemption"
    for i, (g, ref) in enumerate(zip(got, hf_reference)):
        assert_parity(g, ref, f"prompt {i} preempted run")
    assert engine.stats().kv_blocks_used == 0


def test_prompt_logprobs_match_hf(make_engine, prompts, hf_model):
    engine = make_engine(max_num_batched_tokens=64)
    chosen = [prompts[0], prompts[8], prompts[10]]
    llm = LLM.from_engine(engine)
    outs = llm.generate([{"prompt_token_ids": p} for p in chosen],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), use_tqdm=False)
    with torch.inference_mode():
        for p, o in zip(chosen, outs):
            logits = hf_model(torch.tensor([p])).logits[0].float()
            ref = torch.log_softmax(logits, dim=-1)
            assert o.prompt_logprobs[0] is None
            ours = torch.tensor([o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))])
            theirs = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
            assert (ours - theirs).abs().max().item() < 1e-3
            top = max(o.prompt_logprobs[1].items(), key=lambda kv: kv[1].logprob)[0]
            assert top == int(ref[0].argmax())


def test_seeded_sampling_same_alone_and_in_batch(make_engine):
    engine = make_engine(max_num_batched_tokens=128)
    llm = LLM.from_engine(engine)
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Tell me a story about a dragon.", sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [f"Write a poem number {i} about the sea." for i in range(5)]
    mixed = llm.generate(others[:2] + ["Tell me a story about a dragon."] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 2 + [sp] +
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 3, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate("Tell me a story about a dragon.", sp.replace(seed=4321), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_greedy_parity_with_decode_steps(make_engine, prompts, hf_reference):
    """Several greedy decode steps per engine step (decode_steps; float32 takes the runner's loop of forward passes)
    keep HF parity, the sequences ending at different tokens inside runs."""
    engine = make_engine(max_num_batched_tokens=2048, max_num_seqs=16, decode_steps=5)
    runner = engine.core.runner
    runs = []
    take = runner.run_decode_steps
    runner.run_decode_steps = lambda scheduled, out: runs.append(len(scheduled)) or take(scheduled, out)
    got, _ = run_batch(engine, prompts)
    assert runs and max(runs) == len(prompts), "no run of several steps over the whole batch"
    for i, (g, ref) in enumerate(zip(got, hf_reference)):
        assert_parity(g, ref, f"prompt {i} with decode steps")
    assert engine.stats().kv_blocks_used == 0
    engine.core.scheduler.check_invariants()
