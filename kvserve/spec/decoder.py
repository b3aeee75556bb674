"""SpecDecoder: proposes each running request's drafts after a step and adapts how many it verifies.

It sits in the engine core between `Scheduler.update` and the next `Scheduler.schedule`, and only writes
`Request.spec_token_ids` (drafts beside the tokens, never in them: docs/speculative.md). The scheduler budgets and
rolls back; the sampler verifies. Pure Python: no torch.

Adaptivity has two levels.
- Per request (PEARL/ATTS-style): k grows by half on full acceptance, falls toward the accepted length + 1 on a
  rejection; after 3 drafts in a row with nothing accepted the request stops drafting for 2, 4, ... 32 steps.
- Per step: the draft tokens kept are those that maximise expected tokens per second,
  (decodes + expected accepted) / T(tokens in the step), with T measured from the engine's own steps (an EWMA per
  power-of-two token count). Each extra draft of a request with acceptance rate a is worth a^j; on a CPU the step
  cost is flat for small batches and grows once the step is compute-bound, so drafts back off as the batch grows.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from kvserve.config import SpeculativeConfig
from kvserve.core.outputs import DRAFT_PENDING
from kvserve.spec.ngram import NgramIndex
from kvserve.spec.suffix import SuffixCache, SuffixTree

MISSES_BEFORE_PAUSE = 3
MAX_PAUSE_STEPS = 32
PRIOR_ACCEPTANCE = 0.5  # per-token acceptance assumed for a request with no history (blended with the method's)
DECAY = 0.8  # weight of a request's past acceptance counts per verification


@dataclass
class SpecStats:
    """Cumulative drafting counters for one engine (its one method)."""

    method: str
    num_drafts: int = 0  # verifications with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # acceptance_lengths[a]: verifications that accepted exactly a draft tokens
    acceptance_lengths: list[int] = field(default_factory=list)
    num_backed_off: int = 0  # draft tokens proposed but dropped by the step-cost rule
    suffix_cached_requests: int = 0
    suffix_tree_nodes: int = 0
    step_cost_s: dict[int, float] = field(default_factory=dict)  # StepCostModel.curve() at the snapshot


class StepCostModel:
    """Seconds per forward pass, learnt from the engine's steps: base(tokens) + per_kv x attended, where `tokens` is
    bucketed (each size up to EXACT_TOKENS, where the runner pads nothing, then powers of two, as it pads) and
    `attended` is the KV the step's rows read (the sum over rows of the tokens each
    attends to). Without the attention term one bucket's price would be the context of whichever requests happened
    to run at that size: on SmolLM2 a verification row at 2k tokens of context costs about as much attention as a
    third of the one-token step's matmuls, so a bucket measured at long contexts looked too dear to draft into at
    short ones, and was then never measured again to correct it.

    Both parts are medians over each bucket's last `window` observations (per_kv: of the slopes between pairs of
    observations in one bucket, Theil-Sen), so one slow step (a page fault, another process on the core) does not
    move a price."""

    def __init__(self, window: int = 15, refit_every: int = 16):
        self.window = window
        self.refit_every = refit_every
        self.per_kv = 0.0  # seconds per attended KV token
        self.base: dict[int, float] = {}  # bucket -> seconds at no attended KV
        self._recent: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (attended, seconds)
        self._observed = 0

    EXACT_TOKENS = 8  # decode rows alone up to GEMV_MAX_TOKENS run unpadded (ModelRunner.build_batch)

    @staticmethod
    def bucket(n: int) -> int:
        return max(n, 1) if n <= StepCostModel.EXACT_TOKENS else 1 << (n - 1).bit_length()

    def observe(self, num_tokens: int, seconds: float, attended: int = 0) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        b = self.bucket(num_tokens)
        self._recent.setdefault(b, deque(maxlen=self.window)).append((attended, seconds))
        self._observed += 1
        if self._observed % self.refit_every == 1:  # the slope moves slowly: refit it now and then, every base too
            self._fit_slope()
            for k in self._recent:
                self._fit_base(k)
        else:
            self._fit_base(b)

    def _fit_slope(self) -> None:
        slopes = []
        for recent in self._recent.values():
            pts = list(recent)
            for i, (a0, s0) in enumerate(pts):
                for a1, s1 in pts[i + 1:]:
                    if abs(a1 - a0) * 5 >= max(a0, a1) > 0:  # contexts at least 20% apart: a slope worth reading
                        slopes.append((s1 - s0) / (a1 - a0))
        if slopes:
            self.per_kv = max(statistics.median(slopes), 0.0)

    def _fit_base(self, b: int) -> None:
        self.base[b] = max(statistics.median(s - self.per_kv * a for a, s in self._recent[b]), 0.0)

    def cost(self, num_tokens: int, attended: int = 0) -> float | None:
        """Predicted seconds of a step of `num_tokens` reading `attended` KV tokens: the bucket's base; else, between
        two measured buckets, the straight line through them; else the largest measured bucket's below it
        (optimistic, so an unmeasured size gets tried once and measured); plus the attention. None before any
        step."""
        b = self.bucket(num_tokens)
        base = self.base.get(b)
        if base is None:
            below = [k for k in self.base if k < b]
            if not below:
                return None
            lo = max(below)
            above = [k for k in self.base if k > b]
            base = self.base[lo]
            if above:
                hi = min(above)
                base += (self.base[hi] - base) * (b - lo) / (hi - lo)
        return base + self.per_kv * attended

    def curve(self) -> dict[int, float]:
        """The median measured seconds per bucket (at whatever contexts ran), for stats and benchmarks."""
        return {b: statistics.median(s for _, s in self._recent[b]) for b in sorted(self._recent)}


class _RequestState:
    __slots__ = ("max_k", "k", "misses", "paused_until", "acc", "rej", "fed", "ngram", "local", "scope")

    def __init__(self, max_k: int, scope: tuple[str, str]):
        self.max_k = max_k
        self.k = max_k
        self.misses = 0
        self.paused_until = 0
        self.acc = 0.0  # decayed counts of accepted / rejected draft tokens
        self.rej = 0.0
        self.fed = 0  # request tokens already in the index / local tree
        self.ngram: NgramIndex | None = None
        self.local: SuffixTree | None = None
        self.scope = scope

    def acceptance(self, prior: float) -> float:
        return smoothed_rate(self.acc, self.rej, prior)


def _context(req) -> int:
    """KV tokens a decode or draft row of `req` attends to."""
    return req.num_kv_tokens + 1


def _attended(decoding: list) -> int:
    return sum(_context(r) for r in decoding)


def attended_kv(start: int, num_tokens: int) -> int:
    """KV tokens read by a chunk of `num_tokens` rows over `start` tokens of KV (row j attends start + j + 1)."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


