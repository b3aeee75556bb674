"""`kvserve bench`: load generators, workloads, metrics and the benchmark scripts (docs/benchmarks.md)."""

from __future__ import annotations

import json


def emit_report(report: dict, out: str | None, table: str) -> None:
    """A benchmark's JSON report to `out` (if given) and stdout, then its markdown table."""
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)
    print()
    print(table)
