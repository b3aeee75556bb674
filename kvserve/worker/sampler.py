"""Logits -> next tokens: penalties, greedy, temperature, top-k/p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

import random

import torch

from kvserve.core.outputs import TokenLogprobs
from kvserve.core.request import Request


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """logprobs: (R, V) log-softmax rows; token_ids: (R,). Returns (id, logprob, rank, top-k pairs) per row."""
    chosen = logprobs.gather(1, token_ids[:, None])  # (R, 1)
    ranks = (logprobs > chosen).sum(dim=1) + 1  # (R,)
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out = []
    for i, (tok, lp, rank) in enumerate(zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist())):
        top = list(zip(top_ids[i], top_vals[i])) if k > 0 else []
        out.append((tok, lp, rank, top))
    return out


def greedy_argmax():
    """torch.argmax(rows, dim=-1) for float32 logits: the native kernel where the kernels built (the same
    first-maximum and NaN rules; ~7 us against torch's ~29 us over one 49k-vocabulary row, a measurable share of a
    3 ms batch-1 step: docs/benchmarks.md), else torch's."""
    from kvserve import kernels

    mod = kernels.fused_ops_module()
    if mod is None:
        return lambda x: x.argmax(dim=-1)

    def argmax(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] and x.is_contiguous():
            return mod.argmax_rows(x)
        return x.argmax(dim=-1)

    return argmax


