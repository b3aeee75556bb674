"""Eviction policies on hand-made scores (each keeps exactly what its definition says), the per-token state a
compaction moves, and config validation."""

from __future__ import annotations

import pytest
import torch

from kvserve.config import ConfigError, KVEvictionConfig
from kvserve.worker.eviction import EvictionState, pool_in_position_order, select_evicted


def state(scores, pos=None, prompt_len=None):
    n = len(scores)
    s = EvictionState.new(n, prompt_len if prompt_len is not None else n)
    s.scores[:] = torch.tensor(scores, dtype=torch.float32)
    if pos is not None:
        s.pos[:] = torch.tensor(pos)
    return s


def kept(evicted, n):
    return [i for i in range(n) if i not in set(evicted)]


def cfg(policy, **kw):
    return KVEvictionConfig(policy, **{"budget_tokens": 6, "sink_tokens": 1, "window_tokens": 2, **kw})


def test_streaming_keeps_sinks_and_the_most_recent():
    s = state([9.0] * 10)
    # KV order scrambled by earlier compactions: positions say what is old
    s.pos[:] = torch.tensor([0, 9, 2, 3, 4, 5, 6, 7, 8, 1])
    ev = select_evicted(cfg("streaming"), s, 10, 6)
    assert sorted(int(s.pos[i]) for i in kept(ev, 10)) == [0, 5, 6, 7, 8, 9]


def test_h2o_keeps_heavy_hitters_plus_sinks_and_window():
    scores = [0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.0, 0.4, 0.0, 0.0]
    ev = select_evicted(cfg("h2o"), state(scores), 10, 6)
    # sink 0, window 8-9, then the three heaviest of the rest: 1, 3, 5
    assert kept(ev, 10) == [0, 1, 3, 5, 8, 9]


def test_snapkv_keeps_clusters_around_the_window_s_top_scores():
    c = cfg("snapkv", pooling_kernel=3, budget_tokens=7)
    scores = [0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    s = state(scores, prompt_len=12)
    pooled = pool_in_position_order(torch.tensor(scores), torch.arange(12), 3)
    assert torch.allclose(pooled[[2, 3, 4, 7, 8, 9]], torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    ev = select_evicted(c, s, 12, 7)
    # sink 0 and window 10-11, then the cluster 2-4 around the peak, then one of the tied 7-9: the newest
    assert kept(ev, 12) == [0, 2, 3, 4, 9, 10, 11]
    assert s.pooled and torch.allclose(s.scores[:12], pooled)  # pooled once; later evictions rank by the same


def test_snapkv_decode_eviction_prefers_old_generated_tokens():
    c = cfg("snapkv", pooling_kernel=1, budget_tokens=6)
    s = state([5.0, 4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0], prompt_len=4)
    s.pos[:] = torch.arange(8)
    s.pooled = True
    ev = select_evicted(c, s, 8, 6)
    # positions 4-7 are generated; the window keeps 6-7; 4 and 5 go, not the prompt's lowest-scored 3
    assert ev == [4, 5]


def test_lazy_evicts_overdue_tokens_first_then_lowest_mass():
    c = cfg("lazy", lazy_recurrence_weight=1.0)
    s = state([1.0] * 10)
    s.step = 10
    # token 2 came back every 4 steps and was last seen at step 8: not overdue; token 3 was last seen at step 1
    # with an interval of 2: overdue by 7; token 4 overdue by 3; everything else seen at step 10
    s.last_hit[:] = 10
    s.last_hit[2], s.max_gap[2] = 8, 4
    s.last_hit[3], s.max_gap[3] = 1, 2
    s.last_hit[4], s.max_gap[4] = 5, 2
    s.scores[5] = 0.5
    s.scores[6] = 0.7
    ev = select_evicted(c, s, 10, 6)
    assert ev == [3, 4, 5, 6]


def test_observe_tracks_recurrence_intervals():
    s = state([0.0] * 4)
    for step_mass in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]):
        s.observe(torch.tensor(step_mass, dtype=torch.float32), decode=True)
    assert s.step == 4
    assert s.last_hit.tolist() == [4, 2, 0, 3]
    assert s.max_gap.tolist() == [3, 2, 0, 3]
    assert s.scores.tolist() == [2.0, 1.0, 0.0, 1.0]


def test_state_moves_with_a_compaction():
    s = state([0.0, 1.0, 2.0, 3.0, 4.0])
    s.move([(4, 1), (3, 0)])
    assert s.scores[:2].tolist() == [3.0, 4.0] and s.pos[:2].tolist() == [3, 4]


@pytest.mark.parametrize("bad, message", [
    ({"policy": "fifo"}, "policy must be one of"),
    ({"policy": "h2o", "budget": 5}, "unknown key"),
    ({"budget_tokens": 64}, "needs a policy"),
    ({"policy": "h2o", "budget_tokens": 30}, "budget_tokens must be an integer >= 37"),
    ({"policy": "snapkv", "pooling_kernel": 4}, "pooling_kernel"),
    ({"policy": "lazy", "sink_tokens": -1}, "sink_tokens"),
    ({"policy": "lazy", "observation_window": 0}, "observation_window"),
    ({"policy": "lazy", "lazy_recurrence_weight": -1}, "lazy_recurrence_weight"),
    ("streaming", "JSON object"),
])
def test_bad_configs_fail_clearly(bad, message):
    with pytest.raises(ConfigError, match=message):
        KVEvictionConfig.from_dict(bad)


def test_episodic_keeps_the_episode_closest_to_the_question():
    """Segments of 4 tokens whose hidden-state projections point three ways; the question (the observation window)
    points like the middle topic's segments: those are kept, though other tokens drew more attention."""
    from kvserve.worker.eviction import episode_mask

    c = KVEvictionConfig("episodic", budget_tokens=12, sink_tokens=1, window_tokens=4, observation_window=4,
                         pooling_kernel=1, episodes=3, episode_segment_tokens=4)
    axes = torch.eye(3)
    topics = [0, 1, 2, 0, 2]  # the topic of each history segment (positions 0-19), then the question (20-23)
    values = torch.cat([axes[t].repeat(4, 1) for t in topics] + [axes[1].repeat(4, 1)]) + 0.01 * torch.rand(24, 3)
    pos = torch.arange(24)
    mask = episode_mask(c, values, pos, prompt_len=24)
    assert mask.nonzero().flatten().tolist() == [4, 5, 6, 7]
    s = state([5.0] * 4 + [0.1] * 4 + [5.0] * 16, prompt_len=24)
    ev = select_evicted(c, s, 24, 12, values)
    # sink 0, window 20-23, the whole episode 4-7, then three more by score (ties: the newest)
    assert kept(ev, 24) == [0, 4, 5, 6, 7, 17, 18, 19, 20, 21, 22, 23]
