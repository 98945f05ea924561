"""Fixtures: real nats-server, fresh databases (SQLite always, PostgreSQL when
PAYMENTS_TEST_POSTGRES_URL is set), and the stack's processes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db.engine import make_engine, make_sessionmaker
from shared.embedded_nats import EmbeddedNats
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import build_settings
from tests.harness import Database, create_database, start_nats

POSTGRES_URL_ENV = "PAYMENTS_TEST_POSTGRES_URL"


def database_backends() -> list[str]:
    backends = ["sqlite"]
    if os.environ.get(POSTGRES_URL_ENV):
        backends.append("postgres")
    return backends


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = start_nats(tmp_path / "nats")
    yield server
    server.stop()


@pytest.fixture
async def provisioned(nats_server: EmbeddedNats) -> EmbeddedNats:
    settings = build_settings(nats_url=nats_server.url, nats_ops_password=nats_server.passwords.ops)
    nc = await connect(settings, "ops", "test-provision")
    try:
        results = await provision(nc.jetstream(), replicas=1)
    finally:
        await nc.close()
    assert all(r.action == "created" for r in results), results
    return nats_server


@pytest.fixture(params=database_backends())
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    db = await create_database(request.param, tmp_path)
    yield db
    if db.drop is not None:
        await db.drop()


@pytest.fixture
async def db_engine(database: Database) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database.url, writer=False)
    yield engine
    await engine.dispose()


@pytest.fixture
def db_sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db_engine)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def ops_settings(provisioned: EmbeddedNats):  # type: ignore[no-untyped-def]
    return build_settings(nats_url=provisioned.url, nats_ops_password=provisioned.passwords.ops)


@pytest.fixture
async def ops_nc(ops_settings) -> AsyncIterator[NatsClient]:  # type: ignore[no-untyped-def]
    """An `ops` connection to the test's provisioned nats-server."""
    client = await connect(ops_settings, "ops", "test-ops")
    yield client
    await client.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") and not os.environ.get(POSTGRES_URL_ENV):
        raise pytest.UsageError(f"CI needs {POSTGRES_URL_ENV} for the PostgreSQL matrix")
