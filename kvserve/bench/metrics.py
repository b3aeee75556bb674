"""Serving-benchmark metrics: per-request timelines -> one summary dict, with vLLM `bench serve`'s metric names.

Pure functions, no I/O, standard library only. Every time is in seconds on one monotonic clock (the client's
`time.perf_counter()`, relative to the start of the run); summaries report latencies in milliseconds.

Definitions (per request, successful requests only):

- TTFT (time to first token) = first_token_time - send_time, where the first token is the first streamed chunk
  that carries non-empty text (a chat stream's opening role-only chunk does not count).
- E2EL (end-to-end latency) = end_time - send_time, end_time being when the last byte of the stream arrived.
- ITL (inter-token latency) = every gap between two consecutive text-carrying chunks, token_times[i] - token_times[i-1].
  A chunk that carries several tokens counts as one gap, as in vLLM. All gaps of all requests are pooled.
- TPOT (time per output token) = (E2EL - TTFT) / (output_tokens - 1), only for requests with output_tokens > 1.
  output_tokens is the server's `usage.completion_tokens` when it reported one, else the number of text chunks.

Aggregates:

- duration = the run's wall time (given by the caller; by default the last end_time minus the first send_time).
- completed / failed: requests that ended successfully / with an error (HTTP error, error event, timeout, cut stream).
- total_input_tokens, total_output_tokens, total_cached_tokens: sums over completed requests (cached tokens only
  where the server reported them; None when none did). prefix_cache_hit_rate = cached / prompt tokens over the
  completed requests that reported cached tokens.
- request_throughput = completed / duration; output_throughput = total_output_tokens / duration;
  total_token_throughput = (total_input_tokens + total_output_tokens) / duration.
- request_goodput = completed requests meeting every SLO given (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms,
  E2EL <= slo_e2el_ms) / duration; a request with one output token has no TPOT and passes the TPOT SLO.
  None when no SLO is given.
- for each of ttft, tpot, itl, e2el: mean_X_ms, median_X_ms, std_X_ms (population), p50/p90/p99_X_ms, max_X_ms.
  Percentiles use linear interpolation between closest ranks, exactly numpy.percentile's default ("linear"):
  the q-th percentile of sorted values v[0..n-1] is v[k] + (v[k+1] - v[k]) * f with h = (n - 1) * q / 100,
  k = floor(h), f = h - k. Empty samples give None.
- max_itl_ms is the longest decode stall any stream saw (the figure the `stall` workload is about).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds since the start of the run)."""

    request_id: str
    send_time: float
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of every text-carrying chunk, first included
    end_time: float | None = None
    prompt_tokens: int = 0  # the server's usage.prompt_tokens, else the client's own count
    output_tokens: int = 0  # the server's usage.completion_tokens, else the number of text chunks
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens when the server reports it
    success: bool = False
    error: str | None = None
    max_tokens: int | None = None
    group: str | None = None  # e.g. "stream" / "long-prompt" in the stall workload
    conversation: int | None = None
    turn: int | None = None
    output_text: str = ""

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.send_time

    @property
    def e2el(self) -> float | None:
        if self.end_time is None:
            return None
        return self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [t[i] - t[i - 1] for i in range(1, len(t))]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_dict(self, keep_text: bool = False) -> dict:
        d = asdict(self)
        if not keep_text:
            d.pop("output_text")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


