"""`make bench`: the raw nats-py ceiling, then the health-ingest benchmark against it, then a
summary table with the DESIGN.md §6 targets.

    .venv/bin/python bench/run_all.py [--seconds 20] [--requests 50000] [--connections 64]
        [--ceiling-seconds 5] [--backlog 20000] [--json]

Both run on this machine's two cores next to each other's processes and to anything else that
is running; the summary says how much CPU everything else took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.ceiling import measure_ceiling, print_ceiling  # noqa: E402
from bench.health_ingest import (  # noqa: E402
    TARGET_API_RSS_MB,
    TARGET_P99_MS,
    TARGET_RATIO,
    TARGET_RPS,
    TARGET_WORKER_RSS_MB,
    Options,
    print_ingest,
    run_health_ingest,
)
from bench.procstat import OTHER  # noqa: E402


def code_identity() -> str:
    """The commit measured, and whether tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{commit}" + (f" plus {len(changed)} changed tracked files" if changed else "")


def summary_rows(ceiling: dict[str, Any], r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISS"

    rows = [
        ("raw publish (C concurrent js.publish)", f"{ceiling['publish_per_s']:,.0f} msg/s", "", ""),
        ("raw fetch(256) + ack", f"{ceiling['fetch_ack_per_s']:,.0f} msg/s", "", ""),
        (
            "raw publish+consume pipeline",
            f"{ceiling['pipeline_consumed_per_s']:,.0f} msg/s",
            "",
            "",
        ),
        (
            f"health ingest, {r['connections']} connections",
            f"{r['requests_per_s']:,.0f} req/s",
            f"≥ {TARGET_RPS:,.0f} req/s",
            mark(r["requests_per_s"] >= TARGET_RPS),
        ),
        (
            "  latency p50 / p99 / max",
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} ms",
            f"p99 ≤ {TARGET_P99_MS:.0f} ms",
            mark(r["p99_ms"] <= TARGET_P99_MS),
        ),
        (
            "  errors",
            ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) or "none",
            "none",
            mark(not r["errors_by_status"]),
        ),
        (
            "HTTP to applied, end to end",
            f"{r['end_to_end_events_per_s']:,.0f} events/s"
            + ("" if r["all_applied"] else " (not all applied)"),
            "",
            "",
        ),
        (
            "  end to end / raw pipeline",
            f"{r['e2e_to_ceiling_pipeline']:.2f}×",
            f"≥ {TARGET_RATIO}×",
            mark(r["e2e_to_ceiling_pipeline"] >= TARGET_RATIO),
        ),
        ("  HTTP / raw pipeline", f"{r['http_to_ceiling_pipeline']:.2f}×", "", ""),
        (
            "CPU per request: api / worker",
            f"{r['cpu_ms_per_request']['api']:.2f} / {r['cpu_ms_per_request']['worker']:.2f} ms",
            "",
            "",
        ),
    ]
    if r.get("backlog"):
        rows.append(
            (
                "registry worker alone (stored backlog)",
                f"{r['backlog_events_per_s']:,.0f} events/s",
                "",
                "",
            )
        )
    rows += [
        (
            "api RSS at the end",
            f"{r['api_rss_mb']:.0f} MB",
            f"≤ {TARGET_API_RSS_MB:.0f} MB",
            mark(r["api_rss_mb"] <= TARGET_API_RSS_MB),
        ),
        (
            "worker RSS at the end",
            f"{r['worker_rss_mb']:.0f} MB",
            f"≤ {TARGET_WORKER_RSS_MB:.0f} MB",
            mark(r["worker_rss_mb"] <= TARGET_WORKER_RSS_MB),
        ),
        (
            "other processes' CPU during HTTP",
            f"{r['cpu_percent_during_http'][OTHER]:.0f}% of a core",
            "≈ 0",
            "",
        ),
    ]
    return rows


def print_summary(ceiling: dict[str, Any], r: dict[str, Any]) -> None:
    rows = summary_rows(ceiling, r)
    headings = ("figure", "measured", "target (DESIGN §6)", "")
    widths = [max(len(row[i]) for row in [headings, *rows]) for i in range(4)]
    print()
    print(
        f"summary: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, code {code_identity()}, "
        f"{platform.node()} ({platform.python_implementation()} {platform.python_version()})"
    )
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=20_000, help="0 skips the worker-alone run")
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args(argv)

    ceiling = measure_ceiling(seconds=args.ceiling_seconds, concurrency=args.connections)
    print_ceiling(ceiling)
    print()
    result = run_health_ingest(
        Options(
            connections=args.connections,
            seconds=args.seconds,
            requests=args.requests,
            ceiling=False,
            backlog=args.backlog,
        ),
        ceiling=ceiling,
    )
    print_ingest(result)
    print_summary(ceiling, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
