"""The draft proposers, exactly: n-gram index, suffix trees (counts, removal, bounds, scopes), adaptive lengths."""

from __future__ import annotations

import random

import pytest

from kvserve.config import SpeculativeConfig
from kvserve.core.request import Request
from kvserve.sampling import SamplingParams
from kvserve.spec.decoder import SpecDecoder, StepCostModel
from kvserve.spec.ngram import NgramIndex
from kvserve.spec.suffix import SuffixCache, SuffixTree


def test_ngram_takes_the_longest_then_latest_match():
    idx = NgramIndex(2, 3)
    idx.extend([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3])
    # suffix (1, 2, 3) occurred at 0..2, followed by 4, 9, 2
    assert idx.propose(3) == [4, 9, 2]
    idx.extend([8, 2, 3])
    # (8, 2, 3) never occurred before; (2, 3) last occurred at 10..11, followed by 8, 2, 3
    assert idx.propose(5) == [8, 2, 3]
    assert NgramIndex(2, 3).propose(4) == []
    idx2 = NgramIndex(2, 2)
    idx2.extend([5, 6, 7])
    assert idx2.propose(4) == []  # the suffix itself is not a match


def test_ngram_agrees_with_a_scan():
    rng = random.Random(0)
    toks = [rng.randrange(6) for _ in range(400)]
    idx = NgramIndex(1, 4)
    for i, t in enumerate(toks):
        idx.extend([t])
        seq = toks[:i + 1]
        want = []
        for n in range(min(4, len(seq)), 0, -1):
            suffix = seq[len(seq) - n:]
            starts = [s for s in range(len(seq) - n) if seq[s:s + n] == suffix]
            if starts:
                want = seq[starts[-1] + n:starts[-1] + n + 3]
                break
        assert idx.propose(3) == want, i


def _count(tree: SuffixTree, path: list[int]) -> int:
    node = tree.root
    for t in path:
        node = node.children.get(t)
        if node is None:
            return 0
    return node.count


def test_suffix_tree_counts_and_removal():
    tree = SuffixTree(max_depth=3)
    tree.add([1, 2, 1, 2, 3])
    assert _count(tree, [1, 2]) == 2 and _count(tree, [2, 1]) == 1 and _count(tree, [1, 2, 3]) == 1
    assert _count(tree, [1, 2, 1, 2]) == 0  # deeper than max_depth
    tree.add([1, 2, 4])
    assert _count(tree, [1, 2]) == 3 and _count(tree, [2, 4]) == 1
    # most frequent continuation of [1]: 2 (3 times); of [1, 2]: 1, 3 or 4 once each; prob 1/3 per step
    draft, score = tree.speculate([9, 1], 4, 10.0, 0.0)
    assert draft[:1] == [2]
    tree.remove([1, 2, 4])
    assert _count(tree, [2, 4]) == 0 and _count(tree, [1, 2]) == 2
    tree.remove([1, 2, 1, 2, 3])
    assert not tree.root.children and tree.num_nodes == 0


def test_suffix_speculation_respects_factor_and_probability():
    tree = SuffixTree(max_depth=8)
    tree.add([5, 6, 7, 8, 9, 10, 11])
    assert tree.speculate([1, 5, 6], 10, 1.0, 0.1)[0] == [7, 8]  # matched 2 tokens, factor 1: at most 2
    assert tree.speculate([1, 5, 6], 10, 2.0, 0.1)[0] == [7, 8, 9, 10]
    tree.add([5, 6, 0])
    tree.add([5, 6, 1])
    # after [5, 6]: 7, 0, 1 once each (1/3 < 0.4): nothing drafted
    assert tree.speculate([5, 6], 10, 4.0, 0.4)[0] == []
    assert tree.speculate([5, 6], 10, 4.0, 0.3)[0] == [7, 8, 9, 10, 11]


def test_a_long_match_leaves_room_for_the_draft():
    """Paths stop at max_depth: matching the longest suffix (7 of 8) would leave room for one drafted token."""
    tree = SuffixTree(max_depth=8)
    tree.add(list(range(20)))
    assert tree.speculate(list(range(10)), 4, 4.0, 0.0)[0] == [10, 11, 12, 13]


def test_suffix_cache_is_bounded_and_scoped():
    cache = SuffixCache(max_depth=4, max_requests=2)
    cache.add("a", ("t1", ""), [1, 2, 3])
    cache.add("b", ("t2", ""), [4, 5, 6])
    assert cache.tree(("t1", "")).speculate([1], 3, 4.0, 0.0)[0] == [2, 3]
    assert cache.tree(("t2", "salt")) is None  # another salt of the same tenant sees nothing
    cache.add("c", ("t2", ""), [7, 8])
    assert cache.num_requests == 2 and cache.tree(("t1", "")) is None  # the oldest went, with its tree
    assert cache.tree(("t2", "")).speculate([4], 3, 4.0, 0.0)[0] == [5, 6]