class Sampler:
    """Stateless but for one torch.Generator per request: a seeded request draws the same tokens whatever else
    is in the batch, and preemption (which recomputes KV but keeps sampled tokens) does not disturb its stream."""

    def __init__(self, argmax=None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self.argmax = argmax or greedy_argmax()  # greedy rows' token: (R, V) float32 -> (R,) int64

    def drop(self, request_ids) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, req: Request) -> torch.Generator:
        g = self._generators.get(req.request_id)
        if g is None:
            seed = req.sampling_params.seed
            g = torch.Generator()
            g.manual_seed((seed if seed is not None else random.getrandbits(63)) % (2**63))
            for _ in range(req.sampler_draws):  # continues a P/D prefill's stream: the draws it made there
                torch.rand(1, generator=g)
            self._generators[req.request_id] = g
        return g

    def __call__(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]] | None = None) \
            -> tuple[list[list[int]], list[list[TokenLogprobs] | None]]:
        """logits: (R, V) float32, one row per request, or with `drafts` 1 + len(drafts[i]) rows per request (the
        row after its last token, then after each draft). Returns each request's sampled tokens (one, or the drafts
        accepted plus the token sampled after them) and their logprobs where asked."""
        if drafts is not None:
            return self._verify(logits, requests, drafts)
        num_lp = [r.sampling_params.logprobs for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in num_lp) else None
        logits = self._apply_penalties(logits, requests)
        tokens = torch.empty(len(requests), dtype=torch.long)
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        rand = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if len(greedy) == len(requests):  # the common all-greedy batch: no row copies
            tokens = self.argmax(logits)
        elif greedy:
            tokens[greedy] = self.argmax(logits[greedy])
        if rand:
            tokens[rand] = self._sample_random(logits[rand], [requests[i] for i in rand])
        lps: list[list[TokenLogprobs] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            rows = [i for i, k in enumerate(num_lp) if k is not None]
            kmax = max(num_lp[i] for i in rows)
            for i, tl in zip(rows, token_logprobs(raw_logprobs[rows], tokens[rows], kmax)):
                lps[i] = [(tl[0], tl[1], tl[2], tl[3][: num_lp[i]])]
        return [[t] for t in tokens.tolist()], lps

    def _verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]) \
            -> tuple[list[list[int]], list[list[TokenLogprobs] | None]]:
        """Speculative verification, lossless by construction: the token at each position is sampled exactly as
        decoding without drafts would sample it there (same penalties over the tokens before it, same per-request
        random draw, taken in the same order), and a draft is kept only while it equals that token. A text draft
        is a draft distribution of probability 1, for which this is the rejection-sampling rule (accept with the
        target's probability of the draft, else resample from the rest); a seeded request gives the same tokens
        with and without speculation, and draws no number for positions past the first rejection."""
        owners: list[int] = []
        extras: list[list[int]] = []
        for i, d in enumerate(drafts):
            for j in range(len(d) + 1):
                owners.append(i)
                extras.append(d[:j])
        row_reqs = [requests[i] for i in owners]
        num_lp = [r.sampling_params.logprobs for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in num_lp) else None
        logits = self._apply_penalties(logits, row_reqs, extras)
        greedy_rows = [r for r, i in enumerate(owners) if requests[i].sampling_params.greedy]
        rand_rows = [r for r, i in enumerate(owners) if not requests[i].sampling_params.greedy]
        best: dict[int, int] = {}
        if greedy_rows:
            best = dict(zip(greedy_rows, self.argmax(logits[greedy_rows]).tolist()))
        cum_of: dict[int, int] = {}
        if rand_rows:
            probs = self._probs(logits[rand_rows], [row_reqs[r] for r in rand_rows])  # (Rr, V)
            cum = probs.double().cumsum(dim=1)  # float64 as in _sample_random
            cum_of = {r: k for k, r in enumerate(rand_rows)}
        tokens: list[list[int]] = []
        used_rows: list[int] = []
        row = 0
        for i, (req, d) in enumerate(zip(requests, drafts)):
            toks: list[int] = []
            for j in range(len(d) + 1):
                r = row + j
                if r in best:
                    t = best[r]
                else:
                    c = cum[cum_of[r]]
                    u = torch.rand(1, generator=self._generator(req)).item()  # the draw _sample_random makes
                    target = torch.tensor([u], dtype=torch.float64) * c[-1]
                    t = int(torch.searchsorted(c, target, right=True).clamp_(max=c.shape[0] - 1))
                toks.append(t)
                used_rows.append(r)
                if j == len(d) or t != d[j]:
                    break
            tokens.append(toks)
            row += len(d) + 1
        lps: list[list[TokenLogprobs] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            rows = [r for r in used_rows if num_lp[owners[r]] is not None]
            kmax = max(num_lp[owners[r]] for r in rows)
            flat = [t for toks in tokens for t in toks]
            by_row = dict(zip(used_rows, flat))
            for r, tl in zip(rows, token_logprobs(raw_logprobs[rows], torch.tensor([by_row[r] for r in rows]), kmax)):
                i = owners[r]
                lps[i] = (lps[i] or []) + [(tl[0], tl[1], tl[2], tl[3][: num_lp[i]])]
        return tokens, lps

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request],
                         extras: list[list[int]] | None = None) -> torch.Tensor:
        """`extras[i]`: tokens taken as already generated before row i (the drafts before a verified position)."""
        def extra(i: int) -> list[int]:
            return extras[i] if extras is not None else []

        rows = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties or
                (r.sampling_params.min_tokens and r.num_output_tokens + len(extra(i)) < r.sampling_params.min_tokens)]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            req, sp, row = requests[i], requests[i].sampling_params, logits[i]
            if sp.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(t for t in (*req.token_ids, *extra(i)) if t < vocab)),
                                    dtype=torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
            if sp.presence_penalty or sp.frequency_penalty:
                out = [t for t in (*req.output_token_ids, *extra(i)) if t < vocab]
                if out:
                    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()
                    row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).float()
            if sp.min_tokens and req.num_output_tokens + len(extra(i)) < sp.min_tokens:
                banned = [t for t in (*sp.stop_token_ids, *([] if sp.ignore_eos else req.eos_token_ids)) if t < vocab]
                if banned:
                    row[banned] = float("-inf")
        return logits

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        # logits: (B, V)
        probs = self._probs(logits, requests)
        # Inverse CDF: one uniform draw per row from its own generator, then a batched search of the cumulative
        # (unnormalised) probabilities. An exponential race (argmax p / E) needs a draw per vocabulary entry: 49k per
        # row, ~0.7 ms each on this CPU, a third of a 64-sequence decode step.
        u = torch.tensor([torch.rand(1, generator=self._generator(r)).item() for r in requests],
                         dtype=torch.float64)  # (B,)
        cum = probs.double().cumsum(dim=1)  # (B, V); float64 so a 49k-term sum keeps every small probability
        target = (u * cum[:, -1]).unsqueeze(1)  # (B, 1), below each row's total
        # the first entry whose cumulative sum passes the target: never one of zero probability (its sum equals the
        # entry before it, which would have passed already)
        return torch.searchsorted(cum, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)

    @staticmethod
    def _probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """(B, V) logits -> (B, V) probabilities after temperature, top-k, top-p and min-p (unnormalised after the
        cut-offs: the draw scales by each row's total)."""
        temps = torch.tensor([r.sampling_params.temperature for r in requests], dtype=torch.float32)
        logits = logits / temps[:, None]
        top_ks = [r.sampling_params.top_k for r in requests]
        if any(top_ks):
            vocab = logits.shape[1]
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks])
            kth = logits.topk(int(ks.max()), dim=1).values.gather(1, (ks - 1)[:, None])  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_ps = torch.tensor([r.sampling_params.top_p for r in requests], dtype=torch.float32)
        if (top_ps < 1.0).any():
            sorted_p, idx = probs.sort(dim=1, descending=True)
            cum = sorted_p.cumsum(dim=1)
            drop = (cum - sorted_p) > top_ps[:, None]  # keep the smallest prefix reaching top_p (always the first)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        min_ps = torch.tensor([r.sampling_params.min_p for r in requests], dtype=torch.float32)
        if (min_ps > 0).any():
            thresh = probs.max(dim=1, keepdim=True).values * min_ps[:, None]
            probs = probs.masked_fill(probs < thresh, 0.0)
        return probs
