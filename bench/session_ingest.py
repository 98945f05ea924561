"""Session-heartbeat ingest: POST /api/sessions/events from 64 connections through the real stack.

A fresh nats-server and SQLite database, one registry and one sessions worker (none with
`--without-worker`), one api; every connection keeps its own sessions alive (a start, then
heartbeats, each with its own event_id so every request is one stored event). Prints
requests/s, p50/p99/max latency, the time until the sessions worker has applied everything, and
the ratios to the raw nats-py ceiling measured in the same run.

The load comes from `wrk` (C, one thread, a Lua script giving every request its own event_id)
when it is installed (`apt-get install wrk`), else, or with `--client aiohttp`, from an aiohttp
client in this process. On the 2-core machine the client shares the cores with the stack: the
aiohttp client costs about 0.3-0.6 ms of CPU per request, wrk a few microseconds, so only the
wrk figure measures the pipeline rather than the load generator.

    .venv/bin/python bench/session_ingest.py [--connections 64] [--seconds 15] [--client wrk]

Target (DESIGN.md §6): >= 3,000 requests/s with p99 <= 50 ms, each event stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.ceiling import measure_ceiling
from bench.health_ingest import percentile, provision_streams
from bench.procstat import OTHER, CpuMeter, rss_mb
from bench.wrk import installed as wrk_installed
from bench.wrk import run_wrk
from tests.harness import (
    ADMIN_TOKEN,
    Process,
    create_database,
    stack_env,
    start_api,
    start_nats,
    start_worker,
)

ORCH_ID = "bench-orch-1"
UPSTREAM = "198.51.100.9"
BOOTSTRAP = json.dumps(
    [{"orchestrator_id": ORCH_ID, "address": "0x" + "3" * 40, "host_public_ip": UPSTREAM}]
)
SESSIONS_PER_CONNECTION = 4
DRAIN_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 30.0
MACHINE_CORES = 2
TARGET_REQUESTS_PER_S = 3_000


def applied(db_path: Path, consumer: str = "sessions") -> int:
    """Events `consumer` has applied: its rows in the inbox."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT count(*) FROM processed_events WHERE consumer = ?", (consumer,))
        return int(row.fetchone()[0])


async def drive(base: str, connections: int, seconds: float) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def client(number: int) -> None:
            sent = 0
            while time.perf_counter() < deadline:
                session_id = f"bench-{number}-{sent % SESSIONS_PER_CONNECTION}"
                body = {
                    "session_id": session_id,
                    "upstream_addr": UPSTREAM,
                    "upstream_port": 443,
                    "edge_id": f"edge-{number % 8}",
                    "event": "start" if sent < SESSIONS_PER_CONNECTION else "heartbeat",
                    "event_id": f"{number}-{sent}",
                }
                started = time.perf_counter()
                async with http.post(f"{base}/api/sessions/events", json=body) as answer:
                    await answer.read()
                    key = str(answer.status)
                latencies.append(time.perf_counter() - started)
                statuses[key] = statuses.get(key, 0) + 1
                sent += 1

        await asyncio.gather(*(client(n) for n in range(connections)))
    return latencies, statuses


# Every wrk request is a heartbeat with its own event_id; a heartbeat opens a session it does not
# know, so no separate start is needed.
HEARTBEATS_LUA = """
local threads = {}
local next_thread = 0
function setup(thread)
  thread:set("thread_number", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end
local sent = 0
local path = "/api/sessions/events"
local headers = {["Content-Type"] = "application/json"}
function request()
  sent = sent + 1
  local body = string.format(
    '{"session_id":"bench-%d-%d","upstream_addr":"UPSTREAM","upstream_port":443,' ..
    '"edge_id":"edge-%d","event":"heartbeat","event_id":"wrk-%d-%d"}',
    thread_number, sent % 256, sent % 8, thread_number, sent)
  return wrk.format("POST", path, headers, body)
end
"""


def drive_wrk(base: str, connections: int, seconds: float, workdir: Path) -> dict[str, float]:
    """Run wrk against the api; requests, duration and latency percentiles from its done()."""
    script = HEARTBEATS_LUA.replace("UPSTREAM", UPSTREAM)
    url = f"{base}/api/sessions/events"
    return run_wrk(url, script, connections, seconds, workdir, "session_heartbeats")


async def drive_aiohttp(base: str, connections: int, seconds: float) -> dict[str, float]:
    started = time.perf_counter()
    latencies, statuses = await drive(base, connections, seconds)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "accepted": statuses.get("202", 0),
        "elapsed_s": elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "errors": sum(v for k, v in statuses.items() if k != "202"),
    }


