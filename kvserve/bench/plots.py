"""PNG figures of serving-benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math

from kvserve.bench.metrics import RequestRecord


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def records(result: dict) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in result.get("requests", [])]


def series(result: dict) -> dict:
    """Latency samples of one run in ms: ttft, itl, e2el, and (time s, gap ms) of every ITL for the timeline."""
    recs = [r for r in records(result) if r.success]
    out = {"ttft": [r.ttft * 1e3 for r in recs if r.ttft is not None],
           "itl": [g * 1e3 for r in recs for g in r.itls],
           "e2el": [r.e2el * 1e3 for r in recs if r.e2el is not None],
           "itl_t": [], "itl_v": [], "itl_group": []}
    for r in recs:
        for i in range(1, len(r.token_times)):
            out["itl_t"].append(r.token_times[i])
            out["itl_v"].append((r.token_times[i] - r.token_times[i - 1]) * 1e3)
            out["itl_group"].append(r.group)
    return out


def _cdf(ax, values: list[float], label: str, **kw) -> None:
    if not values:
        return
    v = sorted(values)
    n = len(v)
    ax.step(v, [(i + 1) / n for i in range(n)], where="post", label=label, **kw)


def _finish_cdf(ax, title: str, log: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    if log:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)


def run_title(result: dict) -> str:
    c = result.get("config", {})
    rate = c.get("request_rate")
    pace = "rate inf" if rate in (None, "inf") or (isinstance(rate, float) and math.isinf(rate)) else f"rate {rate}/s"
    if c.get("max_concurrency"):
        pace += f", concurrency {c['max_concurrency']}"
    return f"{c.get('label', '?')}: {c.get('workload', '?')}, {pace}"


def plot_run(result: dict, path: str) -> None:
    """2x2: TTFT CDF, ITL CDF (log x), E2EL CDF, every ITL over the run's time (decode stalls show as spikes)."""
    plt = _plt()
    s = series(result)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (a, b), (c, d) = axes
    _cdf(a, s["ttft"], "TTFT")
    _finish_cdf(a, "TTFT CDF", log=False)
    _cdf(b, s["itl"], "ITL")
    _finish_cdf(b, "ITL CDF", log=bool(s["itl"]) and min(s["itl"]) > 0)
    _cdf(c, s["e2el"], "E2EL")
    _finish_cdf(c, "End-to-end latency CDF", log=False)
    groups = sorted({g for g in s["itl_group"]}, key=lambda g: (g is None, str(g)))
    for g in groups:
        idx = [i for i, gg in enumerate(s["itl_group"]) if gg == g]
        d.scatter([s["itl_t"][i] for i in idx], [s["itl_v"][i] for i in idx], s=3, alpha=0.5,
                  label=g if g is not None else "all")
    d.set_title("Inter-token gaps over time")
    d.set_xlabel("time since start (s)")
    d.set_ylabel("gap (ms)")
    if s["itl_v"] and min(s["itl_v"]) > 0:
        d.set_yscale("log")
    if len(groups) > 1:
        d.legend()
    d.grid(True, alpha=0.3)
    summ = result.get("summary", {})
    sub = (f"out {summ.get('output_throughput') or 0:.1f} tok/s, req {summ.get('request_throughput') or 0:.2f}/s, "
           f"completed {summ.get('completed')}, failed {summ.get('failed')}")
    fig.suptitle(run_title(result) + "\n" + sub)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate_value(result: dict) -> float:
    r = result.get("config", {}).get("request_rate")
    if r in (None, "inf"):
        return math.inf
    return float(r)


def plot_compare(results: list[dict], names: list[str], path: str) -> None:
    """2x2: TTFT CDFs, ITL CDFs (one line per run), output throughput and p99 TTFT against the offered request
    rate (or the max concurrency when only that varies), one line per engine label."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (a, b), (c, d) = axes
    for res, name in zip(results, names):
        s = series(res)
        _cdf(a, s["ttft"], name)
        _cdf(b, s["itl"], name)
    _finish_cdf(a, "TTFT CDF", log=False)
    all_itl = [v for res in results for v in series(res)["itl"]]
    _finish_cdf(b, "ITL CDF", log=bool(all_itl) and min(all_itl) > 0)
    a.legend(fontsize=8)
    b.legend(fontsize=8)

    rates = {_rate_value(r) for r in results}
    concs = {r.get("config", {}).get("max_concurrency") for r in results}
    by_conc = len(rates) == 1 and len(concs) > 1
    finite = [x for x in rates if not math.isinf(x)]
    inf_x = (max(finite) * 1.25 if finite else 1.0)

    def xval(res: dict) -> float:
        if by_conc:
            return float(res.get("config", {}).get("max_concurrency") or 0)
        r = _rate_value(res)
        return inf_x if math.isinf(r) else r

    multi_workload = len({r.get("config", {}).get("workload") for r in results}) > 1
    labels: dict[str, list[dict]] = {}  # one line per engine label (and workload, when they differ)
    for res in results:
        cfg = res.get("config", {})
        key = (cfg.get("label") or "?") + (f" [{cfg.get('workload')}]" if multi_workload else "")
        labels.setdefault(key, []).append(res)
    for label, runs in labels.items():
        runs = sorted(runs, key=xval)
        xs = [xval(r) for r in runs]
        c.plot(xs, [r["summary"].get("output_throughput") or 0 for r in runs], marker="o", label=label)
        d.plot(xs, [r["summary"].get("p99_ttft_ms") or float("nan") for r in runs], marker="o", label=label)
    xlabel = "max concurrency" if by_conc else "offered request rate (req/s)"
    for ax, title, ylab in ((c, "Output token throughput", "tok/s"), (d, "P99 TTFT", "ms")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylab)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if not by_conc and any(math.isinf(x) for x in rates):
            ticks = sorted(set(finite)) + [inf_x]
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in sorted(set(finite))] + ["inf"])
    workloads = sorted({r.get("config", {}).get("workload", "?") for r in results})
    fig.suptitle("kvserve bench compare: " + ", ".join(workloads))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
