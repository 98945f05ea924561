"""The real ledger stack for end-to-end tests, and probes that read its effects.

`ledger_stack` starts a provisioned nats-server, a fresh database, the registry worker, the
ledger worker and the api as separate processes, and waits until the bootstrapped orchestrators
are in the registry projection. The probes read what the guarantees are about: ledger_entries
and balances rows, processed_events and dead_letters, LEDGER stream messages (through the ops
user), and HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.streams import LEDGER, LEDGER_WORKLOADS_CONSUMER, WORKLOADS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Balance, DeadLetter, LedgerEntry, Orchestrator, ProcessedEvent
from shared.embedded_nats import EmbeddedNats
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import build_settings
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

LEDGER_CONSUMER = LEDGER_WORKLOADS_CONSUMER.durable
ADMIN = {"Content-Type": "application/json", "X-Admin-Token": ADMIN_TOKEN}


def orchestrator(orchestrator_id: str, digit: str) -> dict[str, str]:
    """A bootstrap entry with an address made of one repeated hex digit."""
    return {"orchestrator_id": orchestrator_id, "address": "0x" + digit * 40}


@dataclass
class LedgerStack:
    tmp: Path
    nats: EmbeddedNats
    database: Database
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    http: aiohttp.ClientSession
    registry: Process
    ledger: list[Process] = field(default_factory=list)
    api: Process | None = None
    base: str = ""

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    def ledger_worker(self, copy: int = 0, **extra_env: str) -> Process:
        """A ledger worker process (not started), with its own log file."""
        worker = worker_process("ledger", self.env, self.tmp, copy)
        worker.extra_env = extra_env
        return worker

    async def start_ledger(self, copy: int = 0, **extra_env: str) -> Process:
        worker = self.ledger_worker(copy, **extra_env)
        worker.start(**extra_env)
        await asyncio.to_thread(worker.wait_log, "worker started")
        self.ledger.append(worker)
        return worker

    def logs(self) -> str:
        processes = [self.registry, *self.ledger, *([self.api] if self.api else [])]
        return "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in processes)


async def provision_nats(nats: EmbeddedNats, ack_wait_s: float | None = None) -> None:
    """Create every stream and consumer; optionally shorten the ledger consumer's ack_wait so a
    crash test sees the redelivery in seconds instead of the production 30 s."""
    settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
    nc = await connect(settings, "ops", "test-provision")
    try:
        js = nc.jetstream()
        await provision(js, replicas=1)
        if ack_wait_s is not None:
            info = await js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
            config = info.config
            config.ack_wait = ack_wait_s
            await js.add_consumer(WORKLOADS.name, config)
            updated = await js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
            assert updated.config.ack_wait == ack_wait_s
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def ledger_stack(
    backend: str,
    tmp: Path,
    orchestrators: list[dict[str, Any]],
    *,
    start_ledger: bool = True,
    ledger_env: dict[str, str] | None = None,
    ack_wait_s: float | None = None,
    **env_extra: str,
) -> AsyncIterator[LedgerStack]:
    async with contextlib.AsyncExitStack() as cleanup:
        tmp.mkdir(parents=True, exist_ok=True)
        nats = start_nats(tmp / "nats")
        cleanup.callback(nats.stop)
        await provision_nats(nats, ack_wait_s)
        database = await create_database(backend, tmp)
        if database.drop is not None:
            cleanup.push_async_callback(database.drop)
        env = stack_env(
            nats,
            database,
            tmp / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=json.dumps(orchestrators),
            **env_extra,
        )
        engine = make_engine(database.url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        ops_settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
        ops = await connect(ops_settings, "ops", "test-ops")
        cleanup.push_async_callback(ops.close)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        cleanup.push_async_callback(http.close)
        registry = worker_process("registry", env, tmp)
        stack = LedgerStack(
            tmp, nats, database, env, engine, make_sessionmaker(engine), ops, http, registry
        )
        # Stopped in reverse: api and workers before the database and NATS go away.
        cleanup.callback(lambda: [p.terminate() for p in [stack.registry, *stack.ledger]])
        registry.start()
        starting = [asyncio.to_thread(registry.wait_log, "worker started")]
        if start_ledger:
            worker = stack.ledger_worker(**(ledger_env or {}))
            worker.start(**(ledger_env or {}))
            stack.ledger.append(worker)
            starting.append(asyncio.to_thread(worker.wait_log, "worker started"))
        api_start = asyncio.to_thread(start_api, env, tmp)
        *_, (api, base) = await asyncio.gather(*starting, api_start)
        stack.api, stack.base = api, base
        cleanup.callback(api.terminate)
        wanted = {o["orchestrator_id"] for o in orchestrators}

        async def registered() -> bool:
            return wanted <= set(await orchestrator_ids(stack))

        await wait_until(registered, 30.0, stack)
        yield stack


async def wait_until(probe: Any, timeout_s: float, stack: LedgerStack | None = None) -> Any:
    """tests.harness.wait_for, with the stack's process logs in the failure message."""
    from tests.harness import wait_for

    try:
        return await wait_for(probe, timeout_s=timeout_s)
    except AssertionError as error:
        if stack is None:
            raise
        raise AssertionError(f"{error}\n{stack.logs()}") from None


# -- database probes ----------------------------------------------------------------------------


async def orchestrator_ids(stack: LedgerStack) -> list[str]:
    async with stack.sessions() as session:
        return list((await session.execute(select(Orchestrator.orchestrator_id))).scalars())


