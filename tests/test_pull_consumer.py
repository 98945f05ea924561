"""shared.pull_consumer against a real nats-server: batches by JetStream's pull API.

A fetch takes what is there at once and waits only when nothing is; a message that arrives for a
request given up on goes into the next fetch, and one no fetch took is handed back at stop;
a consumer that does not exist is an error, not an endless wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig

from contracts.streams import WORKLOADS
from shared.pull_consumer import PullConsumer, PullError

DURABLE = "pull-consumer-test"
SUBJECT = "workloads.time.pull-test"
# A bound on how long a fetch that should answer at once may take: far above a round trip,
# far below the timeouts given to fetch, so a fetch that waits them out fails the test.
PROMPT_S = 10.0
LONG_TIMEOUT_S = 60.0
# Acks are applied on the server asynchronously: how long a test waits to see them (5 s).
ACK_FLOOR_POLLS = 250
ACK_FLOOR_POLL_INTERVAL_S = 0.02


async def publish(nc: NatsClient, count: int, start: int = 0) -> None:
    js = nc.jetstream()
    for number in range(start, start + count):
        await js.publish(SUBJECT, json.dumps({"n": number}).encode(), stream=WORKLOADS.name)


@pytest.fixture
async def consumer(ops_nc: NatsClient) -> AsyncIterator[PullConsumer]:
    await ops_nc.jetstream().add_consumer(
        WORKLOADS.name,
        ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
    )
    pulling = PullConsumer(ops_nc, WORKLOADS.name, DURABLE)
    await pulling.start()
    yield pulling
    await pulling.stop()


def numbers(messages: list) -> list[int]:  # type: ignore[type-arg]
    return [json.loads(message.data)["n"] for message in messages]


async def test_a_fetch_takes_what_is_there_at_once_in_stream_order(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    await publish(ops_nc, 10)
    first = await asyncio.wait_for(consumer.fetch(4, LONG_TIMEOUT_S), PROMPT_S)
    rest = await asyncio.wait_for(consumer.fetch(100, LONG_TIMEOUT_S), PROMPT_S)
    assert numbers(first) == [0, 1, 2, 3]
    assert numbers(rest) == [4, 5, 6, 7, 8, 9]
    assert [m.metadata.sequence.stream for m in first + rest] == list(range(1, 11))


async def test_an_idle_fetch_waits_for_what_is_published_meanwhile(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    assert await consumer.fetch(5, 0.2) == []
    waiting = asyncio.create_task(consumer.fetch(5, LONG_TIMEOUT_S))
    await asyncio.sleep(0.3)  # the fetch is waiting on the server by now
    await publish(ops_nc, 1, start=40)
    # It answers with the first message to come, not after waiting out its timeout.
    assert numbers(await asyncio.wait_for(waiting, PROMPT_S)) == [40]


async def test_a_fetch_while_another_copy_waits_takes_its_turn_without_spinning(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    other = PullConsumer(ops_nc, WORKLOADS.name, DURABLE)
    await other.start()
    try:
        waiting = asyncio.create_task(other.fetch(5, 3.0))
        await asyncio.sleep(0.3)  # the other copy's request is waiting on the server
        # The server either holds our no_wait request until it expires or refuses it at once
        # (408 Requests Pending), and then one plain request waits its turn: never a loop of
        # refused requests.
        assert await consumer.fetch(5, 0.5) == []
        assert consumer.requests_sent <= 2
        await publish(ops_nc, 1, start=50)
        assert numbers(await asyncio.wait_for(waiting, PROMPT_S)) == [50]
    finally:
        await other.stop()


async def test_acked_messages_move_the_consumers_ack_floor(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    await publish(ops_nc, 3)
    for message in await consumer.fetch(3, 1.0):
        await message.ack()
    await ops_nc.flush()
    # The server takes acks in off the connection and applies them to the consumer on its own
    # goroutine, so a consumer_info right after the flush can predate them: wait, within a bound.
    info = await ops_nc.jetstream().consumer_info(WORKLOADS.name, DURABLE)
    for _ in range(ACK_FLOOR_POLLS):
        if info.ack_floor.stream_seq == 3:
            break
        await asyncio.sleep(ACK_FLOOR_POLL_INTERVAL_S)
        info = await ops_nc.jetstream().consumer_info(WORKLOADS.name, DURABLE)
    assert info.ack_floor.stream_seq == 3
    assert info.num_ack_pending == 0


async def test_a_message_of_a_request_given_up_on_goes_into_the_next_fetch(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    await publish(ops_nc, 3)
    # A request this consumer no longer waits for (as after a timeout): its answer still
    # comes into the subscription.
    stray = json.dumps({"batch": 2, "no_wait": True}).encode()
    await ops_nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{WORKLOADS.name}.{DURABLE}", stray, reply=f"{consumer._inbox}.0"
    )
    await ops_nc.flush()
    for _ in range(100):
        if consumer.waiting == 2:
            break
        await asyncio.sleep(0.02)
    assert consumer.waiting == 2
    # The stray answers come first, without a request; then the rest.
    assert numbers(await consumer.fetch(10, LONG_TIMEOUT_S)) == [0, 1]
    assert consumer.requests_sent == 0
    assert numbers(await asyncio.wait_for(consumer.fetch(10, LONG_TIMEOUT_S), PROMPT_S)) == [2]


async def test_stop_hands_back_what_no_fetch_took(
    ops_nc: NatsClient, consumer: PullConsumer
) -> None:
    await publish(ops_nc, 2)
    taken = await consumer.fetch(1, 1.0)
    assert numbers(taken) == [0]
    stray = json.dumps({"batch": 1, "no_wait": True}).encode()
    await ops_nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{WORKLOADS.name}.{DURABLE}", stray, reply=f"{consumer._inbox}.0"
    )
    for _ in range(100):
        if consumer.waiting:
            break
        await asyncio.sleep(0.02)
    assert consumer.waiting == 1
    await taken[0].ack()
    await consumer.stop()
    again = PullConsumer(ops_nc, WORKLOADS.name, DURABLE)
    await again.start()
    try:
        # Handed back, it comes again now, not after the 60 s ack_wait.
        redelivered = await again.fetch(5, 2.0)
    finally:
        await again.stop()
    assert numbers(redelivered) == [1]
    assert redelivered[0].metadata.num_delivered == 2


async def test_a_consumer_that_does_not_exist_is_an_error(ops_nc: NatsClient) -> None:
    missing = PullConsumer(ops_nc, WORKLOADS.name, "no-such-consumer")
    await missing.start()
    try:
        with pytest.raises(PullError):
            await asyncio.wait_for(missing.fetch(5, LONG_TIMEOUT_S), PROMPT_S)
    finally:
        await missing.stop()
