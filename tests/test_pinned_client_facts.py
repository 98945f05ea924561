"""Why session partitions keep max_ack_pending 1 instead of JetStream's pinned-client groups.

A pinned-client priority group (nats-server 2.11+, ADR-42) lets one client at a time pull a
consumer, so a partition could keep many messages in flight and still be applied by one copy.
It would keep a session's events in order only if, when the pin moves, the new client got the
old client's unacked messages before anything newer. These tests check what nats-server (the
pinned wheel, 2.15) actually does, because docs/decisions.md ("Ordering of session events")
rests on it:

- the pin moves `priority_timeout` after the pinned client's last pull request, and the new
  client is served newer messages at once: the old client's unacked ones come back only when
  their ack_wait runs out, after the newer ones (ADR-42's "wait for in-flight messages" is not
  implemented: `unassignPinId` leaves pending and redelivery state alone);
- with `priority_timeout` above ack_wait they do come back first, but only because the timers
  happen to line up; a stale pin is refused with 423.

If a later server keeps order across a pin change, the first test fails: time to revisit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contracts.streams import WORKLOADS

SUBJECT = "workloads.time.pinned-facts"
GROUP = "sessions"
PIN_HEADER = "Nats-Pin-Id"
# Short against the timeouts below, so a pinned client renews its pin in time.
PULL_EXPIRES_S = 0.4
# Far above a round trip, far below the timers under test.
ANSWER_GRACE_S = 2.0
FIRST_BATCH = 5
MESSAGES = 15


@dataclass
class Pull:
    """What one pull request brought: stream sequences, delivery counts and the pin."""

    sequences: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)
    pins: set[str] = field(default_factory=set)
    status: str = ""


async def create_pinned_consumer(
    nc: NatsClient, durable: str, *, priority_timeout_s: float, ack_wait_s: float
) -> None:
    # nats-py 2.16's ConsumerConfig has no priority-group fields: the API's own JSON.
    config = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * 1e9),
        "max_ack_pending": 100,
        "filter_subject": SUBJECT,
        "priority_groups": [GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(priority_timeout_s * 1e9),
    }
    answer = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{WORKLOADS.name}.{durable}",
        json.dumps({"stream_name": WORKLOADS.name, "config": config}).encode(),
        timeout=5,
    )
    assert "error" not in json.loads(answer.data), answer.data


async def pull(
    nc: NatsClient, durable: str, batch: int, pin: str | None = None, *, ack: bool = True
) -> Pull:
    """One pull request of the group; acks what it gets unless `ack` is false (a stalled copy)."""
    result = Pull()
    finished = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        headers = msg.headers or {}
        if not msg.data and "Status" in headers:
            result.status = headers["Status"]
            finished.set()
            return
        result.sequences.append(msg.metadata.sequence.stream)
        result.deliveries.append(msg.metadata.num_delivered)
        result.pins.add(headers.get(PIN_HEADER, ""))
        if ack:
            await msg.ack()
        if len(result.sequences) >= batch:
            finished.set()

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=on_message)
    request: dict[str, object] = {
        "batch": batch,
        "expires": int(PULL_EXPIRES_S * 1e9),
        "group": GROUP,
    }
    if pin is not None:
        request["id"] = pin
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{WORKLOADS.name}.{durable}",
        json.dumps(request).encode(),
        reply=inbox,
    )
    # A status ends the request at its expiry; the grace only covers a lost one.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished.wait(), PULL_EXPIRES_S + ANSWER_GRACE_S)
    await subscription.unsubscribe()
    return result


async def pinned_and_stalled(
    nc: NatsClient, durable: str, *, priority_timeout_s: float, ack_wait_s: float
) -> str:
    """A pinned consumer with MESSAGES stored, and client A pinned by its first pull, which
    takes FIRST_BATCH, never acks them and never pulls again (a stalled copy); A's pin id."""
    await create_pinned_consumer(
        nc, durable, priority_timeout_s=priority_timeout_s, ack_wait_s=ack_wait_s
    )
    js = nc.jetstream()
    for number in range(MESSAGES):
        await js.publish(SUBJECT, json.dumps({"n": number}).encode(), stream=WORKLOADS.name)
    first = await pull(nc, durable, FIRST_BATCH, ack=False)
    assert first.sequences == list(range(1, FIRST_BATCH + 1))
    assert len(first.pins) == 1 and "" not in first.pins, first.pins
    return first.pins.pop()


async def pull_until_served(
    nc: NatsClient, durable: str, batch: int, within_s: float, pin: str | None = None
) -> Pull:
    """Client B: pulls (without a pin, as a standby copy does, or with its own) until the
    server serves it."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        answer = await pull(nc, durable, batch, pin)
        if answer.sequences:
            return answer
    raise AssertionError(f"not served within {within_s} s")


async def test_a_new_pinned_client_gets_newer_messages_before_the_old_clients_unacked_ones(
    ops_nc: NatsClient,
) -> None:
    durable = "pinned-facts-short-ttl"
    old_pin = await pinned_and_stalled(ops_nc, durable, priority_timeout_s=1.5, ack_wait_s=5.0)

    first = await pull_until_served(ops_nc, durable, MESSAGES, within_s=4.0)
    # Pinned anew 1.5 s after A's pull, and served 6.. at once: 1..5 are still A's.
    assert first.sequences[0] == FIRST_BATCH + 1
    assert set(first.deliveries) == {1}
    assert first.pins and old_pin not in first.pins
    # A's five come back only after their ack_wait, behind the newer messages.
    later = await pull_until_served(ops_nc, durable, MESSAGES, within_s=8.0, pin=first.pins.pop())
    assert sorted(later.sequences) == list(range(1, FIRST_BATCH + 1))
    assert set(later.deliveries) == {2}


async def test_with_a_timeout_above_ack_wait_the_unacked_come_first_and_a_stale_pin_is_refused(
    ops_nc: NatsClient,
) -> None:
    durable = "pinned-facts-long-ttl"
    old_pin = await pinned_and_stalled(ops_nc, durable, priority_timeout_s=3.0, ack_wait_s=1.0)

    first = await pull_until_served(ops_nc, durable, FIRST_BATCH, within_s=6.0)
    assert sorted(first.sequences) == list(range(1, FIRST_BATCH + 1))
    assert set(first.deliveries) == {2}
    stale = await pull(ops_nc, durable, 1, pin=old_pin)
    assert stale.status == "423" and not stale.sequences
