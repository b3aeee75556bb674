"""KV eviction's worker side (docs/eviction.md): per-token attention mass from the attention kernels, the policies
that choose whose KV stays, and the per-token state a compaction moves.

The scheduler decides nothing here: after a step, a request over its budget gets the KV indices its policy evicts
(`ModelOutput.evicted`), and the scheduler packs the rest (`KVCacheManager.compact`, a `KVCompact` op that this
worker applies before the next forward pass). One kept set per request: a KV slot holds every layer and head of a
token, so scores are summed over layers, heads and scoring queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.config import KVEvictionConfig
from kvserve.core.outputs import KVCompact, ScheduledRequest
from kvserve.model.batch import ForwardBatch

_INITIAL_CAPACITY = 256
_KEEP = 1e15  # priority offsets: kept before / evicted before anything a score can reach
_EPISODE = 1e6  # episodic: the chosen episode's tokens rank above every other prompt token (masses are far smaller)


@dataclass
class EvictionState:
    """One request's per-KV-index state, in the order of its KV slots (not positions, after a compaction)."""

    scores: torch.Tensor  # (cap,) float32 attention mass received
    pos: torch.Tensor  # (cap,) int64 position of the token held in each KV index
    last_hit: torch.Tensor  # (cap,) int64 lazy: the scoring step at which attention last came back to the token
    max_gap: torch.Tensor  # (cap,) int64 lazy: the longest gap between two such steps (its recurrence interval)
    prompt_len: int
    step: int = 0  # scoring steps so far (lazy's clock)
    pooled: bool = False  # snapkv: the prompt's scores are pooled once, at its first eviction

    @classmethod
    def new(cls, capacity: int, prompt_len: int) -> EvictionState:
        return cls(torch.zeros(capacity), torch.arange(capacity), torch.zeros(capacity, dtype=torch.long),
                   torch.zeros(capacity, dtype=torch.long), prompt_len)

    def ensure(self, n: int) -> None:
        cap = self.scores.numel()
        if n <= cap:
            return
        new = max(n, 2 * cap)
        self.scores = torch.cat([self.scores, torch.zeros(new - cap)])
        self.pos = torch.cat([self.pos, torch.arange(cap, new)])  # until evictions start, index == position
        self.last_hit = torch.cat([self.last_hit, torch.zeros(new - cap, dtype=torch.long)])
        self.max_gap = torch.cat([self.max_gap, torch.zeros(new - cap, dtype=torch.long)])

    def write(self, kv_start: int, start: int, n: int) -> None:
        """New tokens at KV indices [kv_start, kv_start + n), positions [start, start + n): fresh state."""
        self.ensure(kv_start + n)
        self.scores[kv_start:kv_start + n] = 0
        self.pos[kv_start:kv_start + n] = torch.arange(start, start + n)
        self.last_hit[kv_start:kv_start + n] = self.step
        self.max_gap[kv_start:kv_start + n] = 0

    def move(self, moves: list[tuple[int, int]]) -> None:
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves])
        dst = torch.tensor([m[1] for m in moves])
        for t in (self.scores, self.pos, self.last_hit, self.max_gap):
            t[dst] = t[src]

    def observe(self, mass: torch.Tensor, decode: bool) -> None:
        """Add one step's attention mass over KV indices [0, len(mass)). lazy's clock: a token is hit when its
        share of the step's mass is at least the mean share; its gap since the last hit may raise its interval."""
        n = mass.numel()
        self.scores[:n] += mass
        if decode:
            self.step += 1
        total = float(mass.sum())
        if total <= 0:
            return
        hit = mass * n >= total
        gap = self.step - self.last_hit[:n]
        self.max_gap[:n] = torch.where(hit, torch.maximum(self.max_gap[:n], gap), self.max_gap[:n])
        self.last_hit[:n] = torch.where(hit, torch.full_like(gap, self.step), self.last_hit[:n])


def pool_in_position_order(scores: torch.Tensor, pos: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's clustering: each token's score averaged with its neighbours' (by position), so tokens next to
    an important one are kept with it."""
    if kernel <= 1 or scores.numel() <= 1:
        return scores.clone()
    order = torch.argsort(pos)
    pooled = F.avg_pool1d(scores[order].view(1, 1, -1), kernel, stride=1, padding=kernel // 2,
                          count_include_pad=False).view(-1)
    out = torch.empty_like(scores)
    out[order] = pooled
    return out


def _kmeans(x: torch.Tensor, k: int, iterations: int = 20) -> torch.Tensor:
    """Cluster the rows of x (unit vectors) into k by cosine similarity; deterministic (farthest-point start).
    Returns each row's cluster (n,) and the unit centroids (k, F)."""
    centroids = [x[0]]
    for _ in range(1, k):
        sim = torch.stack([x @ c for c in centroids]).max(dim=0).values
        centroids.append(x[int(sim.argmin())])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]
        new = F.normalize(new, dim=1)
        if torch.allclose(new, c):
            break
        c = new
    return (x @ c.T).argmax(dim=1), c


