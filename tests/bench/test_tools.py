"""The roofline placement arithmetic and the compare table, on hand-made results (no server, no torch)."""

from __future__ import annotations

import json

import pytest

from kvserve.bench import compare, roofline
from kvserve.bench.metrics import RequestRecord, summarize

# 1,000 params (2,000 bf16 bytes), 100 of them in the lm_head, 10 attention flops per (query, key) pair
ROOF = {"weight_bytes": 2000, "lm_head_params": 100, "attn_flops_per_ctx_token": 10,
        "bf16_matmul_gflop_s": 1e-6, "fp32_matmul_gflop_s": 5e-7, "decode_bound_tok_s": 100.0}


def result(label: str, rate, recs: list[RequestRecord], duration: float, workload: str = "sharegpt-like") -> dict:
    return {"config": {"label": label, "workload": workload, "request_rate": rate, "max_concurrency": None,
                       "num_requests": len(recs), "seed": 0, "endpoint": "completions", "model": "m"},
            "summary": summarize(recs, duration), "requests": [r.to_dict() for r in recs]}


def test_serve_flops_exact():
    # prompt 4, output 2, nothing cached: positions 0..4 run (5 tokens), keys 1+2+3+4+5
    a = RequestRecord("a", 0.0, 0.1, [0.1, 0.2], 0.2, prompt_tokens=4, output_tokens=2, success=True)
    # the same with 2 cached prompt tokens: positions 2..4 run, keys 3+4+5
    b = RequestRecord("b", 0.0, 0.1, [0.1, 0.2], 0.2, prompt_tokens=4, output_tokens=2, cached_tokens=2,
                      success=True)
    failed = RequestRecord("c", 0.0, error="HTTP 500", prompt_tokens=4, output_tokens=2)
    assert roofline.serve_flops(result("x", 1.0, [a], 1.0), ROOF) == 2 * 900 * 5 + 2 * 100 * 2 + 10 * 15
    assert roofline.serve_flops(result("x", 1.0, [b, failed], 1.0), ROOF) == 2 * 900 * 3 + 2 * 100 * 2 + 10 * 12


def test_place_serve_and_offline(tmp_path):
    a = RequestRecord("a", 0.0, 0.1, [0.1, 0.2], 0.2, prompt_tokens=4, output_tokens=2, success=True)
    p = tmp_path / "serve.json"
    p.write_text(json.dumps(result("kv", 1.0, [a], 2.0)))
    line, = roofline.place(str(p), ROOF)
    # 9,550 flops in 2 s = 4,775 flop/s = 4.775e-6 GFLOP/s: 477.5% of a 1e-6 GFLOP/s "peak"
    assert "477.5% of the bf16 peak" in line and "955.0% of fp32" in line
    off = {"engines": {"kvserve": {"tasks": {"decode1": {"output_tok_s": 50.0, "elapsed_s": 5.0},
                                             "a": {"output_tok_s": 1.0, "elapsed_s": 10.0, "flops": 1e4,
                                                   "prompt_tokens": 4, "output_tokens": 2, "requests": 1}}}}}
    q = tmp_path / "offline.json"
    q.write_text(json.dumps(off))
    lines = roofline.place(str(q), ROOF)
    assert any("50.0% of the bandwidth bound" in x for x in lines)
    assert any("workload a" in x and "100.0% of the bf16 peak" in x and "exact" in x for x in lines)


