"""The api's group commit against a real nats-server: batches form under load, every caller gets
its own PubAck, duplicates are stored once and reported, and a refused batch still stores all."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig

from api.group_commit import GroupCommitPublisher
from contracts.streams import SESSIONS
from shared.atomic_batch import OutgoingMessage
from shared.observability import PUBLISH_BATCH_MESSAGES

SUBJECT = "sessions.events.3.group-commit"
CALLERS = 300


def message(key: str, subject: str = SUBJECT) -> OutgoingMessage:
    return OutgoingMessage(
        subject=subject, body=f'{{"key":"{key}"}}'.encode(), headers={"Nats-Msg-Id": key}
    )


def batches_observed(stream: str) -> tuple[float, float]:
    """(batches, messages) the publisher has recorded for `stream` in this process so far."""
    count = sum_ = 0.0
    for metric in PUBLISH_BATCH_MESSAGES.collect():
        for sample in metric.samples:
            if sample.labels.get("stream") != stream:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                sum_ = sample.value
    return count, sum_


async def stored_keys(nc: NatsClient, stream: str) -> list[str]:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    keys = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await js.get_msg(stream, seq)
        keys.append((stored.headers or {})["Nats-Msg-Id"])
    return keys


async def test_concurrent_callers_are_stored_together_each_with_its_own_sequence(
    ops_nc: NatsClient,
) -> None:
    publisher = GroupCommitPublisher(ops_nc, timeout_s=5.0)
    batches_before, messages_before = batches_observed(SESSIONS.name)
    acks = await asyncio.gather(
        *(publisher.publish(SESSIONS.name, message(f"k-{n}")) for n in range(CALLERS))
    )
    batches_after, messages_after = batches_observed(SESSIONS.name)

    keys = await stored_keys(ops_nc, SESSIONS.name)
    assert sorted(keys) == sorted(f"k-{n}" for n in range(CALLERS))
    assert not any(ack.duplicate for ack in acks)
    # Each caller's sequence is where its own message is stored.
    stored_at = {key: seq for seq, key in enumerate(keys, start=1)}
    assert [ack.seq for ack in acks] == [stored_at[f"k-{n}"] for n in range(CALLERS)]
    assert messages_after - messages_before == CALLERS
    # Fewer writes than messages: batches formed while earlier ones were in flight.
    assert batches_after - batches_before < CALLERS / 4


async def test_duplicates_in_a_burst_are_stored_once_and_reported(ops_nc: NatsClient) -> None:
    publisher = GroupCommitPublisher(ops_nc, timeout_s=5.0)
    already = await publisher.publish(SESSIONS.name, message("stored-before"))
    keys = ["stored-before"] * 5 + ["retried"] * 10 + [f"fresh-{n}" for n in range(40)]
    acks = await asyncio.gather(*(publisher.publish(SESSIONS.name, message(k)) for k in keys))

    stored = await stored_keys(ops_nc, SESSIONS.name)
    assert sorted(stored) == sorted({"stored-before", "retried", *keys})
    by_key: dict[str, list[bool]] = {}
    for key, ack in zip(keys, acks, strict=True):
        by_key.setdefault(key, []).append(bool(ack.duplicate))
    assert by_key["stored-before"] == [True] * 5
    assert sorted(by_key["retried"]) == [False] + [True] * 9  # one stored, nine were retries
    assert all(flags == [False] for key, flags in by_key.items() if key.startswith("fresh-"))
    pairs = zip(keys, acks, strict=True)
    assert all(ack.seq == already.seq for key, ack in pairs if key == "stored-before")


async def test_a_stream_without_atomic_batches_is_published_one_by_one(ops_nc: NatsClient) -> None:
    js = ops_nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="NOATOMIC",
            subjects=["noatomic.>"],
            storage=StorageType.FILE,
            duplicate_window=120,
        )
    )
    publisher = GroupCommitPublisher(ops_nc, timeout_s=5.0)
    acks = await asyncio.gather(
        *(publisher.publish("NOATOMIC", message(f"n-{n}", subject="noatomic.x")) for n in range(50))
    )
    assert sorted(await stored_keys(ops_nc, "NOATOMIC")) == sorted(f"n-{n}" for n in range(50))
    assert sorted(ack.seq for ack in acks) == list(range(1, 51))
    assert publisher._queues["NOATOMIC"].atomic is False  # remembered: no batch is tried again


async def test_a_closed_connection_fails_every_caller(ops_nc: NatsClient) -> None:
    publisher = GroupCommitPublisher(ops_nc, timeout_s=2.0)
    await ops_nc.close()
    results = await asyncio.gather(
        *(publisher.publish(SESSIONS.name, message(f"c-{n}")) for n in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(result, Exception) for result in results)


async def test_a_subject_of_another_stream_is_refused_for_every_caller(ops_nc: NatsClient) -> None:
    publisher = GroupCommitPublisher(ops_nc, timeout_s=5.0)
    health_before = (await ops_nc.jetstream().stream_info("HEALTH")).state.messages
    sessions_before = (await ops_nc.jetstream().stream_info(SESSIONS.name)).state.messages
    results = await asyncio.gather(
        *(publisher.publish("HEALTH", message(f"wrong-{n}")) for n in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(result, Exception) for result in results)
    assert (await ops_nc.jetstream().stream_info("HEALTH")).state.messages == health_before
    assert (await ops_nc.jetstream().stream_info(SESSIONS.name)).state.messages == sessions_before


async def test_messages_queued_while_disconnected_are_refused_not_buffered(
    ops_nc: NatsClient, provisioned: Any
) -> None:
    publisher = GroupCommitPublisher(ops_nc, timeout_s=2.0)
    provisioned.stop()
    deadline = asyncio.get_running_loop().time() + 10
    while ops_nc.is_connected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    results = await asyncio.gather(
        *(publisher.publish(SESSIONS.name, message(f"offline-{n}")) for n in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, nats.errors.ConnectionReconnectingError) for r in results), results
    provisioned.start()
    deadline = asyncio.get_running_loop().time() + 20
    while not ops_nc.is_connected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    await ops_nc.flush()
    # Nothing was left in the client's buffer to be stored after the callers' 503s.
    assert (await ops_nc.jetstream().stream_info(SESSIONS.name)).state.messages == 0
