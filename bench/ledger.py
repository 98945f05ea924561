"""Ledger benchmark: events/s from the WORKLOADS stream to committed ledger entries (SQLite).

A fresh nats-server and SQLite database; N time-based workload events (distinct workload ids,
five bootstrapped orchestrators) are stored in WORKLOADS first, then real ledger worker
processes (`faststream run workers.ledger:app`, `--workers`, default 1) are started and timed
until the inbox holds all N; the rate counts from the first committed batch on.
The raw nats-py fetch+ack ceiling is measured in the same run, and the ratio printed.

    .venv/bin/python bench/ledger.py [--events 20000] [--workers 1]

Target (DESIGN.md §6): >= 10,000 events/s from stream to committed entries on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceiling import measure_ceiling
from bench.procstat import OTHER, CpuMeter
from contracts import subjects
from contracts.events import WorkloadTimeRecordedV1
from contracts.streams import WORKLOADS
from shared.nats_client import connect
from shared.provisioning import provision
from shared.publishing import event_headers
from shared.settings import build_settings
from tests.harness import create_database, stack_env, start_nats, start_worker, worker_process

ORCHESTRATORS = 5
DRAIN_TIMEOUT_S = 600.0
BOOTSTRAP_TIMEOUT_S = 30.0
BOOTSTRAP = json.dumps(
    [
        {"orchestrator_id": f"orch-{i}", "address": "0x" + f"{i + 1:040x}"}
        for i in range(ORCHESTRATORS)
    ]
)


# Progress is polled by the newest inbox id (an index lookup), not by counting rows: a count
# walks the whole index, and every 20 ms that took CPU from the workers as the table grew. The
# ledger's rows are the only ones written meanwhile; the exact count confirms the end.
NEWEST_INBOX_ROW = "select coalesce(max(id), 0) from processed_events"
LEDGER_INBOX_ROWS = "select count(*) from processed_events where consumer = 'ledger-workloads'"


def count(db_path: Path, sql: str) -> int:
    with sqlite3.connect(db_path) as connection:
        return int(connection.execute(sql).fetchone()[0])


async def store_backlog(url: str, ops_password: str, events: int) -> float:
    settings = build_settings(nats_url=url, nats_ops_password=ops_password)
    nc = await connect(settings, "ops", "bench-ledger")
    js = nc.jetstream()
    await provision(js, replicas=1)
    started = time.perf_counter()
    now = datetime.now(UTC)
    for seq in range(events):
        event = WorkloadTimeRecordedV1(
            workload_id=f"bench-{seq}",
            orchestrator_id=f"orch-{seq % ORCHESTRATORS}",
            duration_ms=180_000,
            credit_eth_per_minute="0.000005353596",
            artifact_uri="/out.webm",
            body_sha256=hashlib.sha256(str(seq).encode()).hexdigest(),
            received_at=now,
        )
        key = f"workload_time:bench-{seq}"
        await js.publish_async(
            subjects.workload_time(event.orchestrator_id),
            event.model_dump_json().encode(),
            stream=WORKLOADS.name,
            headers=event_headers(event, key),
        )
    await js.publish_async_completed()
    await nc.close()
    return events / (time.perf_counter() - started)


async def wait_for_bootstrap(db_path: Path) -> None:
    """Until the registry worker has registered the bootstrapped orchestrators."""
    deadline = time.monotonic() + BOOTSTRAP_TIMEOUT_S
    while count(db_path, "select count(*) from orchestrators") < ORCHESTRATORS:
        if time.monotonic() > deadline:
            raise TimeoutError("bootstrap orchestrators never appeared")
        await asyncio.sleep(0.05)


async def run(events: int, workers: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    nats = start_nats(root / "nats")
    try:
        database = await create_database("sqlite", root)
        db_path = root / "payments.db"
        publish_rate = await store_backlog(nats.url, nats.passwords.ops, events)
        env = stack_env(nats, database, root / "data", PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP)
        registry = start_worker("registry", env, root)
        await wait_for_bootstrap(db_path)
        # Every copy is launched before any is waited for, so they start consuming together.
        ledgers = [worker_process("ledger", env, root, copy).start() for copy in range(workers)]
        pids = {f"ledger-{copy}": p.process.pid for copy, p in enumerate(ledgers) if p.process}
        if nats.process is not None:
            pids["nats-server"] = nats.process.pid
        meter = CpuMeter(pids)
        started = time.perf_counter()
        first_seen: tuple[float, int] | None = None
        baseline = count(db_path, NEWEST_INBOX_ROW)
        while (done := count(db_path, NEWEST_INBOX_ROW) - baseline) < events or (
            count(db_path, LEDGER_INBOX_ROWS) < events
        ):
            if first_seen is None and done:
                first_seen = (time.perf_counter(), done)
                meter.start()  # from the first commit on, as the steady rate
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                raise TimeoutError("the ledger worker did not drain the backlog")
            await asyncio.sleep(0.02)
        finished = time.perf_counter()
        used = meter.stop() if first_seen else {}
        elapsed = finished - started
        seen_at, seen_count = first_seen or (started, 0)
        entries = count(db_path, "select count(*) from ledger_entries")
        for ledger in ledgers:
            ledger.terminate()
        registry.terminate()
        return {
            "events": events,
            "entries": entries,
            "seconds": elapsed,
            "events_per_s": events / elapsed,
            # From the first committed batch on: the worker's start-up (imports, connections)
            # is not part of "stream to committed entries".
            "steady_events_per_s": (events - seen_count) / max(finished - seen_at, 1e-9),
            "publish_per_s": publish_rate,
            # CPU each process spent per committed event, from the first commit on.
            "cpu_us_per_event": {
                name: 1e6 * seconds / max(events - seen_count, 1) for name, seconds in used.items()
            },
        }
    finally:
        nats.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store, database and logs of this run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument(
        "--workers", type=int, default=1, help="ledger worker processes sharing the consumer"
    )
    args = parser.parse_args()
    ceiling = measure_ceiling(seconds=args.ceiling_seconds)
    result = asyncio.run(run(args.events, args.workers))
    fetch_ack = float(ceiling.get("fetch_ack_per_s", 0.0))
    print(
        f"ledger: {result['events']:,} stored events -> {result['entries']:,} entries "
        f"in {result['seconds']:.1f} s with {args.workers} ledger worker process(es)"
    )
    print(
        f"  {result['steady_events_per_s']:,.0f} events/s to committed entries from the first "
        f"commit on (target >= 10,000); {result['events_per_s']:,.0f} with the start-up"
    )
    if fetch_ack:
        ratio = result["steady_events_per_s"] / fetch_ack
        print(f"  raw fetch+ack ceiling {fetch_ack:,.0f} msg/s; ratio {ratio:.2f}x")
    cpu = result["cpu_us_per_event"]
    print(
        "  cpu per event: "
        + ", ".join(f"{name} {value:.0f} us" for name, value in cpu.items() if name != OTHER)
        + f"; the rest of the machine {cpu.get(OTHER, 0.0):.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
