"""End-to-end building blocks on top of tests.harness.

`running_stack` starts one whole stack (nats-server, a fresh database, N registry worker copies,
the api) that every test of a module shares, and the probes below read EFFECTS: stream message
counts through the ops user, inbox and dead-letter rows, orchestrator rows, Prometheus counters,
HTTP answers and CLI exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col, select

from contracts.streams import REGISTRY_HEALTH_CONSUMER
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import DeadLetter, Orchestrator, ProcessedEvent
from shared.embedded_nats import EmbeddedNats, free_port
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import build_settings
from tests.conftest import database_backends
from tests.harness import (
    ADMIN_TOKEN,
    PROJECT_ROOT,
    Database,
    Process,
    create_database,
    stack_env,
    start_api,
    start_nats,
    worker_process,
)

HEALTH_CONSUMER = REGISTRY_HEALTH_CONSUMER.durable
HEALTHY = {"summary": {"services_up": 2, "total_services": 2}, "ip": "203.0.113.7"}
BACKENDS = database_backends()


def orchestrator(orchestrator_id: str, address_digit: str, **extra: Any) -> dict[str, Any]:
    return {"orchestrator_id": orchestrator_id, "address": "0x" + address_digit * 40, **extra}


@dataclass
class Stack:
    tmp: Path
    nats: EmbeddedNats
    database: Database
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    http: aiohttp.ClientSession
    workers: list[Process] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    base: str = ""
    # Extra api processes that differ in their settings, by name -> base URL.
    apis: dict[str, str] = field(default_factory=dict)
    api_processes: list[Process] = field(default_factory=list)

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    def logs(self) -> str:
        processes = [*self.workers, *self.api_processes]
        parts = [f"--- {p.name}\n{p.log_text()[-2000:]}" for p in processes]
        return "\n".join(parts)


async def start_processes(processes: Sequence[Process], needle: str = "worker started") -> None:
    """Start several processes at once and wait until each logged `needle`."""
    for process in processes:
        if not process.running():
            process.start(**process.extra_env)
    await asyncio.gather(*(asyncio.to_thread(p.wait_log, needle) for p in processes))


async def start_apis(
    env: dict[str, str],
    log_dir: Path,
    variants: dict[str, dict[str, str | None]],
    processes: list[Process],
) -> dict[str, str]:
    """Start one api per variant (name -> env overrides; None removes a variable); returns
    name -> base URL and appends each process to `processes` (for the teardown)."""

    def one(overrides: dict[str, str | None]) -> str:
        variant = {k: v for k, v in env.items() if overrides.get(k, "") is not None}
        variant.update({k: v for k, v in overrides.items() if v is not None})
        process, base = start_api(variant, log_dir)
        processes.append(process)
        return base

    started = await asyncio.gather(*(asyncio.to_thread(one, o) for o in variants.values()))
    return dict(zip(variants, started, strict=True))


async def provision_all(nats: EmbeddedNats) -> None:
    settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
    nc = await connect(settings, "ops", "test-provision")
    try:
        await provision(nc.jetstream(), replicas=1)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running_stack(
    backend: str,
    tmp: Path,
    *,
    bootstrap: list[dict[str, Any]],
    worker_copies: int = 1,
    start_workers: bool = True,
    worker_env: dict[str, str] | None = None,
    api_env: dict[str, str] | None = None,
    api_variants: dict[str, dict[str, str | None]] | None = None,
    **env_extra: str,
) -> AsyncIterator[Stack]:
    """A provisioned nats-server, a migrated database, registry workers and the api (plus one
    api per entry of `api_variants`, reachable as `stack.apis[name]`), started concurrently."""
    async with contextlib.AsyncExitStack() as cleanup:
        nats = start_nats(tmp / "nats")
        cleanup.callback(nats.stop)
        await provision_all(nats)
        database = await create_database(backend, tmp)
        if database.drop is not None:
            cleanup.push_async_callback(database.drop)
        env = stack_env(
            nats,
            database,
            tmp / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=json.dumps(bootstrap),
            **env_extra,
        )
        engine = make_engine(database.url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        ops_settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
        ops = await connect(ops_settings, "ops", "test-ops")
        cleanup.push_async_callback(ops.close)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        cleanup.push_async_callback(http.close)
        stack = Stack(tmp, nats, database, env, engine, make_sessionmaker(engine), ops, http)
        cleanup.push_async_callback(stop_processes, stack)
        for copy in range(worker_copies):
            port = free_port()
            stack.metrics_ports.append(port)
            worker = worker_process("registry", env, tmp, copy)
            worker.extra_env = {"PAYMENTS_METRICS_PORT": str(port), **(worker_env or {})}
            stack.workers.append(worker)
        variants: dict[str, dict[str, str | None]] = {"": {**(api_env or {})}}
        variants.update(api_variants or {})
        starting = start_apis(env, tmp, variants, stack.api_processes)
        if start_workers:
            started, _ = await asyncio.gather(starting, start_processes(stack.workers))
        else:
            started = await starting
        stack.base = started.pop("")
        stack.apis = started
        yield stack


async def stop_processes(stack: Stack) -> None:
    """SIGTERM every worker and api at once, then wait for each."""
    processes = [*stack.workers, *stack.api_processes]
    await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in processes))


# -- probes -----------------------------------------------------------------------------------


async def stream_count(js: JetStreamContext, stream: str, subject: str | None = None) -> int:
    """Messages in `stream`, or only those on `subject` (wildcards allowed)."""
    if subject is None:
        return int((await js.stream_info(stream)).state.messages)
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def inbox_keys(stack: Stack, prefix: str, consumer: str = HEALTH_CONSUMER) -> list[str]:
    """Every processed_events key of `consumer` starting with `prefix`, duplicates included."""
    async with stack.sessions() as session:
        rows = await session.execute(
            select(ProcessedEvent.event_key).where(
                ProcessedEvent.consumer == consumer,
                col(ProcessedEvent.event_key).startswith(prefix, autoescape=True),
            )
        )
        return list(rows.scalars())


async def inbox_rows(stack: Stack, prefix: str, consumer: str = HEALTH_CONSUMER):  # type: ignore[no-untyped-def]
    async with stack.sessions() as session:
        rows = await session.execute(
            select(ProcessedEvent).where(
                ProcessedEvent.consumer == consumer,
                col(ProcessedEvent.event_key).startswith(prefix, autoescape=True),
            )
        )
        return list(rows.scalars())


async def dead_letters(stack: Stack, subject: str | None = None) -> list[DeadLetter]:
    async with stack.sessions() as session:
        query = select(DeadLetter).order_by(col(DeadLetter.id))
        if subject is not None:
            query = query.where(DeadLetter.subject == subject)
        return list((await session.execute(query)).scalars())


async def orchestrator_row(stack: Stack, orchestrator_id: str) -> Orchestrator | None:
    async with stack.sessions() as session:
        return await session.get(Orchestrator, orchestrator_id)


async def consumer_drained(stack: Stack, durable: str = HEALTH_CONSUMER) -> bool:
    """Nothing left to deliver and nothing delivered but unacknowledged."""
    info = await stack.js.consumer_info(REGISTRY_HEALTH_CONSUMER.stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


def scrape_counter(port: int, name: str, **labels: str) -> float:
    """One sample of a Prometheus counter from a process's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def processed_counter(port: int, outcome: str, consumer: str = HEALTH_CONSUMER) -> float:
    return await asyncio.to_thread(
        scrape_counter,
        port,
        "payments_events_processed_total",
        consumer=consumer,
        outcome=outcome,
    )


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    async with http.request(method, url, **kwargs) as response:
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return Answer(response.status, body, dict(response.headers))


async def post_health(
    stack: Stack,
    orchestrator_id: str,
    document: Any = None,
    *,
    key: str | None = None,
    base: str | None = None,
    token: str | None = ADMIN_TOKEN,
    **kwargs: Any,
) -> Answer:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    if token is not None:
        headers["X-Admin-Token"] = token
    if key is not None:
        headers["Idempotency-Key"] = key
    if document is None and "data" not in kwargs:
        document = {"data": HEALTHY}
    if document is not None:
        kwargs["data"] = json.dumps(document)
    url = f"{base or stack.base}/api/orchestrators/{orchestrator_id}/health"
    return await call(stack.http, "POST", url, headers=headers, **kwargs)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


async def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60.0) -> CliResult:
    """Run the `payments` console script as an operator would."""
    payments = str(Path(sys.executable).parent / "payments")
    # PYTHONPATH: the console script must import this checkout, like the api and worker processes.
    process = await asyncio.create_subprocess_exec(
        payments,
        *args,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())
