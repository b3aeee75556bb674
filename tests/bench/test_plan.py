"""The goodput planner's simulator (kvserve/bench/plan.py): kvserve's own scheduler on a virtual clock, checked to
the exact step times a hand-made cost model gives, and the cost fit recovering known coefficients."""

import random

import pytest

from kvserve.bench.plan import (KV_BYTES_PER_TOKEN, CostModel, InstanceConfig, SimInstance, SimRequest, expand,
                                fit_cost, median_of_runs, relative_errors, simulate, summarize, within_bars)

# 10 ms a step + 1 ms a prefill token + 2 ms a decoding sequence; nothing else
COST = CostModel(1, (0.010, 0.001, 0.002, 0.002, 0.0, 0.0))


def test_one_request_chunked_prefill_then_decode_exact_times():
    r = SimRequest("a", 0.5, list(range(1000)), 5)
    res = simulate([r], [SimInstance(COST, InstanceConfig())])["a"]
    # chunks of 512 and 488 tokens (the 512-token budget), the first token sampled with the second
    assert res.send == 0.5
    assert res.ttft == pytest.approx(0.010 + 0.512 + 0.010 + 0.488)
    assert res.tokens == 5 and res.tpot == pytest.approx(0.012)


def test_decodes_share_steps_and_prefix_cache_hits_cost_nothing():
    prompt = list(range(2000, 2100))
    reqs = [SimRequest("a", 0.0, prompt, 3), SimRequest("b", 10.0, prompt + [7], 3)]
    res = simulate(reqs, [SimInstance(COST, InstanceConfig())])
    assert res["a"].ttft == pytest.approx(0.110)
    # b arrives later: its first 96 tokens (6 blocks of 16) come from the prefix cache, 5 are computed
    assert res["b"].ttft == pytest.approx(0.010 + 0.005)


def test_max_concurrency_delays_the_send():
    reqs = [SimRequest(f"r{i}", 0.0, list(range(100 * i, 100 * i + 50)), 2) for i in range(3)]
    res = simulate(reqs, [SimInstance(COST, InstanceConfig())], max_concurrency=1)
    assert res["r0"].send == 0.0 and res["r1"].send == pytest.approx(res["r0"].last)
    assert res["r2"].send == pytest.approx(res["r1"].last)


def test_prefill_decode_split_moves_the_kv_and_decodes_elsewhere():
    r = SimRequest("a", 0.0, list(range(300)), 4)
    prefill, decode = SimInstance(COST, InstanceConfig()), SimInstance(COST, InstanceConfig(), transfer_gbps=1.0)
    res = simulate([r], [prefill], decode=[decode])["a"]
    assert res.ttft == pytest.approx(0.310)  # the prefill instance's step gives the first token
    # the decode instance loads 301 tokens of KV (no compute), samples the second token in that step, then 2 more
    load = 0.010 + 0.002 + 301 * KV_BYTES_PER_TOKEN / 1e9
    assert res.last == pytest.approx(0.310 + load + 2 * 0.012)
    assert res.tokens == 4
    s = summarize({"a": res}, slo_ttft_ms=400, slo_tpot_ms=1000)
    assert s["slo_attainment"] == 1.0 and s["requests"] == 1


def test_fit_recovers_coefficients_and_ignores_outliers():
    rng = random.Random(0)
    true = (0.004, 0.0002, 0.001, 0.0005, 0.0003, 0.02)
    rows = []
    for _ in range(400):
        f = [1.0, rng.randint(1, 512), rng.randint(0, 64), rng.uniform(0, 100), rng.uniform(0, 0.3)]
        y = sum(c * x for c, x in zip(true, expand(f))) * rng.uniform(0.98, 1.02)
        rows.append((f, y * (20 if rng.random() < 0.02 else 1)))  # a few kernel builds
    model = fit_cost(rows, threads=1)
    assert model.coef == pytest.approx(true, rel=0.05)
    assert model.fit["median_rel_error"] < 0.02


def test_amdahl_extrapolation():
    one, two = CostModel(1, (0.010, 0.002)), CostModel(2, (0.010, 0.0012))
    four = one.at_threads(two, 4)
    # serial 0.010 / parallel 0; the token term 0.0004 serial + 0.0016 parallel
    assert four.coef == pytest.approx((0.010, 0.0004 + 0.0016 / 4))


