"""The router's choice (kvserve.router.policy), to the exact backend and reason, and its config validation."""

from collections import Counter

import pytest

from kvserve.config import ConfigError
from kvserve.router.config import RouterConfig, RoutingPolicy
from kvserve.router.policy import BackendState, NoBackend, choose, session_slot

CFG = RoutingPolicy(balance_abs_threshold=4)
H = [bytes([i]) * 8 for i in range(10)]  # a request's chain of 10 blocks


def backends(*specs):
    """specs: (healthy, advertised hashes, in_flight)."""
    return [BackendState(f"http://127.0.0.1:{i + 1}", healthy=ok, hashes=frozenset(h), in_flight=n)
            for i, (ok, h, n) in enumerate(specs)]


def test_matched_blocks_is_the_leading_run_including_pending():
    b = BackendState("u", healthy=True, hashes=frozenset(H[:3] + H[5:]))
    assert b.matched_blocks(H) == 3  # a gap ends the run: later blocks cannot be used
    b.pending = Counter(H[3:5])
    assert b.matched_blocks(H) == 10
    assert b.matched_blocks([]) == 0


def test_most_prefix_wins_when_loads_are_balanced():
    bs = backends((True, H[:2], 0), (True, H[:8], 1), (True, [], 0))
    c = choose(bs, H, None, CFG, turn=0)
    assert (c.index, c.reason, c.matched_blocks) == (1, "prefix", 8)


def test_load_outweighs_a_small_prefix_advantage():
    # backend 0: 6 of 10 blocks, load 4; backend 1: 5 of 10, idle -> 0.6 - 0.5 < 0.5 - 0
    bs = backends((True, H[:6], 4), (True, H[:5], 0), (False, H, 0))
    c = choose(bs, H, None, CFG, turn=0)
    assert (c.index, c.reason) == (1, "prefix")


def test_out_of_balance_goes_to_the_idlest_even_without_its_prefix():
    bs = backends((True, H, 9), (True, [], 2), (True, [], 3))
    c = choose(bs, H, None, CFG, turn=0)
    assert (c.index, c.reason, c.matched_blocks) == (1, "balance", 0)
    # within the thresholds (9 - 5 = 4, not > 4) the prefix holder keeps it
    bs = backends((True, H, 9), (True, [], 5), (True, [], 5))
    assert choose(bs, H, None, CFG, turn=0).index == 0


def test_no_prefix_anywhere_session_sticks_else_idlest():
    bs = backends((True, [], 3), (True, [], 1), (True, [], 2))
    assert choose(bs, H, None, CFG, turn=0).index == 1
    c = choose(bs, H, "conversation-7", CFG, turn=0)
    assert c.reason == "session" and c.index == session_slot("conversation-7", 3)
    assert all(choose(bs, H, "conversation-7", CFG, turn=t).index == c.index for t in range(5))


def test_unhealthy_refused_and_excluded_backends_are_never_chosen():
    bs = backends((False, H, 0), (True, H[:1], 0), (True, [], 0))
    bs[1].refused = "model identity x differs from y"
    assert choose(bs, H, None, CFG, turn=0).index == 2
    with pytest.raises(NoBackend):
        choose(bs, H, None, CFG, turn=0, exclude=frozenset({2}))


def test_round_robin_ignores_prefixes():
    cfg = RoutingPolicy(policy="round_robin")
    bs = backends((True, H, 0), (True, [], 0), (True, [], 0))
    assert [choose(bs, H, None, cfg, turn=t).index for t in range(4)] == [0, 1, 2, 0]


@pytest.mark.parametrize("kw, message", [
    ({"backends": ()}, "at least one --backend"),
    ({"backends": ("http://a:1", "http://a:1")}, "listed twice"),
    ({"backends": ("a:1",)}, "expected http(s)://host:port"),
    ({"backends": ("http://a:1/v1",)}, "no path"),
    ({"routing": {"policy": "random"}}, "--policy must be one of kv, round_robin"),
    ({"routing": {"load_weight": -1}}, "--load-weight must be a non-negative number"),
    ({"routing": {"balance_rel_threshold": 0.5}}, "--balance-rel-threshold must be >= 1"),
    ({"poll_interval_s": 0}, "--poll-interval must be a positive number"),
])
def test_bad_configs_fail_clearly(kw, message):
    args = {"backends": ("http://127.0.0.1:1",), **kw}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if "routing" in args:
            args["routing"] = RoutingPolicy(**args["routing"])
        RouterConfig(**args)