def test_compare_table(tmp_path, capsys):
    recs = [RequestRecord("a", 0.0, 0.5, [0.5, 1.0], 1.0, prompt_tokens=10, output_tokens=2, success=True)]
    files = []
    for label, rate in (("kvserve", "inf"), ("vllm", 2.0), ("vllm", 2.0)):
        f = tmp_path / f"{label}-{len(files)}.json"
        f.write_text(json.dumps(result(label, rate, recs, 2.0)))
        files.append(str(f))
    assert compare.main(files + ["--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert table.splitlines()[0] == "| metric | kvserve @ inf | vllm @ 2/s #1 | vllm @ 2/s #2 |"
    assert "| Median TTFT (ms) | 500.00 | 500.00 | 500.00 |" in table
    assert "| Output token throughput (tok/s) | 1.00 | 1.00 | 1.00 |" in table
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        compare.main([str(bad)])


def test_token_cost_parts_add_up():
    """The per-token breakdown script on the real engine: every part timed, their sum the timed step (the rest is
    the timers' own cost), with the decode plan and with the Python layer loop."""
    from kvserve.bench.token_cost import PARTS, markdown, run

    for plan in (True, False):
        r = run(batch=2, quantization="none", steps=3, prompt_len=16, threads=2, decode_plan=plan)
        assert set(PARTS) <= set(r["median_ms"])
        assert 0.7 * r["step_ms_timed"] <= r["parts_sum_ms"] <= 1.05 * r["step_ms_timed"]
        native = r["median_ms"]["layers_native"]
        assert (native > 0) == plan == r["decode_plan"]
        # the kernels' time by kind: timed inside the plan's one call (DecodePlan.set_profile), or per Python call
        assert all(r["median_ms"][k] > 0 for k in ("matmul", "attention", "elementwise"))
        if plan:  # what is left of the plan's call beside its kernels (allocation, views) is small
            assert native < r["median_ms"]["matmul"]
        assert "b=2 none" in markdown([r])


def test_batch_reorder_bench_tiny(fp32_parts):
    """The prefix-grouped batch benchmark at a tiny scale on the shared float32 weights: both orders run, outputs
    agree token for token, and the observer's split of the excess prompt tokens adds up to the engine's counter."""
    from kvserve.bench.batch_reorder import markdown, parse_args, run

    args = parse_args(["--num-prompts", "12", "--num-prefixes", "2", "--prefix-len", "40", "--suffix-min", "4",
                       "--suffix-max", "12", "--output-min", "2", "--output-max", "5", "--pool-prefixes", "1",
                       "--dtype", "float32", "--warmup-prompts", "4", "--warmup-prefixes", "1"])
    r = run(args, *fp32_parts)
    json.dumps(r)
    assert 2 + 6 * 1 <= r["num_blocks"] <= 2 + 6 * 2  # 1 x (2 prefix blocks + 6 requests adding 1-2 blocks each)
    assert r["output_agreement"] == 1.0 and r["requests"] == 12
    for name in ("arrival", "grouped"):
        x = r[name]
        assert x["output_tokens"] == r["workload"]["output_tokens"] and x["output_tok_s"] > 0
        assert x["prompt_tokens_computed"] >= x["ideal_prompt_tokens"] == r["workload"]["ideal_prompt_tokens"]
        assert x["computed_by_cause"]["prefix_first"] == 2 * 32  # two prefixes, two full blocks each
        assert sum(x["excess_by_cause"].values()) == x["excess_prompt_tokens"]
        assert x["forwarded_tokens"] >= x["ideal_forwarded_tokens"] + x["excess_prompt_tokens"]
    assert "| grouped |" in markdown(r)


@pytest.mark.bench
def test_scheduling_bench_swap_scenario_tiny(tmp_path):
    """The scheduling benchmark's swap scenario end to end at a tiny scale (two real servers, a KV pool of ~870
    tokens): both modes run, requests succeed, and the auto run's preemptions are swapped, logged and counted."""
    from kvserve.bench.scheduling import main

    out = tmp_path / "swap.json"
    assert main(["--scenario", "swap", "--swap-requests", "6", "--swap-rate", "50", "--swap-max-input", "256",
                 "--max-output", "48", "--kv-gb", "0.02", "--port", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rec, auto = r["runs"]
    assert rec["mode"] == "recompute" and auto["mode"] == "auto"
    assert rec["failed"] == auto["failed"] == 0 and rec["requests"] == 6
    assert rec["preemptions_swapped"] == 0
    assert auto["preemptions_swapped"] == auto["logged_swap"] == auto["preemptions"] > 0
    assert r["ttft_p99_ratio_recompute_over_auto"] > 0


def test_decode1_paired_shares():
    from kvserve.bench.decode1 import paired_shares

    # 100 MB a token; repeat 0 at 200 tok/s between 40 and 60 GB/s (bound 500 tok/s): 40%; repeat 1 at 300 tok/s
    # between 60 and 30 GB/s (bound 450): 66.7%. Pairing each repeat with its own neighbours, not the last figure
    # alone (30 GB/s would give 66.7% and 100%), is the point.
    shares = paired_shares([200.0, 300.0], [40.0, 60.0, 30.0], 100_000_000)
    assert shares == pytest.approx([0.4, 300 / 450])
    with pytest.raises(ValueError, match="3 bandwidth figures"):
        paired_shares([200.0, 300.0], [40.0, 60.0], 100_000_000)


def test_kernel_ab_times_both_builds_and_refuses_different_outputs():
    from kvserve.bench.kernel_ab import compare
    from kvserve.kernels import load

    mod = load("paged_attention")
    if mod is None:
        pytest.skip("the native paged_attention kernel did not build here")
    class Slower:  # the same bits at four times the work: every round must see the tree ahead
        @staticmethod
        def paged_decode_attention(*args):
            for _ in range(3):
                mod.paged_decode_attention(*args)
            return mod.paged_decode_attention(*args)

    r = compare(mod, Slower, batch=2, ctx=40, layers=2, rounds=5)
    assert r["tree_wins"] >= 4 and r["ratio"] > 1.5 and r["rev_us"] > r["tree_us"]

    class Scaled:  # another build whose outputs differ: the comparison must stop, not time it
        @staticmethod
        def paged_decode_attention(*args):
            return mod.paged_decode_attention(*args) * 2

    with pytest.raises(SystemExit, match="disagree"):
        compare(mod, Scaled, batch=2, ctx=40, layers=2, rounds=3)


def test_kernel_ab_times_decode_plans_and_refuses_different_tokens():
    from kvserve import LLM
    from kvserve.bench.kernel_ab import compare_plans

    llm = LLM(kv_cache_memory_gb=0.25, max_num_seqs=2)
    plan = llm.engine.core.model.decode_plan
    if plan is None:
        pytest.skip("no decode plan runs here (native kernels or AVX512-BF16 missing)")

    class Slower:  # the same step four times (the KV it writes is the same each time): the tree wins every round
        @staticmethod
        def run(h, x, *rest):
            for _ in range(3):
                plan.run(h.clone(), x.clone(), *rest)
            return plan.run(h, x, *rest)

    r = compare_plans(llm, Slower, batch=2, max_tokens=4, rounds=3, prompt_len=40)
    assert r["tree_wins"] == 3 and r["ratio"] > 1.5 and r["rev_ms"] > r["tree_ms"]
    assert llm.engine.core.model.decode_plan is plan  # the engine's own plan back

    class Negated:  # a plan whose residual stream is negated: other tokens, so nothing is timed
        @staticmethod
        def run(*args):
            return -plan.run(*args)

    with pytest.raises(SystemExit, match="different tokens"):
        compare_plans(llm, Negated, batch=2, max_tokens=4, rounds=3)