def test_refit_joins_traces_that_cover_different_batch_ranges(tmp_path):
    """A low-rate trace never decodes more than 8 sequences, so alone it cannot fit the beyond-8 term; joined with a
    high-rate trace the fit recovers every coefficient. Traces at two thread counts are refused."""
    import json

    from kvserve.bench.plan import main

    rng = random.Random(1)
    true = (0.004, 0.0002, 0.001, 0.0005, 0.0003, 0.02)

    def trace(path, max_decode, threads=2):
        steps = []
        for _ in range(220):
            f = [1.0, rng.randint(1, 512), rng.randint(0, max_decode), rng.uniform(0, 100), rng.uniform(0, 0.3)]
            steps.append(f + [sum(c * x for c, x in zip(true, expand(f))) * rng.uniform(0.99, 1.01)])
        path.write_text(json.dumps({"threads": threads, "coef": [], "steps": steps, "source": path.stem}))
        return str(path)

    low, high = trace(tmp_path / "low.json", 8), trace(tmp_path / "high.json", 48)
    main(["refit", low, high, "--out", str(tmp_path / "joined.json")])
    joined = json.loads((tmp_path / "joined.json").read_text())
    assert joined["coef"] == pytest.approx(true, rel=0.05)
    assert joined["fit"]["steps"] == 400 and len(joined["steps"]) == 440  # 20 warm-up steps left out of each fit
    assert joined["source"] == "low + high" and joined["threads"] == 2
    with pytest.raises(SystemExit, match="one thread count"):
        main(["refit", low, trace(tmp_path / "one.json", 48, threads=1)])


def _run(ttft_p50, tpot_p50, p99=100.0):
    return {"ttft_ms": {"p50": ttft_p50, "p90": p99, "p99": p99}, "tpot_ms": {"p50": tpot_p50, "p90": p99, "p99": p99},
            "slo_attainment": 1.0}


def test_validation_compares_with_the_median_of_the_runs():
    runs = [_run(120, 5.4), _run(108, 4.5), _run(100, 6.0), _run(130, 5.0)]
    m = median_of_runs(runs)
    assert m["ttft_ms"]["p50"] == 114 and m["tpot_ms"]["p50"] == pytest.approx(5.2) and m["slo_attainment"] == 1.0
    pred = _run(110, 5.9, p99=110.0)
    err = relative_errors(pred, m)
    assert err["tpot_ms_p50"] == pytest.approx(5.9 / 5.2 - 1) and err["ttft_ms_p99"] == pytest.approx(0.1)
    assert within_bars(err)  # +13% against the median ...
    assert not within_bars(relative_errors(pred, runs[1]))  # ... +31% against the fastest run alone
    assert not within_bars({"ttft_ms_p50": 0.0, "ttft_ms_p99": -0.36})  # p99's bar is 35%


def test_self_check_simulates_with_the_runs_own_step_costs(tmp_path):
    """validate --self-check: a model fitted to the run's traced steps drives the simulator. Steps traced from a
    known cost model give that model back, so a run that the model describes exactly is reproduced (errors ~0), and a
    run twice as slow as its own trace says is a 50% miss the diagnostic does not hide."""
    import json
    from types import SimpleNamespace

    from kvserve.bench.plan import _self_check

    rng = random.Random(1)
    true = (0.004, 0.0002, 0.001, 0.0005, 0.0003, 0.02)
    with open(tmp_path / "steps.jsonl", "w") as f:
        for _ in range(300):
            base = [1.0, rng.randint(1, 512), rng.randint(0, 16), rng.uniform(0, 100), rng.uniform(0, 0.3)]
            f.write(json.dumps({"base": base, "cycle_s": sum(c * x for c, x in zip(true, expand(base)))}) + "\n")
    reqs = [SimRequest(f"r{i}", 0.3 * i, list(range(300 * i, 300 * i + 200)), 20) for i in range(12)]
    args = SimpleNamespace(slo_ttft_ms=2000.0, slo_tpot_ms=200.0)
    exact = summarize(simulate(reqs, [SimInstance(CostModel(1, true), InstanceConfig())]), 2000.0, 200.0)
    check = _self_check(str(tmp_path / "steps.jsonl"), CostModel(1, true), reqs, exact, args, lambda *_: None)
    assert check["steps"] == 280 and check["coef"] == pytest.approx(true, rel=1e-6)
    err = check["relative_error"]
    assert set(err) == {"ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"}  # every figure compared
    assert max(abs(e) for e in err.values()) < 1e-6 and check["within_bars"]
    slow = {m: {q: 2 * v for q, v in exact[m].items()} for m in ("ttft_ms", "tpot_ms")}
    miss = _self_check(str(tmp_path / "steps.jsonl"), CostModel(1, true), reqs, slow, args, lambda *_: None)
    assert miss["relative_error"]["tpot_ms_p50"] == pytest.approx(-0.5) and not miss["within_bars"]