def episode_mask(config: KVEvictionConfig, values: torch.Tensor, pos: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """EpiCache's routing: the conversation before the question is cut into segments, each embedded by the mean of
    its tokens' hidden-state projections (`values`, (n, F)), clustered into episodes; returns the tokens (bool, (n,))
    of the episode whose centroid is closest to the question (the observation window's mean)."""
    question = pos >= prompt_len - config.observation_window
    history = ~question & (pos < prompt_len)
    mask = torch.zeros_like(pos, dtype=torch.bool)
    if not history.any() or not question.any():
        return mask
    seg = pos // config.episode_segment_tokens
    nseg = int(seg[history].max()) + 1
    sums = torch.zeros(nseg, values.shape[1]).index_add_(0, seg[history], values[history])
    present = sums.norm(dim=1) > 0
    emb = F.normalize(sums[present], dim=1)
    ids = torch.arange(nseg)[present]
    assign, centroids = _kmeans(emb, min(config.episodes, emb.shape[0]))
    query = F.normalize(values[question].mean(dim=0), dim=0)
    best = int((centroids @ query).argmax())
    chosen = torch.zeros(nseg, dtype=torch.bool)
    chosen[ids[assign == best]] = True
    mask[history] = chosen[seg[history]]
    return mask


def select_evicted(config: KVEvictionConfig, state: EvictionState, length: int, target: int,
                   values: torch.Tensor | None = None) -> list[int]:
    """The KV indices (ascending) among [0, length) that `config.policy` evicts to keep `target` tokens.

    Every policy keeps the `sink_tokens` first positions and the `window_tokens` most recent ones; the rest by:
    streaming: recency. snapkv: the prompt's pooled observation-window scores, generated tokens outside the window
    going first (oldest first). h2o: accumulated attention mass. lazy: tokens overdue (no attention for longer than
    their recurrence interval x lazy_recurrence_weight) go first, most overdue first, then the lowest mass.
    episodic: as snapkv, with the tokens of the episode closest to the question ranked above all others (`values`:
    the tokens' hidden-state projections, needed at the first eviction)."""
    n_evict = length - target
    if n_evict <= 0:
        return []
    pos = state.pos[:length]
    scores = state.scores[:length].double()
    newest = int(pos.max())
    forced = (pos < config.sink_tokens) | (pos > newest - config.window_tokens)
    policy = config.policy
    if policy == "streaming":
        keep = pos.double()
    elif policy in ("snapkv", "episodic"):
        if not state.pooled:  # the prompt's ranking, made once at the end of its prefill
            ranked = pool_in_position_order(state.scores[:length], pos, config.pooling_kernel)
            if policy == "episodic":
                ranked = ranked + _EPISODE * episode_mask(config, values, pos, state.prompt_len)
            state.scores[:length] = ranked
            state.pooled = True
            scores = state.scores[:length].double()
        keep = torch.where(pos < state.prompt_len, scores, pos.double() - _KEEP)
    elif policy == "h2o":
        keep = scores
    elif policy == "lazy":
        overdue = (state.step - state.last_hit[:length]).double() - config.lazy_recurrence_weight * \
            state.max_gap[:length].double()
        keep = torch.where(overdue > 0, -overdue - _KEEP, scores)
    else:
        raise ValueError(f"unknown eviction policy {policy!r}")
    keep = keep.masked_fill(forced, float("inf"))
    # ties (equal scores) go to the older token: the order of KV indices is not a time order after a compaction
    order = torch.argsort(pos)
    ranked = order[torch.argsort(keep[order], stable=True)]
    return sorted(ranked[:n_evict].tolist())


class KVEvictor:
    """Per-request eviction state in the worker; the runner calls prepare() on each batch and after_step() once
    the step's tokens are sampled."""

    def __init__(self, config: KVEvictionConfig, num_kv_heads: int, block_size: int,
                 v_cache: torch.Tensor | None = None):
        """`v_cache`: (blocks, block_size, Hkv, D) values of the layer episodic embeds with (None for others)."""
        self.config = config
        self.v_cache = v_cache
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.states: dict[str, EvictionState] = {}
        self.seconds = 0.0  # bookkeeping + selection time, taken by the runner each step
        self._decode_rows: dict[str, int] = {}  # this step: request id -> its first decode row
        self._score_rows: dict[str, tuple[int, int]] = {}  # this step: request id -> (first score row, count)

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    def apply(self, op: KVCompact) -> None:
        state = self.states.get(op.request_id)
        if state is not None:
            state.move(op.moves)

    def prepare(self, batch: ForwardBatch, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest],
                first_row: dict[int, int]) -> None:
        """Reset the state of the KV indices this step writes and ask the attention for the scores it needs."""
        started = time.perf_counter()
        cfg, bs = self.config, self.block_size
        self._decode_rows, self._score_rows = {}, {}
        for s in decodes + prefills:
            if not s.kv_budget:
                continue
            state = self.states.get(s.request_id)
            if state is None or s.kv_start == 0:  # new, or recomputed from scratch after a preemption
                state = self.states[s.request_id] = EvictionState.new(
                    max(_INITIAL_CAPACITY, s.kv_start + s.num_new_tokens), s.request.num_prompt_tokens)
            state.write(s.kv_start, s.start, s.num_new_tokens)
        if not cfg.needs_scores:
            self.seconds += time.perf_counter() - started
            return
        if cfg.scores_decode and batch.num_decodes:
            wanted = [s for s in decodes if s.kv_budget]
            if wanted:
                for s in wanted:
                    self._decode_rows[s.request_id] = first_row[id(s)]
                width = batch.decode_block_tables.shape[1] * bs
                batch.decode_scores = torch.zeros(batch.num_decodes, self.num_kv_heads, width)
        rows, tables, lens = [], [], []
        for s in prefills:  # the queries of the observation window (the prompt's last tokens) score the prompt
            if not s.kv_budget:
                continue
            first_pos = max(s.request.num_tokens - cfg.observation_window, s.start)
            n = s.start + s.num_real_tokens - first_pos
            if n <= 0:
                continue
            self._score_rows[s.request_id] = (len(rows), n)
            for j in range(first_pos - s.start, first_pos - s.start + n):
                rows.append(first_row[id(s)] + j)
                lens.append(s.kv_start + j + 1)
                tables.append(s.block_ids)
        if rows:
            width = -(-max(lens) // bs)
            table = torch.zeros(len(rows), width, dtype=torch.long)
            for i, (blocks, n) in enumerate(zip(tables, lens)):
                nb = -(-n // bs)
                table[i, :nb] = torch.tensor(blocks[:nb])
            batch.score_rows = torch.tensor(rows, dtype=torch.long)
            batch.score_block_tables = table
            batch.score_seq_lens = torch.tensor(lens, dtype=torch.int32)
            batch.score_out = torch.zeros(len(rows), self.num_kv_heads, width * bs)
        self.seconds += time.perf_counter() - started

    def after_step(self, batch: ForwardBatch, scheduled: list[ScheduledRequest],
                   sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """Fold the step's attention mass into each request's state; returns the KV indices each request over its
        budget evicts. `sampled` tells how many drafts were accepted (their KV stays, so they count)."""
        started = time.perf_counter()
        cfg = self.config
        evicted: dict[str, list[int]] = {}
        for s in scheduled:
            if not s.kv_budget:
                continue
            state = self.states[s.request_id]
            accepted = max(len(sampled.get(s.request_id, ())) - 1, 0) if s.spec_token_ids else 0
            length = s.kv_start + s.num_real_tokens + accepted  # KV the request holds after this step
            if s.request_id in self._decode_rows:
                r0 = self._decode_rows[s.request_id]
                mass = batch.decode_scores[r0:r0 + 1 + accepted].sum(dim=(0, 1))[:length]
                state.observe(mass, decode=True)
            if s.request_id in self._score_rows:
                r0, n = self._score_rows[s.request_id]
                mass = batch.score_out[r0:r0 + n].sum(dim=(0, 1))[:length]
                state.observe(mass, decode=False)
            if not s.sample or length <= s.kv_budget:
                continue
            ends_prefill = s.num_real_tokens > 1 or s.start < s.request.num_prompt_tokens
            if ends_prefill or length > s.kv_budget + cfg.margin:
                values = None
                if cfg.policy == "episodic" and not state.pooled:
                    values = self._values(s.block_ids, length)
                evicted[s.request_id] = select_evicted(cfg, state, length, s.kv_budget, values)
        self.seconds += time.perf_counter() - started
        return evicted

    def _values(self, block_ids: list[int], length: int) -> torch.Tensor:
        """(length, Hkv * D) float32: the request's first `length` KV slots' values in the episode layer."""
        bs = self.block_size
        slots = torch.tensor([block_ids[i // bs] * bs + i % bs for i in range(length)])
        flat = self.v_cache.reshape(-1, self.v_cache.shape[-2] * self.v_cache.shape[-1])
        return flat[slots].float()

    def take_seconds(self) -> float:
        out, self.seconds = self.seconds, 0.0
        return out
