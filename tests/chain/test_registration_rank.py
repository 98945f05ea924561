"""Public registration through the real stack, with the rank check reading the BondingManager
pool double on Anvil: HTTP -> api -> registry command -> rank check -> REGISTRY stream ->
projection -> answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import subjects
from contracts.streams import REGISTRY_EVENTS_CONSUMER
from shared.chain.devtools import Anvil
from shared.db.models import Orchestrator, OutboxMessage, ProcessedEvent
from shared.embedded_nats import EmbeddedNats
from tests.chain.helpers import PoolDouble, addresses
from tests.harness import Database, Process, stack_env, start_api, start_worker

TOP_A, TOP_B, TOP_C = addresses("top", 3)
(NOT_TOP,) = addresses("not-top", 1)
RATE_LIMIT_OFF = "1000"  # the default 5 per minute per IP would cap these flows

NOT_TOP_DETAIL = "Address is not part of the current top orchestrators"
RANK_UNKNOWN_DETAIL = "Unable to validate orchestrator rank at this time"
CHANGE_ADDRESS_DETAIL = "Existing orchestrator attempted to change address; this is not allowed"
ADDRESS_TAKEN_DETAIL = "Address already registered to a different orchestrator"


@dataclass
class Stack:
    base: str
    api: Process
    worker: Process


StartStack = Callable[..., Stack]


@pytest.fixture
async def start_stack(
    provisioned: EmbeddedNats, database: Database, tmp_path: Path
) -> AsyncIterator[StartStack]:
    started: list[Stack] = []

    def start(rpc_url: str, contract: str, ttl_s: float = 300.0) -> Stack:
        env = stack_env(
            provisioned,
            database,
            tmp_path / "data",
            TOP_CONTRACT_ADDRESS=contract,
            ETH_RPC_URL=rpc_url,
            TOP_CACHE_TTL_SECONDS=str(ttl_s),
            PAYMENTS_REGISTRATION_PER_MINUTE=RATE_LIMIT_OFF,
            PAYMENTS_REGISTRATION_BURST=RATE_LIMIT_OFF,
        )
        worker = start_worker("registry", env, tmp_path)
        api, base = start_api(env, tmp_path)
        started.append(Stack(base, api, worker))
        return started[-1]

    yield start
    for stack in started:
        stack.api.terminate()
        stack.worker.terminate()


async def register(
    http: aiohttp.ClientSession, stack: Stack, orchestrator_id: str, address: str, **metadata: Any
) -> tuple[int, dict[str, Any]]:
    request = {"orchestrator_id": orchestrator_id, "address": address, **metadata}
    async with http.post(f"{stack.base}/api/orchestrators/register", json=request) as answer:
        return answer.status, await answer.json()


async def orchestrators(sessions: async_sessionmaker[AsyncSession]) -> list[Orchestrator]:
    async with sessions() as session:
        rows = await session.execute(select(Orchestrator).order_by(Orchestrator.orchestrator_id))
        return list(rows.scalars())


async def registry_outcomes(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, int]]:
    """(orchestrator id, status) of every registration event the projection applied."""
    async with sessions() as session:
        rows = await session.execute(
            select(ProcessedEvent)
            .where(ProcessedEvent.consumer == REGISTRY_EVENTS_CONSUMER.durable)
            .order_by(ProcessedEvent.stream_seq)  # type: ignore[arg-type]
        )
        # Keys are "register:<origin>:<orchestrator id>:<time>:<digest>".
        return [(e.event_key.split(":")[2], e.outcome["status"]) for e in rows.scalars()]


async def audit_subjects(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(select(OutboxMessage.subject).order_by(OutboxMessage.id))
        return list(rows.scalars())


def registered(registration_count: int, message: str, address: str = TOP_A) -> dict[str, Any]:
    return {
        "orchestrator_id": "orch-a",
        "address": address.lower(),
        "balance_eth": "0",
        "eligible_for_payments": True,
        "is_top_100": True,
        "denylisted": False,
        "registration_count": registration_count,
        "cooldown_expires_at": None,
        "message": message,
    }


async def test_public_registration_is_checked_against_the_pool(
    start_stack: StartStack,
    pool_double: PoolDouble,
    anvil: Anvil,
    http: aiohttp.ClientSession,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    pool_double.set_pool([TOP_A, TOP_B, TOP_C])
    stack = start_stack(anvil.rpc_url, pool_double.address)

    status, body = await register(
        http, stack, "orch-a", TOP_A, capability="pixel-streaming", host_name="a.example"
    )
    assert (status, body) == (200, registered(1, "Registered orchestrator"))

    status, body = await register(http, stack, "orch-a", TOP_A, capability="video")
    assert (status, body) == (200, registered(2, "Registration refreshed"))

    status, body = await register(http, stack, "orch-x", NOT_TOP)
    assert (status, body) == (403, {"detail": NOT_TOP_DETAIL})

    status, body = await register(http, stack, "orch-a", TOP_B)
    assert (status, body) == (409, {"detail": CHANGE_ADDRESS_DETAIL})

    status, body = await register(http, stack, "orch-b", TOP_A)
    assert (status, body) == (409, {"detail": ADDRESS_TAKEN_DETAIL})

    (row,) = await orchestrators(db_sessions)
    assert (row.orchestrator_id, row.address) == ("orch-a", TOP_A.lower())
    assert row.registration_count == 2
    assert (row.is_top_100, row.eligible_for_payments, row.denylisted) == (True, True, False)
    assert (row.capability, row.host_name) == ("video", "a.example")  # non-empty overrides
    assert row.cooldown_expires_at is None
    assert row.last_seen_ip == "127.0.0.1"
    assert row.last_contact_source == "registration"
    assert row.first_seen is not None and row.last_seen is not None
    assert row.first_seen < row.last_seen
    # The non-top address never reached the stream; the two conflicts did and were refused.
    assert await registry_outcomes(db_sessions) == [
        ("orch-a", 200),
        ("orch-a", 200),
        ("orch-a", 409),
        ("orch-b", 409),
    ]
    assert await audit_subjects(db_sessions) == [subjects.audit("registry", "register")] * 2


async def test_registration_is_503_when_the_rank_cannot_be_known(
    start_stack: StartStack,
    pool_double: PoolDouble,
    anvil: Anvil,
    http: aiohttp.ClientSession,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    pool_double.set_pool([TOP_A])
    anvil.stop()  # nothing was ever cached
    stack = start_stack(anvil.rpc_url, pool_double.address)

    async with http.post(
        f"{stack.base}/api/orchestrators/register",
        json={"orchestrator_id": "orch-a", "address": TOP_A},
    ) as answer:
        assert answer.status == 503
        assert await answer.json() == {"detail": RANK_UNKNOWN_DETAIL}
        assert answer.headers["Retry-After"] == "2"

    assert await orchestrators(db_sessions) == []
    assert await registry_outcomes(db_sessions) == []


async def test_registration_uses_the_stale_top_set_when_the_node_is_down(
    start_stack: StartStack,
    pool_double: PoolDouble,
    anvil: Anvil,
    http: aiohttp.ClientSession,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    ttl_s = 1.0
    pool_double.set_pool([TOP_A, TOP_B])
    stack = start_stack(anvil.rpc_url, pool_double.address, ttl_s=ttl_s)
    status, body = await register(http, stack, "orch-a", TOP_A)
    assert (status, body) == (200, registered(1, "Registered orchestrator"))

    anvil.stop()
    await asyncio.sleep(ttl_s * 1.5)

    status, body = await register(http, stack, "orch-a", TOP_A)
    assert (status, body) == (200, registered(2, "Registration refreshed"))
    status, body = await register(http, stack, "orch-x", NOT_TOP)
    assert (status, body) == (403, {"detail": NOT_TOP_DETAIL})

    (row,) = await orchestrators(db_sessions)
    assert (row.orchestrator_id, row.registration_count, row.is_top_100) == ("orch-a", 2, True)
    assert "rank refresh failed; using the stale top set" in stack.worker.log_text()


async def test_registration_uses_the_stale_top_set_when_the_node_hangs(
    start_stack: StartStack,
    pool_double: PoolDouble,
    anvil: Anvil,
    http: aiohttp.ClientSession,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    ttl_s = 1.0
    pool_double.set_pool([TOP_A])
    stack = start_stack(anvil.rpc_url, pool_double.address, ttl_s=ttl_s)
    status, body = await register(http, stack, "orch-a", TOP_A)
    assert (status, body) == (200, registered(1, "Registered orchestrator"))

    anvil.pause()  # connections are accepted, nothing answers: a hung RPC provider
    await asyncio.sleep(ttl_s * 1.5)

    status, body = await register(http, stack, "orch-a", TOP_A)
    assert (status, body) == (200, registered(2, "Registration refreshed"))
    (row,) = await orchestrators(db_sessions)
    assert row.registration_count == 2
