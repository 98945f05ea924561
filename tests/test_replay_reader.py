"""shared.replay.read_stream against a real nats-server: a replay reads every message or fails.

A fetch that brings nothing while messages are pending (a pull unanswered during a leader
election, or refused with 503 before the consumer is reachable) is asked again, not taken as the
end of the stream; a stream that stops delivering, or a replay consumer that vanishes, is a
ReplayError naming how far the read got, never a replay reported done with part of it unread.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contracts.streams import WORKLOADS
from shared import replay
from shared.pull_consumer import UNAVAILABLE, PullConsumer, PullError

SUBJECT = "workloads.time.replay-reader-test"
MESSAGES = 25
FETCH_BATCH = 10
SHORT_STALL_S = 1.0

Fetch = Callable[[PullConsumer, int, float], Awaitable[list[Msg]]]


async def publish(nc: NatsClient, count: int) -> None:
    js = nc.jetstream()
    for number in range(count):
        await js.publish(SUBJECT, json.dumps({"n": number}).encode(), stream=WORKLOADS.name)


async def read_numbers(nc: NatsClient) -> list[int]:
    return [json.loads(m.data)["n"] async for m in replay.read_stream(nc, WORKLOADS.name)]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "REPLAY_FETCH_BATCH", FETCH_BATCH)
    monkeypatch.setattr(replay, "REPLAY_UNAVAILABLE_PAUSE_S", 0.01)


def fetch_with_faults(monkeypatch: pytest.MonkeyPatch, faults: list[str], then: str = "ok") -> None:
    """PullConsumer.fetch, except that each call first takes the next fault: "empty" brings
    nothing, "503" is a pull refused as unavailable, "ok" is the real fetch. Once the list is
    used up every call is `then`."""
    real: Fetch = PullConsumer.fetch

    async def fetch(self: PullConsumer, batch: int, timeout_s: float) -> list[Msg]:
        fault = faults.pop(0) if faults else then
        if fault == "empty":
            return []
        if fault == UNAVAILABLE:
            raise PullError(UNAVAILABLE, "No Responders")
        return await real(self, batch, timeout_s)

    monkeypatch.setattr(PullConsumer, "fetch", fetch)


async def test_a_fetch_that_brings_nothing_mid_stream_is_asked_again(
    ops_nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await publish(ops_nc, MESSAGES)
    fetch_with_faults(monkeypatch, ["empty", UNAVAILABLE, "ok", "empty", "empty", UNAVAILABLE])

    assert await read_numbers(ops_nc) == list(range(MESSAGES))


async def test_a_stream_that_stops_delivering_fails_the_replay_with_how_far_it_got(
    ops_nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await publish(ops_nc, MESSAGES)
    monkeypatch.setattr(replay, "REPLAY_STALL_TIMEOUT_S", SHORT_STALL_S)
    fetch_with_faults(monkeypatch, ["ok"], then="empty")

    with pytest.raises(replay.ReplayError, match=f"read {FETCH_BATCH} of {MESSAGES} messages"):
        await read_numbers(ops_nc)


async def test_a_replay_consumer_that_vanishes_fails_the_replay(ops_nc: NatsClient) -> None:
    await publish(ops_nc, MESSAGES)
    js = ops_nc.jetstream()
    read: list[int] = []
    with pytest.raises(replay.ReplayError, match=f"vanished after {FETCH_BATCH} of {MESSAGES}"):
        async for message in replay.read_stream(ops_nc, WORKLOADS.name):
            read.append(json.loads(message.data)["n"])
            if len(read) == 1:  # a server restart loses the in-memory consumer: delete it
                for consumer in await js.consumers_info(WORKLOADS.name):
                    await js.delete_consumer(WORKLOADS.name, consumer.name)
    assert read == list(range(FETCH_BATCH))
