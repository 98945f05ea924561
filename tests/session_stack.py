"""The real sessions stack for end-to-end tests, and probes that read its effects.

`session_stack` starts a provisioned nats-server, a fresh database, the registry, sessions (any
number of copies) and ledger workers and one or more api processes (each with its own extra
settings), all as separate processes, and waits until the bootstrapped orchestrators are in
the registry projection. The probes read what the tests are about: sessions, activity leases
and ledger rows, the SESSIONS stream through the ops user, and HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts import subjects
from contracts.streams import SESSIONS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import ActivityLease, LedgerEntry, Orchestrator, Session
from shared.embedded_nats import EmbeddedNats
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import build_settings
from tests import ledger_stack
from tests.harness import (
    ADMIN_TOKEN,
    Database,
    Process,
    create_database,
    stack_env,
    start_api,
    start_nats,
    wait_for,
    worker_process,
)

T = TypeVar("T")
ADMIN = {"Content-Type": "application/json", "X-Admin-Token": ADMIN_TOKEN}
SESSION_EVENTS = f"{subjects.SESSIONS_EVENTS}.>"
# 0.06 ETH per minute is exactly 10**12 wei per millisecond.
RATE_ETH_PER_MINUTE = "0.06"
WEI_PER_MS = 10**12


def orchestrator(orchestrator_id: str, digit: str, host_ip: str) -> dict[str, str]:
    """A bootstrap entry: an address of one repeated hex digit, sessions from `host_ip`."""
    return {
        "orchestrator_id": orchestrator_id,
        "address": "0x" + digit * 40,
        "host_public_ip": host_ip,
    }


@dataclass
class SessionStack:
    tmp: Path
    nats: EmbeddedNats
    database: Database
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    http: aiohttp.ClientSession
    workers: list[Process] = field(default_factory=list)
    apis: dict[str, tuple[Process, str]] = field(default_factory=dict)

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    @property
    def base(self) -> str:
        return self.apis["main"][1]

    def url(self, path: str, api: str = "main") -> str:
        return self.apis[api][1] + path

    def logs(self) -> str:
        processes = [*self.workers, *(p for p, _ in self.apis.values())]
        return "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in processes)

    async def until(self, probe: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
        """tests.harness.wait_for, with the processes' logs in the failure message."""
        try:
            return await wait_for(probe, timeout_s=timeout_s)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None


@contextlib.asynccontextmanager
async def session_stack(
    backend: str,
    tmp: Path,
    orchestrators: list[dict[str, str]],
    *,
    sessions_copies: int = 1,
    apis: dict[str, dict[str, str]] | None = None,
    workers: tuple[str, ...] = ("registry", "sessions", "ledger"),
    **env_extra: str,
) -> AsyncIterator[SessionStack]:
    """The stack; `apis` names each api process and its own extra settings ("main" first)."""
    apis = apis or {"main": {}}
    async with contextlib.AsyncExitStack() as cleanup:
        tmp.mkdir(parents=True, exist_ok=True)
        nats = start_nats(tmp / "nats")
        cleanup.callback(nats.stop)
        ops_settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
        ops = await connect(ops_settings, "ops", "test-ops")
        cleanup.push_async_callback(ops.close)
        await provision(ops.jetstream(), replicas=1)
        database = await create_database(backend, tmp)
        if database.drop is not None:
            cleanup.push_async_callback(database.drop)
        env = stack_env(
            nats,
            database,
            tmp / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=json.dumps(orchestrators),
            PAYMENTS_BOOTSTRAP_SKIP_RANK_VALIDATION="true",
            PAYMENTS_SESSION_CREDIT_ETH_PER_MINUTE=RATE_ETH_PER_MINUTE,
            **env_extra,
        )
        engine = make_engine(database.url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        cleanup.push_async_callback(http.close)
        stack = SessionStack(tmp, nats, database, env, engine, make_sessionmaker(engine), ops, http)

        def stop_all() -> None:  # api first, then workers (reverse order of start)
            for process, _ in stack.apis.values():
                process.terminate()
            for worker in reversed(stack.workers):
                worker.terminate()

        cleanup.callback(stop_all)
        starting = []
        for role in workers:
            for copy in range(sessions_copies if role == "sessions" else 1):
                worker = worker_process(role, env, tmp, copy).start()
                stack.workers.append(worker)
                starting.append(asyncio.to_thread(worker.wait_log, "worker started"))
        names = list(apis)
        api_starts = [asyncio.to_thread(start_api, env, tmp, None, **apis[n]) for n in names]
        results = await asyncio.gather(*starting, *api_starts)
        for name, started in zip(names, results[len(starting) :], strict=True):
            stack.apis[name] = started
        wanted = {o["orchestrator_id"] for o in orchestrators}

        async def registered() -> bool:
            return wanted <= set(await orchestrator_ids(stack))

        await stack.until(registered, 30.0)
        yield stack


# -- database probes ----------------------------------------------------------------------------


async def orchestrator_ids(stack: SessionStack) -> list[str]:
    async with stack.sessions() as session:
        return list((await session.execute(select(Orchestrator.orchestrator_id))).scalars())


async def session_rows(
    sessions: async_sessionmaker[AsyncSession], prefix: str = ""
) -> dict[str, Session]:
    async with sessions() as session:
        query = select(Session)
        if prefix:
            query = query.where(Session.session_id.startswith(prefix, autoescape=True))  # type: ignore[attr-defined]
        return {row.session_id: row for row in (await session.execute(query)).scalars()}


async def session_row(
    sessions: async_sessionmaker[AsyncSession], session_id: str
) -> Session | None:
    async with sessions() as session:
        return await session.get(Session, session_id)


async def lease_row(
    sessions: async_sessionmaker[AsyncSession], lease_id: str
) -> ActivityLease | None:
    async with sessions() as session:
        return await session.get(ActivityLease, lease_id)


async def ledger_rows(
    sessions: async_sessionmaker[AsyncSession], orchestrator_id: str | None = None
) -> list[LedgerEntry]:
    async with sessions() as session:
        query = select(LedgerEntry).order_by(LedgerEntry.id)  # type: ignore[arg-type]
        if orchestrator_id is not None:
            query = query.where(LedgerEntry.orchestrator_id == orchestrator_id)
        return list((await session.execute(query)).scalars())


# -- stream probes ------------------------------------------------------------------------------


async def stream_count(js: JetStreamContext, subject: str = SESSION_EVENTS) -> int:
    """How many SESSIONS messages match `subject` (wildcards allowed)."""
    return await ledger_stack.stream_count(js, SESSIONS.name, subject)


async def read_stream(js: JetStreamContext, subject: str = SESSION_EVENTS) -> list[Msg]:
    """Every SESSIONS message on `subject`, through an ephemeral unacknowledged consumer."""
    return await ledger_stack.read_stream(js, SESSIONS.name, subject)


async def stored_session_events(js: JetStreamContext) -> list[dict[str, Any]]:
    """The bodies of every stored session event, in stream order."""
    return [json.loads(message.data) for message in await read_stream(js)]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