def smoothed_rate(accepted: float, rejected: float, prior: float) -> float:
    """Per-token acceptance estimate: counts plus two pseudo-observations at `prior`."""
    return (accepted + 2 * prior) / (accepted + rejected + 2)


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.stats = SpecStats(config.method, acceptance_lengths=[0] * (config.num_speculative_tokens + 1))
        self.cost = StepCostModel()
        self.draft_seconds_per_iteration: float | None = None  # model drafting: one draft forward pass, EWMA
        self._states: dict[str, _RequestState] = {}
        self._step = 0
        self._method_acc = 0.0
        self._method_rej = 0.0
        c = config
        self.suffix_cache = SuffixCache(c.suffix_decoding_max_tree_depth, c.suffix_decoding_max_cached_requests) \
            if c.method == "suffix" else None

    # ------------------------------------------------------------------ request lifetime
    def add(self, request_id: str, requested_k: int | None, tenant: str, cache_salt: str | None) -> None:
        max_k = self.config.num_speculative_tokens if requested_k is None else min(requested_k,
                                                                                  self.config.num_speculative_tokens)
        if max_k > 0:
            self._states[request_id] = _RequestState(max_k, (tenant, cache_salt or ""))

    def finish(self, request_id: str, output_token_ids: list[int]) -> None:
        st = self._states.pop(request_id, None)
        if st is not None and self.suffix_cache is not None:
            self.suffix_cache.add(request_id, st.scope, output_token_ids)

    # ------------------------------------------------------------------ after each step
    def observe_step(self, num_tokens: int, seconds: float, attended: int = 0) -> None:
        self.cost.observe(num_tokens, seconds, attended)

    def observe_draft(self, iterations: int, seconds: float) -> None:
        if iterations <= 0:
            return
        per = seconds / iterations
        old = self.draft_seconds_per_iteration
        self.draft_seconds_per_iteration = per if old is None else 0.8 * old + 0.2 * per

    def observe_verification(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """One request's verification result: stats, and its draft length for the next step."""
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafted
        s.num_accepted_tokens += num_accepted
        s.acceptance_lengths[num_accepted] += 1
        rejected = int(num_accepted < num_drafted)
        self._method_acc += num_accepted
        self._method_rej += rejected
        st = self._states.get(request_id)
        if st is None or not self.config.adaptive:
            return
        st.acc = DECAY * st.acc + num_accepted
        st.rej = DECAY * st.rej + rejected
        if not rejected:
            if num_drafted >= st.k:
                st.k = min(st.max_k, st.k + max(1, st.k // 2))
            st.misses = 0
        else:
            st.k = max(1, (st.k + num_accepted + 1) // 2)
            st.misses = st.misses + 1 if num_accepted == 0 else 0
            if st.misses >= MISSES_BEFORE_PAUSE:
                pause = min(2 ** (st.misses - MISSES_BEFORE_PAUSE + 1), MAX_PAUSE_STEPS)
                st.paused_until = self._step + pause

    def propose(self, decoding: list, other_tokens: int, other_attended: int = 0) -> None:
        """Set `spec_token_ids` of each request in `decoding` (running, one token to compute). `other_tokens`:
        prefill tokens expected in the next step beside the decodes, `other_attended` the KV they will read (the
        step-cost rule counts both)."""
        self._step += 1
        candidates: list[tuple[object, list[int], float]] = []
        method_prior = smoothed_rate(self._method_acc, self._method_rej, PRIOR_ACCEPTANCE)
        for req in decoding:
            req.spec_token_ids = []
            st = self._states.get(req.request_id)
            if st is None:
                continue
            self._feed(st, req.token_ids)
            if st.paused_until > self._step:
                continue
            room = min(st.k if self.config.adaptive else st.max_k, req.max_tokens - req.num_output_tokens - 1)
            if room <= 0:
                continue
            draft = [DRAFT_PENDING] * room if self.config.drafts_with_model else self._draft(st, req.token_ids, room)
            if draft:
                candidates.append((req, draft, st.acceptance(method_prior)))
        if not candidates:
            return
        if self.config.adaptive and self.config.drafts_with_model:
            keep = self._budget_uniform(decoding, other_tokens, other_attended, candidates)
        elif self.config.adaptive:
            keep = self._budget(decoding, other_tokens, other_attended, candidates)
        else:
            keep = [len(d) for _, d, _ in candidates]
        for (req, draft, _), n in zip(candidates, keep):
            req.spec_token_ids = draft[:n]
            self.stats.num_backed_off += len(draft) - n

    # ------------------------------------------------------------------ helpers
    def _feed(self, st: _RequestState, tokens: list[int]) -> None:
        new = tokens[st.fed:]
        if not new or self.config.drafts_with_model:
            return
        c = self.config
        if c.method == "ngram":
            if st.ngram is None:
                st.ngram = NgramIndex(c.prompt_lookup_min, c.prompt_lookup_max)
            st.ngram.extend(new)
        else:
            if st.local is None:
                st.local = SuffixTree(c.suffix_decoding_max_tree_depth)
            for t in new:
                st.local.append(t)
        st.fed = len(tokens)

    def _draft(self, st: _RequestState, tokens: list[int], k: int) -> list[int]:
        c = self.config
        if c.method == "ngram":
            return st.ngram.propose(k)
        args = (tokens[-c.suffix_decoding_max_tree_depth:], k, c.suffix_decoding_max_spec_factor,
                c.suffix_decoding_min_token_prob)
        draft, score = st.local.speculate(*args)
        tree = self.suffix_cache.tree(st.scope)
        if tree is not None:
            other, other_score = tree.speculate(*args)
            if other_score > score:
                draft = other
        return draft

    def _budget(self, decoding: list, other_tokens: int, other_attended: int, candidates) -> list[int]:
        """Draft tokens to keep per candidate: the prefix of the marginal gains (sorted) maximising expected tokens
        per second under the measured step cost."""
        n, tokens, attended = len(decoding), len(decoding) + other_tokens, _attended(decoding) + other_attended
        cost = self.cost.cost(tokens, attended)
        if cost is None:
            return [len(d) for _, d, _ in candidates]  # nothing measured yet: draft, and learn the cost
        gains = []
        for i, (req, draft, a) in enumerate(candidates):
            g = 1.0
            for _ in draft:
                g *= a
                gains.append((g, i, _context(req)))  # a draft row reads about the request's context
        gains.sort(key=lambda x: -x[0])
        best_rate, best_d, total = n / cost, 0, 0.0
        for d, (g, _, ctx) in enumerate(gains, start=1):
            total += g
            attended += ctx
            rate = (n + total) / self.cost.cost(tokens + d, attended)
            if rate > best_rate * 1.001:
                best_rate, best_d = rate, d
        keep = [0] * len(candidates)
        for _, i, _ in gains[:best_d]:
            keep[i] += 1
        return keep

    def _budget_uniform(self, decoding: list, other_tokens: int, other_attended: int, candidates) -> list[int]:
        """Model drafting runs k forward passes for the longest draft, so one k serves the whole step: the k
        maximising (decodes + expected accepted) / (T(tokens verified) + k x a draft pass's measured cost)."""
        n, base, attended = len(decoding), len(decoding) + other_tokens, _attended(decoding) + other_attended
        cost = self.cost.cost(base, attended)
        if cost is None:
            return [len(d) for _, d, _ in candidates]
        per_pass = self.draft_seconds_per_iteration or 0.0  # unmeasured: free, so it is tried and measured
        best_rate, best_k = n / cost, 0
        for k in range(1, max(len(d) for _, d, _ in candidates) + 1):
            gain, tokens, extra = 0.0, 0, 0
            for req, d, a in candidates:
                m = min(k, len(d))
                tokens += m
                extra += m * _context(req)
                gain += a * (1 - a ** m) / (1 - a) if a < 1 else m
            rate = (n + gain) / (self.cost.cost(base + tokens, attended + extra) + k * per_pass)
            if rate > best_rate * 1.001:
                best_rate, best_k = rate, k
        return [min(best_k, len(d)) for _, d, _ in candidates]

    def snapshot(self) -> SpecStats:
        s = self.stats
        if self.suffix_cache is not None:
            s.suffix_cached_requests = self.suffix_cache.num_requests
            s.suffix_tree_nodes = self.suffix_cache.num_nodes
        return SpecStats(**{**s.__dict__, "acceptance_lengths": list(s.acceptance_lengths),
                            "step_cost_s": self.cost.curve()})