def percentile(values: list[float], q: float) -> float | None:
    """numpy.percentile(values, q) with the default linear method; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    v = sorted(values)
    h = (len(v) - 1) * q / 100.0
    k = math.floor(h)
    if k + 1 >= len(v):
        return float(v[-1])
    return v[k] + (v[k + 1] - v[k]) * (h - k)


def describe(values: list[float], name: str, scale: float = 1000.0,
             percentiles: Iterable[float] = PERCENTILES) -> dict:
    """{mean_name_ms, median_name_ms, std_name_ms, p50_name_ms, ..., max_name_ms} of values given in seconds."""
    out: dict = {}
    n = len(values)
    if n:
        mean = math.fsum(values) / n
        var = math.fsum((x - mean) ** 2 for x in values) / n
        out[f"mean_{name}_ms"] = mean * scale
        out[f"median_{name}_ms"] = percentile(values, 50) * scale
        out[f"std_{name}_ms"] = math.sqrt(var) * scale
    else:
        out[f"mean_{name}_ms"] = out[f"median_{name}_ms"] = out[f"std_{name}_ms"] = None
    for p in percentiles:
        key = f"p{p:g}_{name}_ms"
        val = percentile(values, p)
        out[key] = None if val is None else val * scale
    out[f"max_{name}_ms"] = max(values) * scale if n else None
    return out


def meets_slo(r: RequestRecord, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
              slo_e2el_ms: float | None = None) -> bool:
    if not r.success:
        return False
    if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000.0 > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and r.tpot is not None and r.tpot * 1000.0 > slo_tpot_ms:
        return False
    if slo_e2el_ms is not None and (r.e2el is None or r.e2el * 1000.0 > slo_e2el_ms):
        return False
    return True


def summarize(records: list[RequestRecord], duration: float | None = None, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, slo_e2el_ms: float | None = None,
              percentiles: Iterable[float] = PERCENTILES, by_group: bool = True) -> dict:
    """The summary dict of a run (see the module docstring for every definition)."""
    percentiles = tuple(percentiles)
    ok = [r for r in records if r.success]
    if duration is None:
        sends = [r.send_time for r in records]
        ends = [r.end_time for r in records if r.end_time is not None]
        duration = (max(ends) - min(sends)) if sends and ends else 0.0
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None]  # servers that report cached tokens
    cached_sum = sum(r.cached_tokens for r in reported)
    reported_in = sum(r.prompt_tokens for r in reported)

    def rate(x: float) -> float | None:
        return x / duration if duration > 0 else None

    s: dict = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_cached_tokens": cached_sum if reported else None,
        "prefix_cache_hit_rate": cached_sum / reported_in if reported_in else None,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
    }
    slos = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "slo_e2el_ms": slo_e2el_ms}
    if any(v is not None for v in slos.values()):
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms, slo_e2el_ms) for r in ok)
        s["request_goodput"] = rate(good)
        s["good_requests"] = good
    else:
        s["request_goodput"] = None
        s["good_requests"] = None
    s.update({k: v for k, v in slos.items() if v is not None})
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [g for r in ok for g in r.itls]
    e2els = [r.e2el for r in ok if r.e2el is not None]
    for name, vals in zip(LATENCIES, (ttfts, tpots, itls, e2els)):
        s.update(describe(vals, name, percentiles=percentiles))
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = (r.error or "unknown").split(":")[0][:80]
            errors[key] = errors.get(key, 0) + 1
    s["errors"] = errors
    groups = sorted({r.group for r in records if r.group is not None})
    if by_group and groups:
        s["groups"] = {g: summarize([r for r in records if r.group == g], duration, slo_ttft_ms, slo_tpot_ms,
                                    slo_e2el_ms, percentiles, by_group=False) for g in groups}
    return s


# the rows `kvserve bench serve` prints and `kvserve bench compare` tabulates, in order
REPORT_ROWS = [
    ("completed", "Successful requests", "{:d}"),
    ("failed", "Failed requests", "{:d}"),
    ("duration", "Benchmark duration (s)", "{:.2f}"),
    ("total_input_tokens", "Total input tokens", "{:d}"),
    ("total_output_tokens", "Total generated tokens", "{:d}"),
    ("total_cached_tokens", "Total cached prompt tokens", "{:d}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("request_goodput", "Request goodput (req/s)", "{:.2f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.2f}"),
    ("total_token_throughput", "Total token throughput (tok/s)", "{:.2f}"),
] + [(f"{stat}_{m}_ms", f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {m.upper()} (ms)",
      "{:.2f}") for m in LATENCIES for stat in ("mean", "median", "p90", "p99")] + [
    ("max_itl_ms", "Max ITL, longest stall (ms)", "{:.2f}"),
]


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "{:d}":
        return str(int(value))
    return spec.format(value)


def report_text(summary: dict, title: str = "Serving Benchmark Result") -> str:
    """A plain-text block like vLLM bench serve's, for the terminal."""
    lines = [f"{' ' + title + ' ':=^60}"]
    for key, label, spec in REPORT_ROWS:
        if key in summary and (summary[key] is not None or key in ("request_goodput",)):
            if key == "request_goodput" and summary[key] is None:
                continue
            lines.append(f"{label + ':':<44}{fmt(summary[key], spec):>16}")
    for g, gs in (summary.get("groups") or {}).items():
        lines.append(f"{' group ' + g + ' ':-^60}")
        for key in ("completed", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "max_itl_ms",
                    "median_tpot_ms"):
            label = next(lab for k, lab, _ in REPORT_ROWS if k == key)
            spec = next(sp for k, _, sp in REPORT_ROWS if k == key)
            lines.append(f"{label + ':':<44}{fmt(gs.get(key), spec):>16}")
    if summary.get("errors"):
        lines.append("Errors: " + ", ".join(f"{k} x{v}" for k, v in summary["errors"].items()))
    lines.append("=" * 60)
    return "\n".join(lines)
