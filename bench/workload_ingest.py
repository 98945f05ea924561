"""Content-job ingest: POST /api/workloads/time from 32 connections through the real stack.

A fresh nats-server and SQLite database, one registry and one ledger worker (none with
`--without-worker`), one api; every request is a new time-based workload (its own
`workload_id`) for one bootstrapped orchestrator, posted with the admin token by `wrk` (C, one
thread, required: `make bench` installs it). Prints requests/s, p50/p99, how fast the ledger
worker credited them end to end, and the ratio to the raw nats-py publish ceiling measured in
the same run.

    .venv/bin/python bench/workload_ingest.py [--connections 32] [--seconds 15]

Target (DESIGN.md §6): >= 2,000 requests/s, each workload stored.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceiling import measure_ceiling
from bench.health_ingest import provision_streams
from bench.procstat import rss_mb
from bench.session_ingest import BOOTSTRAP, ORCH_ID, applied, wait_for_orchestrator_at
from bench.wrk import installed as wrk_installed
from bench.wrk import run_wrk
from contracts.streams import LEDGER_WORKLOADS_CONSUMER
from tests.harness import (
    ADMIN_TOKEN,
    create_database,
    stack_env,
    start_api,
    start_nats,
    start_worker,
)

DRAIN_TIMEOUT_S = 600.0

# Each request a new workload: its id carries the connection's thread and a counter.
WORKLOADS_LUA = """
local sent = 0
local path = "/api/workloads/time"
local headers = {["Content-Type"] = "application/json", ["X-Admin-Token"] = "TOKEN"}
function request()
  sent = sent + 1
  local body = string.format(
    '{"workload_id":"wrk-%d-%d","orchestrator_id":"ORCH","duration_ms":180000,' ..
    '"artifact_uri":"/out/%d.webm"}', math.random(1, 1000000000), sent, sent)
  return wrk.format("POST", path, headers, body)
end
"""


async def run(connections: int, seconds: float, with_worker: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-workloads-"))
    nats = start_nats(root / "nats")
    try:
        database = await create_database("sqlite", root)
        await provision_streams(nats)
        env = stack_env(nats, database, root / "data", PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP)
        processes = [start_worker("registry", env, root)]
        if with_worker:
            processes.append(start_worker("ledger", env, root))
        api, base = start_api(env, root)
        await wait_for_orchestrator_at(base)
        started = time.perf_counter()
        script = WORKLOADS_LUA.replace("TOKEN", ADMIN_TOKEN).replace("ORCH", ORCH_ID)
        figures = await asyncio.to_thread(
            run_wrk, f"{base}/api/workloads/time", script, connections, seconds, root, "workloads"
        )
        figures["requests_per_s"] = figures["requests"] / figures["elapsed_s"]
        db_path = root / "payments.db"
        consumer = LEDGER_WORKLOADS_CONSUMER.durable
        while with_worker and applied(db_path, consumer) < figures["accepted"]:
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                break
            await asyncio.sleep(0.1)
        figures["credited"] = applied(db_path, consumer) if with_worker else 0.0
        figures["credited_per_s"] = figures["credited"] / (time.perf_counter() - started)
        figures["api_rss_mb"] = (rss_mb(api.process.pid) or 0.0) if api.process else 0.0
        api.terminate()
        for process in processes:
            process.terminate()
        return figures
    finally:
        nats.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store, database and logs of this run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument(
        "--without-worker",
        action="store_true",
        help="no ledger worker: the api and nats-server alone",
    )
    args = parser.parse_args()
    if not wrk_installed():
        print("wrk is not installed: `make bench` installs it (apt-get install wrk)")
        return 2
    ceiling = measure_ceiling(seconds=args.ceiling_seconds)
    r = asyncio.run(run(args.connections, args.seconds, not args.without_worker))
    raw_publish = float(ceiling["publish_per_s"])
    rps = r["requests_per_s"]
    print(f"content-job ingest: {args.connections} connections, {r['requests']:,.0f} requests")
    print(f"  HTTP      {rps:,.0f} requests/s (target >= 2,000), errors {r['errors']:.0f}")
    print(f"  latency   p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
    if not args.without_worker:
        print(
            f"  credited  {r['credited']:,.0f} workloads, {r['credited_per_s']:,.0f}/s end to end"
        )
    print(f"  ceiling   raw publish {raw_publish:,.0f} msg/s; HTTP/raw {rps / raw_publish:.2f}x")
    print(f"  api RSS   {r['api_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