async def run(
    connections: int, seconds: float, client: str, apis: int, with_worker: bool
) -> tuple[dict[str, float], dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    nats = start_nats(root / "nats")
    try:
        database = await create_database("sqlite", root)
        await provision_streams(nats)
        env = stack_env(
            nats,
            database,
            root / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP,
            PAYMENTS_SESSION_CREDIT_ETH_PER_MINUTE="0.06",
            PAYMENTS_API_REUSE_PORT="true" if apis > 1 else "false",
        )
        # By the name the CPU report gives them: registry, sessions, api, api-2, ...
        processes = {"registry": start_worker("registry", env, root)}
        if with_worker:
            processes["sessions"] = start_worker("sessions", env, root)
        api, base = start_api(env, root)
        processes["api"] = api
        port = int(base.rsplit(":", 1)[1])
        for number in range(2, apis + 1):
            processes[f"api-{number}"] = start_api(env, root, port=port)[0]
        await wait_for_orchestrator_at(base)
        meter = CpuMeter(stack_pids(nats.process, processes))
        started = time.perf_counter()
        meter.start()
        if client == "wrk":
            figures = await asyncio.to_thread(drive_wrk, base, connections, seconds, root)
        else:
            figures = await drive_aiohttp(base, connections, seconds)
        used = meter.stop()
        figures["requests_per_s"] = figures["requests"] / figures["elapsed_s"]
        # CPU each process spent per request during the load window (the drain after it
        # is the worker catching up, not serving requests).
        cpu_us = {name: 1e6 * s / max(figures["requests"], 1) for name, s in used.items()}
        while with_worker and applied(root / "payments.db") < figures["accepted"]:
            if time.perf_counter() - started > DRAIN_TIMEOUT_S:
                break
            await asyncio.sleep(0.1)
        total_elapsed = time.perf_counter() - started
        figures["applied_per_s"] = applied(root / "payments.db") / total_elapsed
        figures["api_rss_mb"] = (rss_mb(api.process.pid) or 0.0) if api.process else 0.0
        for process in processes.values():
            process.terminate()
        return figures, cpu_us
    finally:
        nats.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store, database and logs of this run


def stack_pids(
    nats: subprocess.Popen[bytes] | None, processes: dict[str, Process]
) -> dict[str, int]:
    """The pids of the processes whose CPU the run reports, by name, nats-server included."""
    pids = {name: p.process.pid for name, p in processes.items() if p.process}
    if nats is not None:
        pids["nats-server"] = nats.pid
    return pids


def print_cpu(cpu_us: dict[str, float]) -> None:
    """CPU per request by process, and what the target leaves: 2 cores at 3,000/s give 667 us."""
    total = sum(cpu_us.values())
    budget = 1e6 * MACHINE_CORES / TARGET_REQUESTS_PER_S
    print(
        "  cpu/req   "
        + ", ".join(f"{name} {us:.0f} us" for name, us in cpu_us.items() if name != OTHER)
        + f"; the rest of the machine (wrk included) {cpu_us.get(OTHER, 0.0):.0f} us"
    )
    cores = f"{MACHINE_CORES} cores at the target give {budget:.0f} us"
    print(f"{'':12}all {total:.0f} us a request; {cores}")


async def wait_for_orchestrator_at(base: str) -> None:
    """Until the registry worker has applied the bootstrap registration."""
    async with aiohttp.ClientSession() as http:
        for _attempt in range(300):
            url = f"{base}/api/orchestrators/{ORCH_ID}"
            async with http.get(url, headers={"X-Admin-Token": ADMIN_TOKEN}) as answer:
                if answer.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the bootstrap orchestrator never appeared")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument(
        "--client",
        choices=("wrk", "aiohttp"),
        default="wrk" if wrk_installed() else "aiohttp",
        help="load generator (default: wrk when installed)",
    )
    parser.add_argument(
        "--apis", type=int, default=1, help="api processes sharing the port (SO_REUSEPORT)"
    )
    parser.add_argument(
        "--without-worker",
        action="store_true",
        help="no sessions worker: the api and nats-server alone, to tell their share apart",
    )
    args = parser.parse_args()
    ceiling = measure_ceiling(seconds=args.ceiling_seconds)
    r, cpu_us = asyncio.run(
        run(args.connections, args.seconds, args.client, args.apis, not args.without_worker)
    )
    raw_publish = float(ceiling["publish_per_s"])
    rps, ratio = r["requests_per_s"], r["requests_per_s"] / raw_publish
    print(
        f"session heartbeats: {args.connections} connections, {r['requests']:,.0f} requests"
        f" ({args.client}, {args.apis} api process(es))"
    )
    print(f"  HTTP      {rps:,.0f} requests/s (target >= 3,000), errors {r['errors']:.0f}")
    print(f"  latency   p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (target <= 50)")
    if not args.without_worker:
        print(f"  applied   {r['applied_per_s']:,.0f} events/s end to end")
    print(f"  ceiling   raw publish {raw_publish:,.0f} msg/s; HTTP/raw {ratio:.2f}x")
    print_cpu(cpu_us)
    print(f"  api RSS   {r['api_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