def _req(rid: str, tokens: list[int], k: int | None = None) -> Request:
    r = Request(rid, tokens, SamplingParams(temperature=0, max_tokens=100, num_speculative_tokens=k), 16)
    r.num_computed_tokens = len(tokens) - 1
    return r


def test_draft_length_adapts_to_acceptance():
    dec = SpecDecoder(SpeculativeConfig("ngram", num_speculative_tokens=8))
    text = list(range(20)) * 3 + list(range(5))
    r = _req("a", text)
    dec.add("a", None, "default", None)
    dec.propose([r], 0)
    assert r.spec_token_ids == list(range(5, 13))  # no cost measured yet: the full k
    dec.observe_verification("a", 8, 1)  # rejected after 1: k -> (8 + 2) // 2
    dec.propose([r], 0)
    assert len(r.spec_token_ids) == 5
    for _ in range(3):
        dec.observe_verification("a", 5, 0)
    dec.propose([r], 0)
    assert r.spec_token_ids == []  # three misses in a row: paused
    for _ in range(2):
        dec.propose([r], 0)
    assert r.spec_token_ids  # after 2 steps: probes again


def test_per_request_k_and_off():
    dec = SpecDecoder(SpeculativeConfig("ngram", num_speculative_tokens=8))
    text = list(range(20)) * 3
    a, b = _req("a", text), _req("b", text)
    dec.add("a", 3, "default", None)
    dec.add("b", 0, "default", None)
    dec.propose([a, b], 0)
    assert len(a.spec_token_ids) == 3 and b.spec_token_ids == []


def test_step_cost_backs_off_when_compute_bound():
    dec = SpecDecoder(SpeculativeConfig("ngram", num_speculative_tokens=4))
    text = list(range(10)) * 4
    reqs = [_req(f"r{i}", text) for i in range(8)]
    for r in reqs:
        dec.add(r.request_id, None, "default", None)
    for n in (1, 2, 4, 8, 16, 32, 64):  # flat up to 8 tokens, then linear: compute-bound
        dec.observe_step(n, 0.01 * max(1, n / 8))
    dec.propose(reqs, 0)
    assert sum(len(r.spec_token_ids) for r in reqs) == 0  # 8 decodes already fill the flat part
    dec.propose(reqs[:1], 0)
    assert len(reqs[0].spec_token_ids) == 4  # alone: drafts are free up to 8 tokens
    model = StepCostModel()
    model.observe(3, 1.0)
    assert model.cost(3) == model.cost(4) == 1.0 and model.cost(7) == 1.0 and model.cost(1) is None
    for _ in range(5):
        model.observe(4, 0.01)
    model.observe(4, 0.5)  # one slow step among fast ones does not move the price of the bucket
    assert model.cost(4) == 0.01
    for _ in range(model.window):  # a lasting change does, once it is most of the window
        model.observe(4, 0.02)
    assert model.cost(4) == 0.02
    model.observe(8, 0.04)  # up to 8 tokens every size is its own price (no padding there); past 8, powers of two
    assert model.cost(6) == pytest.approx(0.03) and model.cost(5) == pytest.approx(0.025)
    model.observe(5, 0.021)
    assert model.cost(5) == 0.021 and model.cost(8) == 0.04 and model.cost(12) == 0.04


def test_step_cost_counts_the_context_each_row_reads():
    """Steps priced by tokens and by the KV their rows read: a verification row is cheap at a short context and
    dear at a long one, and the rule drafts accordingly; the fit ignores a slow outlier."""
    per_kv = 2e-6  # seconds per attended KV token: 2 ms for a row at 1,000 tokens
    base = {1: 0.008, 2: 0.0085, 4: 0.009, 8: 0.012}

    def observed(model_or_dec, observe):
        for ctx in (300, 700, 1100, 1500, 1900, 2300):
            for n, b in base.items():
                observe(n, b + per_kv * n * ctx, n * ctx)
        observe(1, 0.5, 1000)  # one slow step

    model = StepCostModel()
    observed(model, model.observe)
    assert model.per_kv == pytest.approx(per_kv)
    # 3 tokens unmeasured: on the line between the 2- and 4-token bases (sizes up to 8 run unpadded)
    assert model.cost(3, 3 * 500) == pytest.approx((base[2] + base[4]) / 2 + per_kv * 1500)
    assert model.cost(1, 1000) == pytest.approx(base[1] + per_kv * 1000)

    dec = SpecDecoder(SpeculativeConfig("ngram", num_speculative_tokens=4))
    observed(dec, dec.observe_step)
    short, long = _req("short", list(range(10)) * 4), _req("long", list(range(10)) * 4)
    long.num_computed_tokens = 6000  # as if its KV held 6,000 tokens: a draft row costs 12 ms, more than a step
    for r in (short, long):
        dec.add(r.request_id, None, "default", None)
    dec.propose([short], 0)
    assert len(short.spec_token_ids) == 3  # 4 tokens cost 9 ms; a fifth adds 0.75 ms (on the line to 8 tokens' 12)
    dec.propose([long], 0)
    assert long.spec_token_ids == []
