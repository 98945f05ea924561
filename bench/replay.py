"""Replay: `payments replay --into` an empty SQLite database, timed, from stored WORKLOADS events.

A fresh nats-server; the registry worker registers the bootstrapped orchestrators first (so
the registrations come before the workloads in stored order, as in a live system), then N
time-based workload events are stored in WORKLOADS. The real CLI (`payments replay --into
sqlite+aiosqlite:///...`, a subprocess) then rebuilds every projection into an empty file and
is timed from start to exit; the ledger entries it wrote are counted.

    .venv/bin/python bench/replay.py [--events 200000]

Target (DESIGN.md §6): replay of 1,000,000 events into an empty database <= 120 s. With fewer
events the time for 1,000,000 is also printed as a linear projection, labelled as such.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.health_ingest import provision_streams
from bench.ledger import BOOTSTRAP, count, store_backlog, wait_for_bootstrap
from tests.harness import create_database, stack_env, start_nats, start_worker

TARGET_EVENTS = 1_000_000
TARGET_S = 120.0


async def run(events: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    nats = start_nats(root / "nats")
    try:
        live = await create_database("sqlite", root)
        await provision_streams(nats)
        env = stack_env(nats, live, root / "data", PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP)
        registry = start_worker("registry", env, root)
        await wait_for_bootstrap(root / "payments.db")
        registry.terminate()
        publish_rate = await store_backlog(nats.url, nats.passwords.ops, events)
        target = root / "replay.db"
        payments = str(Path(sys.executable).parent / "payments")
        argv = [payments, "replay", "--into", f"sqlite+aiosqlite:///{target}", "--quiet"]
        started = time.perf_counter()
        finished = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if finished.returncode != 0:
            raise RuntimeError(f"payments replay failed:\n{finished.stderr[-2000:]}")
        return {
            "events": events,
            "seconds": seconds,
            "entries": count(target, "select count(*) from ledger_entries"),
            "publish_per_s": publish_rate,
        }
    finally:
        nats.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store, databases and logs of this run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    r = asyncio.run(run(args.events))
    rate = r["events"] / r["seconds"]
    print(
        f"replay: {r['events']:,.0f} stored workload events -> {r['entries']:,.0f} ledger entries "
        f"in {r['seconds']:.1f} s ({rate:,.0f} events/s, whole CLI run)"
    )
    if args.events == TARGET_EVENTS:
        print(f"  1,000,000 events: {r['seconds']:.0f} s (target <= {TARGET_S:.0f} s)")
    else:
        projected = TARGET_EVENTS / rate
        print(f"  1,000,000 events, projected linearly: {projected:.0f} s (target <= 120 s)")
    print(f"  (stored at {r['publish_per_s']:,.0f} msg/s before the replay)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
