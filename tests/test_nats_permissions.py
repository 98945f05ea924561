"""nats.conf's users: the ingress may only publish events (and ask workers), the workers may not
create streams or consumers. Checked against a real provisioned nats-server by their effects: a
refused request creates nothing and stores nothing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError

from contracts.streams import HEALTH, LEDGER
from shared.embedded_nats import EmbeddedNats, new_password
from shared.nats_client import connect
from shared.settings import build_settings

REFUSED_TIMEOUT_S = 0.5


class Connection:
    def __init__(self, nc: NatsClient, errors: list[Exception]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=REFUSED_TIMEOUT_S)
        self.errors = errors

    def violations(self) -> list[str]:
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]


async def connect_as(server: EmbeddedNats, user: str) -> Connection:
    errors: list[Exception] = []

    async def record(error: Exception) -> None:
        errors.append(error)

    password = getattr(server.passwords, user)
    nc = await nats.connect(server.url, user=user, password=password, error_cb=record)
    return Connection(nc, errors)


@pytest.fixture
async def ops(provisioned: EmbeddedNats) -> AsyncIterator[Any]:
    settings = build_settings(nats_url=provisioned.url, nats_ops_password=provisioned.passwords.ops)
    nc = await connect(settings, "ops", "test-permissions")
    yield nc.jetstream()
    await nc.close()


async def refused(connection: Connection, attempt: Any, subject: str) -> None:
    """The server refuses the publish: no answer, and a permissions violation for `subject`."""
    with pytest.raises(nats.errors.TimeoutError):
        await attempt
    await connection.nc.flush()
    assert any(subject.lower() in v.lower() for v in connection.violations()), connection.errors


async def test_ingress_publishes_events_only(provisioned: EmbeddedNats, ops: Any) -> None:
    ingress = await connect_as(provisioned, "ingress")
    try:
        await refused(
            ingress,
            ingress.js.add_stream(StreamConfig(name="ROGUE", subjects=["rogue.>"])),
            "$JS.API.STREAM.CREATE.ROGUE",
        )
        with pytest.raises(NotFoundError):
            await ops.stream_info("ROGUE")

        await refused(
            ingress,
            ingress.js.publish("ledger.entries.x", b"{}", timeout=REFUSED_TIMEOUT_S),
            "ledger.entries.x",
        )
        assert (await ops.stream_info(LEDGER.name)).state.messages == 0

        ack = await ingress.js.publish("health.reports.x", b"{}", timeout=5)
        assert (ack.stream, ack.seq) == (HEALTH.name, 1)
        assert (await ops.stream_info(HEALTH.name)).state.messages == 1

        await refused(ingress, ingress.js.delete_stream(HEALTH.name), "$JS.API.STREAM.DELETE")
        assert (await ops.stream_info(HEALTH.name)).state.messages == 1
    finally:
        await ingress.nc.close()


async def test_worker_cannot_create_streams_or_consumers(
    provisioned: EmbeddedNats, ops: Any
) -> None:
    worker = await connect_as(provisioned, "worker")
    try:
        await refused(
            worker,
            worker.js.add_stream(StreamConfig(name="ROGUE", subjects=["rogue.>"])),
            "$JS.API.STREAM.CREATE.ROGUE",
        )
        with pytest.raises(NotFoundError):
            await ops.stream_info("ROGUE")

        await refused(
            worker,
            worker.js.add_consumer(HEALTH.name, ConsumerConfig(durable_name="rogue")),
            "$JS.API.CONSUMER",
        )
        with pytest.raises(NotFoundError):
            await ops.consumer_info(HEALTH.name, "rogue")

        # What it is there for still works: publishing its own events.
        ack = await worker.js.publish("ledger.entries.x", b"{}", timeout=5)
        assert ack.stream == LEDGER.name
    finally:
        await worker.nc.close()


def test_generated_passwords_are_plain_strings_to_nats_conf() -> None:
    """nats.conf reads the passwords through $VARIABLE references, which nats-server parses as
    values: one starting with "-" is taken for a negative number and the server will not start.
    Every generated password starts with a letter."""
    passwords = [new_password() for _ in range(3000)]
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{20,}", p) for p in passwords)
    assert len(set(passwords)) == len(passwords)
