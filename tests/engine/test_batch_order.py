"""Prefix-grouped admission order for offline batches (kvserve.engine.batch_order) and `LLM(batch_reorder=...)`."""

from __future__ import annotations

import inspect
import random

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.batch_order import prefix_grouped_order


# ------------------------------------------------------------------ the order, on hand-built prompts (block_size 2)
def test_deepest_shared_prefix_first_then_longer_decodes_ties_by_index():
    prompts = [
        [1, 2, 3, 4, 9, 9],      # 0: A B (9,9)
        [5, 6, 7, 8],            # 1: C (7,8)
        [1, 2, 3, 4, 8, 8],      # 2: A B (8,8)
        [5, 6, 1, 1],            # 3: C (1,1)
        [1, 2, 7, 7],            # 4: A (7,7)
        [1, 2, 3, 4, 9, 9, 1],   # 5: A B (9,9) + a partial block
        [4],                     # 6: no full block
        [8, 8, 8],               # 7: (8,8) at the root: shares no block with 2's (8,8), which follows A B
    ]
    max_tokens = [10, 5, 3, 5, 3, 20, 1, None]
    # A B (9,9) is shared by 0 and 5 (three blocks): first, longer decode first; then the rest of A B (2), then the
    # rest of A (4); then C's group (one block), tie on max_tokens broken by index; then the root's own group,
    # None (up to the context) being the longest decode
    assert prefix_grouped_order(prompts, max_tokens, block_size=2) == [5, 0, 2, 4, 1, 3, 7, 6]


def test_deeper_sibling_group_goes_first_whatever_the_input_order():
    shallow = [[1, 1, 10 + i, 0] for i in range(3)]  # share one block
    deep = [[2, 2, 3, 3, 4, 4, 20 + i, 0] for i in range(3)]  # share three blocks
    other = [[7, 7, 30 + i, 0] for i in range(2)]  # share one block, first seen after `shallow`
    prompts = shallow + deep + other
    assert prefix_grouped_order(prompts, [8] * len(prompts), block_size=2) == [3, 4, 5, 0, 1, 2, 6, 7]


def test_prompt_that_is_a_prefix_of_another():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 2]]
    # 0 and 1 share two blocks (0 ends there, 1 goes on alone): one group; 2 shares only the first block
    assert prefix_grouped_order(prompts, [4, 4, 4], block_size=2) == [0, 1, 2]
    assert prefix_grouped_order(prompts, [4, 9, 4], block_size=2) == [1, 0, 2]
    assert prefix_grouped_order(prompts, [4, 4, 99], block_size=2) == [0, 1, 2]  # a shallower group never jumps


def test_prompts_sharing_no_full_block_order_by_decode_length():
    prompts = [[1], [2, 3, 4], [2, 3, 5], [5, 6, 7], [1]]  # equal prompts shorter than a block share nothing
    assert prefix_grouped_order(prompts, [3, 3, 5, 3, 7], block_size=4) == [4, 2, 0, 1, 3]
    assert prefix_grouped_order([], [], block_size=16) == []
    assert prefix_grouped_order([[1, 2]], [1], block_size=16) == [0]
    with pytest.raises(ValueError):
        prefix_grouped_order([[1]], [], block_size=16)


def test_random_batch_groups_are_contiguous_and_nested():
    rng = random.Random(3)
    bs = 4
    roots = [[rng.randrange(1000) for _ in range(bs * rng.randint(1, 4))] for _ in range(5)]
    subs = [(r, [rng.randrange(1000) for _ in range(bs * rng.randint(1, 2))]) for r in range(5) for _ in range(2)]
    prompts, where = [], []
    for i in range(200):
        r, sub = subs[rng.randrange(len(subs))]
        deeper = rng.random() < 0.5
        tail = [rng.randrange(1000) for _ in range(rng.randint(1, 2 * bs))]
        prompts.append(roots[r] + (sub if deeper else []) + tail)
        where.append((r, tuple(sub) if deeper else None))
    order = prefix_grouped_order(prompts, [rng.randint(1, 50) for _ in prompts], block_size=bs)
    assert sorted(order) == list(range(len(prompts)))
    seq_roots = [where[i][0] for i in order]
    seq_subs = [where[i] for i in order]

    def contiguous(seq):
        seen, prev = set(), object()
        for x in seq:
            if x != prev:
                assert x not in seen, f"{x} appears in two separate runs"
                seen.add(x)
                prev = x

    contiguous(seq_roots)
    contiguous([s for s in seq_subs if s[1] is not None])
    for r in range(5):  # inside a root's run, its deeper subgroups come before the requests sharing only the root
        run = [s for s in seq_subs if s[0] == r]
        firsts = [k for k, s in enumerate(run) if s[1] is None]
        if firsts:
            assert all(s[1] is None for s in run[firsts[0]:])


def test_large_batch_orders_in_well_under_a_second():
    import time

    rng = random.Random(0)
    prefixes = [[rng.randrange(100, 40_000) for _ in range(1024)] for _ in range(32)]
    prompts = [prefixes[i % 32] + [rng.randrange(100, 40_000) for _ in range(rng.randint(32, 128))]
               for i in range(1024)]
    rng.shuffle(prompts)
    started = time.perf_counter()
    order = prefix_grouped_order(prompts, [rng.randint(32, 128) for _ in prompts], block_size=16)
    assert time.perf_counter() - started < 1.0
    groups = [prompts[i][:1024] for i in order]
    assert sum(a != b for a, b in zip(groups, groups[1:])) == 31  # 32 runs, one per prefix


# ------------------------------------------------------------------ LLM.generate on the real model, float32
def test_batch_reorder_is_on_by_default():
    assert inspect.signature(LLM).parameters["batch_reorder"].default is True


def _workload(seed: int):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40_000) for _ in range(48)] for _ in range(3)]
    prompts = [prefixes[i % 3] + [rng.randrange(100, 40_000) for _ in range(rng.randint(4, 20))] for i in range(12)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(4, 10), ignore_eos=True) for _ in prompts]
    return prompts, params


def test_reordered_outputs_identical_and_in_input_order(make_engine):
    prompts, params = _workload(0)
    runs = {}
    for reorder in (False, True):
        # a pool of 10 blocks (two requests of 5): in the shuffled order a prefix is mostly gone by
        # the time its next request comes
        engine = make_engine(num_blocks=10, max_num_seqs=2, max_num_batched_tokens=64)
        llm = LLM.from_engine(engine, batch_reorder=reorder)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs[reorder] = (outs, engine.stats())
    (plain, plain_stats), (grouped, grouped_stats) = runs[False], runs[True]
    for p, sp, a, b in zip(prompts, params, plain, grouped):
        assert a.prompt_token_ids == b.prompt_token_ids == p  # each output is its own prompt's, in input order
        assert len(b.outputs[0].token_ids) == sp.max_tokens
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    # the engine saw the requests in the grouped order (request ids are numbered as they are added)
    added = sorted(range(len(prompts)), key=lambda i: int(grouped[i].request_id.split("-")[1]))
    expected = prefix_grouped_order(prompts, [sp.max_tokens for sp in params], 16)
    assert added == expected != list(range(len(prompts)))
    # and computed each shared prefix fewer times
    assert grouped_stats.prompt_tokens_computed < plain_stats.prompt_tokens_computed
    assert grouped_stats.prefix_cache.hit_tokens > plain_stats.prefix_cache.hit_tokens
