"""Batches from one JetStream pull consumer, asked for with the pull API and collected in bulk.

Why not nats-py's `PullSubscription.fetch`: it waits for every message on its own (a task, a
timer and a uuid per `next_msg`), which cost about half of a worker's CPU per message here:
62 µs a fetched and acked message, against 28 µs this way (bench/README.md, session 6). This
sends the same pull requests JetStream's API defines (`$JS.API.CONSUMER.MSG.NEXT.<stream>.
<consumer>` with `batch`, `expires`, `no_wait`) and lets a plain subscription's callback collect
the answers; the messages are nats-py's own `Msg`, so ack, nak, term and metadata are unchanged.

How a fetch goes: hand over what already arrived; otherwise one request with `no_wait` and
`expires`, which the server (2.15, checked in tests/test_pull_consumer.py) answers at once with
what it has, ending with 404 when that is short of the batch, or, when it has nothing, with the
first message to come within `expires` (408 when none does). When another copy's request is
already waiting on the consumer, the server refuses a no_wait request at once (408 "Requests
Pending"); then a plain request waits its turn.

Each request has its own reply subject under one inbox, so the status that ends a request is
matched to it and a stale one is ignored. A message that arrives for a request already given
up on (the server never answered in time) is kept for the next fetch, never dropped: it is
ours until acked, and dropping it would hold it until ack_wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

STATUS_HEADER = "Status"
DESCRIPTION_HEADER = "Description"
# Statuses that end a request normally: nothing (more) to deliver, or its time ran out.
NO_MESSAGES = "404"
REQUEST_TIMEOUT = "408"
ENDED_NORMALLY = frozenset({NO_MESSAGES, REQUEST_TIMEOUT})
# No responders: the consumer is not reachable from this server (yet), or JetStream is down.
UNAVAILABLE = "503"
# A 408's description when a no_wait request found another request already waiting.
REQUESTS_PENDING = "Requests Pending"
# The reply subject of every message a consumer delivers.
ACK_PREFIX = "$JS.ACK."
# An idle heartbeat: only sent when a request asks for them (none here); it ends nothing.
HEARTBEAT = "100"
# How long past its own expiry (or, for a no_wait request, at all) a request the server never
# answered is waited for: the server restarted, or the connection dropped with it.
ANSWER_GRACE_S = 2.0
# The subscription buffers what arrived until a fetch takes it; far above any batch in flight.
PENDING_MESSAGES_LIMIT = 1_000_000
PENDING_BYTES_LIMIT_B = 1024 * 1024 * 1024


class PullError(Exception):
    """The server ended a pull request with an error status (409 deleted, 503 no responders)."""

    def __init__(self, status: str, description: str) -> None:
        super().__init__(f"pull request refused: {status} {description}".strip())
        self.status = status
        self.description = description


class _Request:
    def __init__(self, reply: str, wanted: int) -> None:
        self.reply = reply
        self.remaining = wanted
        self.ended: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    def end(self, status: str, description: str = "") -> None:
        if not self.ended.done():
            self.ended.set_result((status, description))


class PullConsumer:
    """Fetches batches of one durable (or named ephemeral) pull consumer of `stream`."""

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self._api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._numbers = itertools.count(1)
        self._arrived: collections.deque[Msg] = collections.deque()
        self._current: _Request | None = None
        self._subscription: Subscription | None = None
        self.requests_sent = 0  # for tests and metrics: how many pull requests went out

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._subscription = await self.nc.subscribe(
            f"{self._inbox}.*",
            cb=self._on_message,
            pending_msgs_limit=PENDING_MESSAGES_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT_B,
        )

    async def stop(self) -> None:
        """Unsubscribe, and hand back (nak) what arrived that no fetch took, so the server
        redelivers it now instead of after ack_wait. A subscription left open would also hold
        the connection's drain at shutdown until nats-py's drain timeout."""
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing already
                await self._subscription.unsubscribe()
            self._subscription = None
        for message in self.take(len(self._arrived)):
            with contextlib.suppress(nats.errors.Error):  # then ack_wait hands it back
                await message.nak()

    @property
    def waiting(self) -> int:
        """Messages that arrived and no fetch has taken yet."""
        return len(self._arrived)

    def take(self, batch: int) -> list[Msg]:
        """Up to `batch` of the messages that already arrived, in arrival order; never waits."""
        arrived = self._arrived
        count = min(batch, len(arrived))
        return [arrived.popleft() for _ in range(count)]

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to `batch` messages: those available now, else the first to come within
        `timeout_s` (and any that come with it).

        Raises PullError when the server refuses the request (the consumer is gone, JetStream
        does not answer); the caller decides how long to wait before asking again.
        """
        messages = self.take(batch)
        if messages:
            return messages  # late arrivals: hand them over before asking for more
        ended = await self._ask(batch, timeout_s, no_wait=True)
        if ended == REQUESTS_PENDING and not self._arrived:
            # Another copy's request is waiting on this consumer, and the server answers a
            # no_wait request at once then: wait our turn with a plain one instead of spinning.
            await self._ask(batch, timeout_s, no_wait=False)
        return self.take(batch)

    async def _ask(self, wanted: int, expires_s: float, *, no_wait: bool) -> str:
        """Send one pull request and wait until the server ends it (or ANSWER_GRACE_S past its
        expiry); returns the description of the status that ended it ("" when it was filled).

        `no_wait` with `expires`: the server delivers what it has and ends the request at once;
        when it has nothing it waits, up to `expires`, for the first message. Without `no_wait`
        it waits for the whole batch until `expires`.
        """
        request = _Request(f"{self._inbox}.{next(self._numbers)}", wanted)
        body: dict[str, object] = {"batch": wanted, "expires": int(expires_s * 1_000_000_000)}
        if no_wait:
            body["no_wait"] = True
        self.requests_sent += 1
        self._current = request
        try:
            await self.nc.publish(self._api_subject, json.dumps(body).encode(), reply=request.reply)
            wait_s = expires_s + ANSWER_GRACE_S
            try:
                status, description = await asyncio.wait_for(request.ended, wait_s)
            except TimeoutError:
                # Expected while the connection is down (the request never left, or the server
                # restarted); worth a warning only when it is up.
                level = logging.WARNING if self.nc.is_connected else logging.DEBUG
                log.log(
                    level, "pull request not answered", extra={**self._tags(), "wait_s": wait_s}
                )
                return ""
        finally:
            self._current = None
        if status and status not in ENDED_NORMALLY:
            raise PullError(status, description)
        return description

    def _tags(self) -> dict[str, str]:
        return {"consumer": self.consumer, "stream": self.stream}

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        if not msg.data and headers and STATUS_HEADER in headers:
            current = self._current
            if headers[STATUS_HEADER] == HEARTBEAT:
                return
            if current is not None and msg.subject == current.reply:
                current.end(headers[STATUS_HEADER], headers.get(DESCRIPTION_HEADER, ""))
            return  # a status for a request already given up on
        if not msg.reply.startswith(ACK_PREFIX):
            # Not a consumer's delivery (nothing else should publish to our inbox): without an
            # ack subject it has no stream position and could not be settled.
            log.warning("ignored a message without a JetStream ack subject", extra=self._tags())
            return
        self._arrived.append(msg)
        current = self._current
        if current is not None:
            current.remaining -= 1
            if current.remaining <= 0:
                current.end("")
