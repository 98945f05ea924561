"""The sessions worker's partitioned pull loop against a real nats-server: a batch starts as soon
as every partition has its message in, and otherwise after the linger with what has come."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contracts import subjects
from contracts.streams import SESSION_PARTITION_CONSUMERS
from shared import pull_loop
from shared.pull_loop import PartitionedPullLoop

BATCH_WAIT_S = 10.0


async def publish_to_partitions(nc: NatsClient, partitions: range) -> None:
    js = nc.jetstream()
    for partition in partitions:
        await js.publish(f"{subjects.SESSIONS_EVENTS}.{partition}.linger-test", b"{}")


async def first_batch(nc: NatsClient) -> list[Msg]:
    batches: asyncio.Queue[list[Msg]] = asyncio.Queue()

    async def handler(messages: list[Msg]) -> None:
        for message in messages:
            await message.ack()
        await batches.put(messages)

    loop = PartitionedPullLoop(SESSION_PARTITION_CONSUMERS, handler)
    await loop.start(nc)
    try:
        return await asyncio.wait_for(batches.get(), BATCH_WAIT_S)
    finally:
        await loop.stop(timeout_s=5.0)


async def test_a_batch_starts_once_every_partition_has_a_message(
    ops_nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A linger far longer than the wait: only the early start can deliver the batch in time.
    monkeypatch.setattr(pull_loop, "PARTITION_LINGER_S", 60.0)
    everyone = range(len(SESSION_PARTITION_CONSUMERS))
    await publish_to_partitions(ops_nc, everyone)
    batch = await first_batch(ops_nc)
    assert sorted(int(m.subject.split(".")[2]) for m in batch) == list(everyone)


async def test_a_batch_of_some_partitions_waits_out_the_linger_and_takes_what_came(
    ops_nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull_loop, "PARTITION_LINGER_S", 0.5)
    await publish_to_partitions(ops_nc, range(3))
    batch = await first_batch(ops_nc)
    assert sorted(int(m.subject.split(".")[2]) for m in batch) == [0, 1, 2]
