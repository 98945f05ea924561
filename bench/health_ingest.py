"""Single-event ingest through the real stack: POST /api/orchestrators/{id}/health.

Starts nats-server from the pinned wheel (provisioned as `payments nats provision` does), a fresh
SQLite database migrated to head, one registry worker process and one api process (the helpers
in tests/harness.py), with one orchestrator bootstrapped through PAYMENTS_BOOTSTRAP_ORCHESTRATORS.
Then N concurrent aiohttp connections (default 64) post health reports, every one with different
data (so every one is a new event, never a duplicate), until `--seconds` (20) or `--requests`
(50,000) runs out, whichever comes first. All traffic goes to 127.0.0.1.

It prints HTTP requests/s, p50/p99/max latency, errors by status, how long the registry worker
took to apply all of them (rows of consumer 'registry-health' in processed_events), CPU used by
each process, the api's and the worker's RSS at the end, and the ratios to the raw nats-py
ceiling (bench/ceiling.py) measured first in the same run.

    .venv/bin/python bench/health_ingest.py [--connections 64] [--seconds 20] [--requests 50000]
        [--no-ceiling] [--py-spy DIR] [--keep]

`--py-spy DIR` records flame graphs of the api and the worker during the load (needs py-spy,
installed by hand into the venv for measurement only; it is not a project dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import aiohttp  # noqa: E402

from bench.ceiling import cpu_text, measure_ceiling, print_ceiling  # noqa: E402
from bench.procstat import OTHER, CpuMeter, load_average, peak_rss_mb, rss_mb  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.events import HealthReportV1  # noqa: E402
from contracts.streams import HEALTH, REGISTRY_HEALTH_CONSUMER  # noqa: E402
from shared.nats_client import connect  # noqa: E402
from shared.provisioning import provision  # noqa: E402
from shared.publishing import publish_event  # noqa: E402
from shared.settings import build_settings  # noqa: E402
from tests.harness import (  # noqa: E402
    create_database,
    headers,
    stack_env,
    start_api,
    start_nats,
    start_worker,
)

ORCH_ID = "bench-orch-1"
ORCH_ADDRESS = "0x2222222222222222222222222222222222222222"
BOOTSTRAP = json.dumps([{"orchestrator_id": ORCH_ID, "address": ORCH_ADDRESS}])
POLL_INTERVAL_S = 0.1
BACKLOG_CONCURRENCY = 256
BACKLOG_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
# DESIGN.md §6 targets this benchmark relates to.
TARGET_RPS = 3000.0
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.5
TARGET_API_RSS_MB = 150.0
TARGET_WORKER_RSS_MB = 200.0


@dataclass
class Options:
    connections: int = 64
    seconds: float = 20.0
    requests: int = 50_000
    drain_timeout_s: float = 180.0
    ceiling: bool = True
    ceiling_seconds: float = 5.0
    py_spy_dir: Path | None = None
    keep: bool = False
    json: bool = False
    backlog: int = 0


@dataclass
class Load:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    duplicates: int = 0
    issued: int = 0
    started: float = 0.0
    finished: float = 0.0


def report_body(seq: int) -> bytes:
    """A forwarder-like health report (~300 bytes), different for every request."""
    body = {
        "source": "forwarder",
        "data": {
            "summary": {"services_up": 2, "total_services": 2},
            "ip": f"203.0.113.{seq % 250 + 1}",
            "seq": seq,
            "uptime_s": 3600 + seq,
            "latency_ms": {"p50": 12 + seq % 7, "p99": 40 + seq % 13},
            "services": [
                {"name": "transcoder", "up": True, "sessions": seq % 5},
                {"name": "ai-runner", "up": True, "sessions": seq % 3},
            ],
            "version": "0.9.0",
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- the load -----------------------------------------------------------------------------------


async def drive(base: str, options: Options) -> Load:
    load = Load()
    url = f"{base}/api/orchestrators/{ORCH_ID}/health"
    request_headers = headers()
    connector = aiohttp.TCPConnector(limit=options.connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        load.started = time.perf_counter()
        deadline = load.started + options.seconds

        async def client() -> None:
            while time.perf_counter() < deadline and load.issued < options.requests:
                seq = load.issued
                load.issued += 1
                body = report_body(seq)
                sent = time.perf_counter()
                try:
                    async with http.post(url, data=body, headers=request_headers) as answer:
                        payload = await answer.read()
                        status = answer.status
                except (aiohttp.ClientError, TimeoutError) as error:
                    load.statuses[type(error).__name__] += 1
                    continue
                load.latencies_s.append(time.perf_counter() - sent)
                load.statuses[str(status)] += 1
                if status == 202:
                    load.accepted += 1
                    if json.loads(payload).get("duplicate"):
                        load.duplicates += 1

        await asyncio.gather(*(client() for _ in range(options.connections)))
        load.finished = time.perf_counter()
    return load


def applied_count(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT count(*) FROM processed_events WHERE consumer = ?",
            (REGISTRY_HEALTH_CONSUMER.durable,),
        ).fetchone()
    return int(row[0])


async def watch_applied(db_path: Path, marks: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """Record (perf_counter, applied rows) every POLL_INTERVAL_S until `stop`."""
    while not stop.is_set():
        marks.append((time.perf_counter(), await asyncio.to_thread(applied_count, db_path)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)


async def wait_for_orchestrator(base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{base}/api/orchestrators/{ORCH_ID}", headers=headers()) as answer:
                if answer.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"orchestrator {ORCH_ID} was not bootstrapped within {READY_TIMEOUT_S}s")


async def provision_streams(server: Any) -> None:
    settings = build_settings(nats_url=server.url, nats_ops_password=server.passwords.ops)
    nc = await connect(settings, "ops", "bench-provision")
    try:
        await provision(nc.jetstream(), replicas=1)
    finally:
        await nc.close()


def start_py_spy(
    out_dir: Path, pids: dict[str, int], seconds: float
) -> list[subprocess.Popen[bytes]]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--py-spy needs py-spy: .venv/bin/pip install py-spy (measurement only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = []
    # A CPU flame graph, and raw stacks of every thread including idle ones (wall-clock view:
    # where a request waits, not only where the CPU goes).
    variants: tuple[tuple[str, str, list[str]], ...] = (
        ("flamegraph", "svg", []),
        ("raw", "idle.txt", ["--idle", "--threads"]),
    )
    for name, pid in pids.items():
        for fmt, suffix, extra in variants:
            recorders.append(
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(max(1, int(seconds))),
                        "--rate",
                        "50",
                        "--format",
                        fmt,
                        "--output",
                        str(out_dir / f"{name}.{suffix}"),
                        "--nonblocking",
                        *extra,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return recorders


# -- the run ------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def _run(workdir: Path, options: Options) -> dict[str, Any]:
    server = start_nats(workdir / "nats")
    api = worker = None
    try:
        await provision_streams(server)
        database = await create_database("sqlite", workdir)
        db_path = workdir / "payments.db"
        env = stack_env(
            server, database, workdir / "data", PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP
        )
        worker = await asyncio.to_thread(start_worker, "registry", env, workdir)
        api, base = await asyncio.to_thread(start_api, env, workdir)
        await wait_for_orchestrator(base)
        assert api.process and worker.process and server.process
        pids = {
            "api": api.process.pid,
            "worker": worker.process.pid,
            "nats-server": server.process.pid,
            "load generator": os.getpid(),
        }
        recorders = []
        if options.py_spy_dir is not None:
            recorders = start_py_spy(
                options.py_spy_dir,
                {"api": pids["api"], "worker": pids["worker"]},
                min(options.seconds, 15.0),
            )
        before = await asyncio.to_thread(applied_count, db_path)
        load_before = load_average()
        marks: list[tuple[float, int]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_applied(db_path, marks, stop))
        http_cpu, total_cpu = CpuMeter(pids), CpuMeter(pids)
        http_cpu.start()
        total_cpu.start()
        load = await drive(base, options)
        http_cpu.stop()
        wanted = before + load.accepted - load.duplicates
        drain_deadline = time.perf_counter() + options.drain_timeout_s
        while time.perf_counter() < drain_deadline:
            if marks and marks[-1][1] >= wanted:
                break
            await asyncio.sleep(POLL_INTERVAL_S)
        stop.set()
        await watcher
        total_cpu.stop()
        for recorder in recorders:
            with contextlib.suppress(subprocess.TimeoutExpired):
                recorder.wait(30)
        done_at = next((t for t, n in marks if n >= wanted), None)
        applied = marks[-1][1] - before if marks else 0
        memory = {
            "api_rss_mb": rss_mb(pids["api"]),
            "api_peak_rss_mb": peak_rss_mb(pids["api"]),
            "worker_rss_mb": rss_mb(pids["worker"]),
            "worker_peak_rss_mb": peak_rss_mb(pids["worker"]),
        }
        backlog: dict[str, Any] = {}
        if options.backlog > 0:
            await asyncio.to_thread(worker.terminate)
            worker, backlog = await worker_backlog(server, env, workdir, db_path, options.backlog)
    finally:
        for process in (api, worker):
            if process is not None:
                await asyncio.to_thread(process.terminate)
        server.stop()

    http_s = load.finished - load.started
    latencies = sorted(load.latencies_s)
    e2e_s = (done_at - load.started) if done_at is not None else None
    total_s = (marks[-1][0] - load.started) if marks else http_s
    return {
        "connections": options.connections,
        "requests": load.issued,
        "responses": len(latencies),
        "accepted": load.accepted,
        "duplicates": load.duplicates,
        "http_seconds": http_s,
        "requests_per_s": len(latencies) / http_s,
        "accepted_per_s": load.accepted / http_s,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1] if latencies else float("nan"),
        "errors_by_status": {k: v for k, v in sorted(load.statuses.items()) if k != "202"},
        "statuses": dict(sorted(load.statuses.items())),
        "applied": applied,
        "all_applied": done_at is not None,
        "applied_seconds": e2e_s,
        "drain_after_http_s": (e2e_s - http_s) if e2e_s is not None else None,
        "end_to_end_events_per_s": (applied / e2e_s) if e2e_s else applied / max(total_s, 1e-9),
        "cpu_percent_during_http": {k: 100 * v / http_s for k, v in http_cpu.used.items()},
        # CPU cost per request of each process: less sensitive to a busy machine than rates.
        "cpu_ms_per_request": {
            k: 1000 * v / max(len(latencies), 1) for k, v in total_cpu.used.items() if k != OTHER
        },
        "cpu_percent_until_applied": {
            k: 100 * v / max(total_s, 1e-9) for k, v in total_cpu.used.items()
        },
        **memory,
        **backlog,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "applied_timeline": timeline(marks, load.started, before),
    }


async def worker_backlog(
    server: Any, env: dict[str, str], workdir: Path, db_path: Path, count: int
) -> tuple[Any, dict[str, Any]]:
    """The worker alone: `count` reports stored while it is stopped, then timed as it applies them.

    Publishes HealthReportV1 events exactly as the api does (same headers, same subject), with
    up to BACKLOG_CONCURRENCY in flight, starts a fresh worker process and measures how long it
    takes until they are all in processed_events.
    """
    before = await asyncio.to_thread(applied_count, db_path)
    settings = build_settings(nats_url=server.url, nats_ops_password=server.passwords.ops)
    nc = await connect(settings, "ops", "bench-backlog")
    js = nc.jetstream()
    slots = asyncio.Semaphore(BACKLOG_CONCURRENCY)
    start = datetime.now(UTC)

    async def one(seq: int) -> None:
        body = json.loads(report_body(seq))
        event = HealthReportV1(
            orchestrator_id=ORCH_ID,
            source=body["source"],
            data=body["data"],
            received_at=start + timedelta(microseconds=seq),
        )
        async with slots:
            await publish_event(
                js,
                stream=HEALTH.name,
                subject=subjects.health_report(ORCH_ID),
                event=event,
                key=f"bench-backlog:{seq}",
            )

    await asyncio.gather(*(one(seq) for seq in range(count)))
    await nc.close()
    worker = await asyncio.to_thread(start_worker, "registry", env, workdir, 1)
    assert worker.process is not None and server.process is not None
    meter = CpuMeter(
        {"worker": worker.process.pid, "nats-server": server.process.pid, "bench": os.getpid()}
    )
    meter.start()
    started = time.perf_counter()
    deadline = started + BACKLOG_TIMEOUT_S
    applied = 0
    while time.perf_counter() < deadline:
        applied = await asyncio.to_thread(applied_count, db_path) - before
        if applied >= count:
            break
        await asyncio.sleep(POLL_INTERVAL_S / 2)
    elapsed = time.perf_counter() - started
    used = meter.stop()
    return worker, {
        "backlog": count,
        "backlog_applied": applied,
        "backlog_seconds": elapsed,
        "backlog_events_per_s": applied / elapsed,
        "backlog_cpu_percent": {k: 100 * v / elapsed for k, v in used.items()},
        "backlog_worker_cpu_ms_per_event": 1000 * used["worker"] / max(applied, 1),
        "backlog_worker_rss_mb": rss_mb(worker.process.pid),
    }


def timeline(marks: list[tuple[float, int]], start: float, before: int) -> list[list[float]]:
    """[seconds since the first request, events applied] about once a second."""
    found: list[list[float]] = []
    next_at = 0.0
    for at, count in marks:
        if at - start >= next_at:
            found.append([round(at - start, 2), count - before])
            next_at = at - start + 1.0
    if marks and (not found or found[-1][1] != marks[-1][1] - before):
        found.append([round(marks[-1][0] - start, 2), marks[-1][1] - before])
    return found


def add_ratios(result: dict[str, Any], ceiling: dict[str, Any] | None) -> None:
    if ceiling is None:
        return
    pipeline = ceiling["pipeline_consumed_per_s"]
    result["ceiling"] = ceiling
    result["http_to_ceiling_pipeline"] = result["requests_per_s"] / pipeline
    result["e2e_to_ceiling_pipeline"] = result["end_to_end_events_per_s"] / pipeline
    result["http_to_ceiling_publish"] = result["requests_per_s"] / ceiling["publish_per_s"]


def run_health_ingest(
    options: Options, ceiling: dict[str, Any] | None = None, workdir: Path | None = None
) -> dict[str, Any]:
    """Run the benchmark; measures the ceiling first when `options.ceiling` and none is given."""
    if ceiling is None and options.ceiling:
        ceiling = measure_ceiling(seconds=options.ceiling_seconds)
        print_ceiling(ceiling)
    root = workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        result = asyncio.run(_run(root, options))
    finally:
        if workdir is None and not options.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif options.keep:
            print(f"kept {root} (nats store, database, process logs)")
    add_ratios(result, ceiling)
    return result


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_ingest(r: dict[str, Any]) -> None:
    print(
        f"health ingest: {r['connections']} connections, {r['requests']:,} requests "
        f"in {r['http_seconds']:.1f} s"
    )
    rps_ok = r["requests_per_s"] >= TARGET_RPS and r["p99_ms"] <= TARGET_P99_MS
    print(
        f"  HTTP            {r['requests_per_s']:>9,.0f} requests/s  ({r['accepted']:,} accepted, "
        f"{r['duplicates']} duplicates)  [{verdict(rps_ok)} ≥ {TARGET_RPS:,.0f}/s, "
        f"p99 ≤ {TARGET_P99_MS:.0f} ms]"
    )
    print(
        f"  latency         p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
        f"max {r['max_ms']:.1f} ms"
    )
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) or "none"
    print(f"  errors          {errors}")
    if r["all_applied"]:
        print(
            f"  applied         all {r['applied']:,} in {r['applied_seconds']:.1f} s from the "
            f"first request ({r['drain_after_http_s']:.1f} s after the last response): "
            f"{r['end_to_end_events_per_s']:,.0f} events/s end to end"
        )
    else:
        print(
            f"  applied         only {r['applied']:,} of {r['accepted']:,} before the drain "
            f"timeout: {r['end_to_end_events_per_s']:,.0f} events/s end to end"
        )
    if "ceiling" in r:
        ratio_ok = r["e2e_to_ceiling_pipeline"] >= TARGET_RATIO
        print(
            f"  vs ceiling      HTTP {r['http_to_ceiling_pipeline']:.2f}×, end to end "
            f"{r['e2e_to_ceiling_pipeline']:.2f}× the raw pipeline "
            f"({r['ceiling']['pipeline_consumed_per_s']:,.0f} msg/s); HTTP "
            f"{r['http_to_ceiling_publish']:.2f}× raw publish "
            f"[{verdict(ratio_ok)} ≥ {TARGET_RATIO}×]"
        )
    print(f"  cpu (HTTP)      {cpu_text(r['cpu_percent_during_http'])}")
    per_request = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_request"].items())
    print(f"  cpu per request {per_request} ms (until all applied)")
    print(f"  cpu (to apply)  {cpu_text(r['cpu_percent_until_applied'])}")
    print(
        "                  (100% = one core; the machine has 2. 'other processes' is everything "
        f"else on the machine; load average {r['load_average_before']:.2f} before, "
        f"{r['load_average_after']:.2f} after)"
    )
    print(
        f"  memory          api {r['api_rss_mb']:.0f} MB RSS (peak {r['api_peak_rss_mb']:.0f}) "
        f"[{verdict(r['api_rss_mb'] <= TARGET_API_RSS_MB)} ≤ {TARGET_API_RSS_MB:.0f}], "
        f"worker {r['worker_rss_mb']:.0f} MB RSS (peak {r['worker_peak_rss_mb']:.0f}) "
        f"[{verdict(r['worker_rss_mb'] <= TARGET_WORKER_RSS_MB)} ≤ "
        f"{TARGET_WORKER_RSS_MB:.0f}]"
    )
    if r.get("backlog"):
        print(
            f"  worker alone    {r['backlog_applied']:,} of {r['backlog']:,} stored reports "
            f"applied in {r['backlog_seconds']:.1f} s: {r['backlog_events_per_s']:,.0f} events/s; "
            f"cpu {cpu_text(r['backlog_cpu_percent'])} "
            f"({r['backlog_worker_cpu_ms_per_event']:.2f} ms worker CPU per event); worker RSS "
            f"{r['backlog_worker_rss_mb']:.0f} MB"
        )


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="stop after this long")
    parser.add_argument("--requests", type=int, default=50_000, help="or after this many")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the nats-py ceiling")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, time the worker alone applying N reports stored while it was stopped",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    options = Options(
        connections=args.connections,
        seconds=args.seconds,
        requests=args.requests,
        drain_timeout_s=args.drain_timeout,
        ceiling=not args.no_ceiling,
        ceiling_seconds=args.ceiling_seconds,
        py_spy_dir=args.py_spy,
        keep=args.keep,
        json=args.json,
        backlog=args.backlog,
    )
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result = run_health_ingest(options)
    print_ingest(result)
    if options.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