async def entries(
    sessions: async_sessionmaker[AsyncSession], orchestrator_id: str | None = None
) -> list[LedgerEntry]:
    async with sessions() as session:
        query = select(LedgerEntry).order_by(LedgerEntry.id)  # type: ignore[arg-type]
        if orchestrator_id is not None:
            query = query.where(LedgerEntry.orchestrator_id == orchestrator_id)
        return list((await session.execute(query)).scalars())


async def balances(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with sessions() as session:
        rows = await session.execute(select(Balance.orchestrator_id, Balance.balance_wei))
        return {oid: int(value) for oid, value in rows.all()}


async def processed_count(sessions: async_sessionmaker[AsyncSession], prefix: str = "") -> int:
    async with sessions() as session:
        query = select(func.count()).where(ProcessedEvent.consumer == LEDGER_CONSUMER)
        if prefix:
            query = query.where(ProcessedEvent.event_key.startswith(prefix, autoescape=True))  # type: ignore[attr-defined]
        return int((await session.execute(query.select_from(ProcessedEvent))).scalar_one())


async def dead_letters(sessions: async_sessionmaker[AsyncSession]) -> list[DeadLetter]:
    async with sessions() as session:
        return list((await session.execute(select(DeadLetter))).scalars())


def assert_ledger_consistent(rows: list[LedgerEntry], stored: dict[str, int]) -> None:
    """Every balance equals the sum of its entries; no entry key twice; each workload once."""
    sums: dict[str, int] = defaultdict(int)
    for entry in rows:
        sums[entry.orchestrator_id] += entry.amount_wei
    for oid in set(sums) | set(stored):
        assert stored.get(oid, 0) == sums.get(oid, 0), (oid, stored.get(oid), sums.get(oid))
    keys = [e.entry_key for e in rows]
    assert len(keys) == len(set(keys)), "an entry key appears twice"
    workload_ids = [
        (e.entry_metadata or {}).get("workload_id")
        for e in rows
        if e.reason in ("workload", "workload_time")
    ]
    assert len(workload_ids) == len(set(workload_ids)), "a workload was credited twice"


# -- stream probes ------------------------------------------------------------------------------


async def stream_count(js: JetStreamContext, stream: str, subject: str | None = None) -> int:
    if subject is None:
        return int((await js.stream_info(stream)).state.messages)
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


# How long a fetch keeps being retried while the server answers "no responders" (503).
UNREACHABLE_CONSUMER_RETRY_S = 15.0
UNREACHABLE_CONSUMER_PAUSE_S = 0.2
READ_FETCH_TIMEOUT_S = 5.0


async def read_stream(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message of `stream` on `subject` (wildcards allowed), read through an ephemeral
    unacknowledged consumer."""
    total = await stream_count(js, stream, subject)
    if total == 0:
        return []
    found: list[Msg] = []
    subscription = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    try:
        while len(found) < total:
            batch = await fetch_once_reachable(subscription, min(1000, total - len(found)))
            found += batch
            if batch[-1].metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()
    return found


async def fetch_once_reachable(
    subscription: JetStreamContext.PullSubscription, batch: int
) -> list[Msg]:
    """A fetch that waits out a consumer the client's server cannot reach yet.

    On a cluster the consumer is created on the stream leader's node, and its interest spreads
    to the other nodes over the routes after the create request has been answered: a pull sent
    through another node in between gets 503 no responders (seen in CI right after node
    restarts). A consumer still unreachable after UNREACHABLE_CONSUMER_RETRY_S fails the test.
    """
    deadline = time.monotonic() + UNREACHABLE_CONSUMER_RETRY_S
    while True:
        try:
            return await subscription.fetch(batch, timeout=READ_FETCH_TIMEOUT_S)
        except ServiceUnavailableError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(UNREACHABLE_CONSUMER_PAUSE_S)


LEDGER_SUBJECTS = "ledger.entries.>"


async def ledger_messages(js: JetStreamContext) -> list[Msg]:
    return await read_stream(js, LEDGER.name, LEDGER_SUBJECTS)


def scrape_counter(port: int, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples with these labels, from a process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def processed_metric(port: int, outcome: str) -> int:
    value = await asyncio.to_thread(
        scrape_counter,
        port,
        "payments_events_processed_total",
        consumer=LEDGER_CONSUMER,
        outcome=outcome,
    )
    return int(value)


# -- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    kwargs.setdefault("headers", ADMIN)
    async with http.request(method, url, **kwargs) as response:
        text = await response.text()
        try:
            return Answer(response.status, json.loads(text))
        except ValueError:
            return Answer(response.status, text)


# -- databases for replay targets and the CLI -------------------------------------------------


async def empty_postgres_database() -> tuple[str, Any]:
    """A new, unmigrated PostgreSQL database (PAYMENTS_TEST_POSTGRES_URL's server); its URL and
    an async drop function."""
    admin_url = os.environ["PAYMENTS_TEST_POSTGRES_URL"]
    name = f"payments_replay_{uuid.uuid4().hex[:12]}"
    parsed = make_url(admin_url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()

    async def drop() -> None:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return parsed.set(database=name).render_as_string(hide_password=False), drop


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


async def run_payments(env: dict[str, str], *args: str, timeout_s: float = 120.0) -> CliResult:
    """The `payments` console script, run as an operator would."""
    payments = str(Path(sys.executable).parent / "payments")
    process = await asyncio.create_subprocess_exec(
        payments,
        *args,
        env=env,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())
