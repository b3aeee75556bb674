"""The sampler draws from the distribution it is given: frequencies over many draws match the probabilities after
temperature, top-k, top-p and min-p; zero-probability tokens are never drawn; a seed gives the same stream alone or
in a batch."""

from __future__ import annotations

import torch

from kvserve.core.request import Request
from kvserve.sampling import SamplingParams
from kvserve.worker.sampler import Sampler

VOCAB = 4096  # the sampler does not depend on the size; a small vocabulary keeps 4,000 draws quick


def _req(rid: str, **kw) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**kw), 16)


def _logits(probs: dict[int, float]) -> torch.Tensor:
    row = torch.full((VOCAB,), float("-inf"))
    for tok, p in probs.items():
        row[tok] = torch.log(torch.tensor(p))
    return row


def _frequencies(sampler: Sampler, logits: torch.Tensor, reqs: list[Request], draws: int) -> list[dict[int, float]]:
    counts: list[dict[int, int]] = [{} for _ in reqs]
    batch = logits.expand(len(reqs), -1).contiguous() if logits.dim() == 1 else logits
    for _ in range(draws):
        tokens, _ = sampler(batch.clone(), reqs)
        for c, (t,) in zip(counts, tokens):
            c[t] = c.get(t, 0) + 1
    return [{t: n / draws for t, n in c.items()} for c in counts]


def test_frequencies_match_the_filtered_distribution():
    torch.manual_seed(0)
    probs = {7: 0.5, 100: 0.25, 1000: 0.15, 3000: 0.07, 4095: 0.03}
    logits = _logits(probs)
    reqs = [_req("plain", temperature=1.0, seed=1), _req("topk", temperature=1.0, top_k=2, seed=2),
            _req("topp", temperature=1.0, top_p=0.8, seed=3), _req("minp", temperature=1.0, min_p=0.2, seed=4),
            _req("hot", temperature=2.0, seed=5)]
    draws = 4000
    freq = _frequencies(Sampler(), logits, reqs, draws)
    hot = {t: p ** 0.5 for t, p in probs.items()}
    z = sum(hot.values())
    expected = [probs, {7: 2 / 3, 100: 1 / 3}, {7: 0.5 / 0.9, 100: 0.25 / 0.9, 1000: 0.15 / 0.9},
                {7: 0.5 / 0.9, 100: 0.25 / 0.9, 1000: 0.15 / 0.9}, {t: v / z for t, v in hot.items()}]
    for r, got, want in zip(reqs, freq, expected):
        assert set(got) <= set(want), f"{r.request_id}: drew a filtered-out or impossible token {set(got) - set(want)}"
        for tok, p in want.items():
            sd = (p * (1 - p) / draws) ** 0.5
            assert abs(got.get(tok, 0.0) - p) < 5 * sd + 1e-3, (r.request_id, tok, got.get(tok), p)


def test_a_seed_gives_the_same_stream_alone_and_in_a_batch():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    alone, batched = Sampler(), Sampler()
    seq_alone, seq_batched = [], []
    for _ in range(20):
        seq_alone.append(alone(logits[1:2].clone(), [_req("s", temperature=0.9, top_p=0.95, seed=42)])[0][0][0])
        reqs = [_req("a", temperature=1.0), _req("s", temperature=0.9, top_p=0.95, seed=42), _req("g", temperature=0)]
        seq_batched.append(batched(logits.clone(), reqs)[0][1][0])
    assert seq_alone == seq_batched
    assert len(set(seq_alone)) > 1  # it samples, it is not stuck on one token


def test_verification_keeps_the_target_distribution():
    """Chi-square over seeded draws on a 6-token vocabulary: with a draft (any fixed token) at each of two
    positions, the first output token is distributed as the target's p0, and the second, given a kept first draft,
    as p1. A verifier that kept drafts too often (or resampled wrongly) would skew both."""
    p0 = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.15, 0.05])
    p1 = torch.tensor([0.30, 0.05, 0.05, 0.20, 0.10, 0.30])
    logits = torch.stack([p0.log(), p1.log(), torch.zeros(6)])  # rows: after the last token, after d0, after d1
    drafts = [3, 0]  # deterministic proposals, as a draft model's argmax or a text lookup would make
    n = 6000
    first = torch.zeros(6)
    second = torch.zeros(6)
    for seed in range(n):
        sampler = Sampler()
        (toks,), _ = sampler(logits.clone(), [_req(f"r{seed}", temperature=1.0, seed=seed)], [drafts])
        first[toks[0]] += 1
        if toks[0] == drafts[0]:
            second[toks[1]] += 1

    def chi2(counts, p):
        expected = counts.sum() * p
        return float(((counts - expected) ** 2 / expected).sum())

    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert chi2(first, p0) < 20.5, first
    assert chi2(second, p1) < 20.5, second
    assert second.sum() > 0.2 * n  # the draft was kept about p0[3] = 25% of the time
