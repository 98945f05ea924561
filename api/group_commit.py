"""Group commit for the api's publishes: events that arrive while earlier ones are being stored
are stored together, as one JetStream atomic batch per stream.

Why: the streams run with `sync_interval: always`, so the server fsyncs every stored message
before its PubAck. Published one at a time, thousands of edges' heartbeats queue behind the
disk's fsync rate and each request waits for all the fsyncs ahead of it. An atomic batch is
stored with one write and acknowledged with one PubAck, so a batch of fifty costs the disk,
the server and this process about what one message costs.

How: `publish` queues the message with a future. Up to MAX_FLUSHES_IN_FLIGHT flushes per
stream run at once; each takes what has queued (at most MAX_ATOMIC_BATCH_MESSAGES), stores it,
answers its callers and takes the next lot. Nothing waits on a timer: under light load a flush
finds one message and publishes it alone, exactly as before; batches only form while earlier
flushes are in flight, so they grow with the load.

Guarantee: a caller's future succeeds only once its message is stored; the batch's PubAck
counts every message. A batch the server refuses (it holds an id the stream already has, error
10201, or any other refusal) or does not answer in time is published again one message at a
time: each caller gets its own answer, and the stream's deduplication skips whatever the batch
did store. A connection error fails every caller of the batch (the api answers 503; edges retry
with the same key).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import Header, PubAck

from shared.atomic_batch import (
    MAX_ATOMIC_BATCH_MESSAGES,
    AtomicBatchRejected,
    OutgoingMessage,
    publish_atomic,
    publish_each,
)
from shared.observability import PUBLISH_BATCH_MESSAGES

log = logging.getLogger(__name__)

# Flushes per stream at once: while some wait for their PubAck, the next lot is already on its
# way, and the server's limit on batches in flight per stream (50) is far away even with
# several api processes.
MAX_FLUSHES_IN_FLIGHT = 4
# The server refuses atomic batches on a stream without allow_atomic (provisioning sets it).
ATOMIC_DISABLED_CODE = 10174


@dataclass
class _Pending:
    message: OutgoingMessage
    done: asyncio.Future[PubAck] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _StreamQueue:
    waiting: deque[_Pending] = field(default_factory=deque)
    flushing: int = 0
    atomic: bool = True  # false once the server said this stream refuses atomic batches


class GroupCommitPublisher:
    def __init__(self, nc: NatsClient, timeout_s: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()  # one context for the publisher's life: see publish_each
        self.timeout_s = timeout_s
        self._queues: dict[str, _StreamQueue] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def publish(self, stream: str, message: OutgoingMessage) -> PubAck:
        """Store `message` in `stream` and return its PubAck (`duplicate` as the stream says)."""
        queue = self._queues.setdefault(stream, _StreamQueue())
        pending = _Pending(message)
        queue.waiting.append(pending)
        if queue.flushing < MAX_FLUSHES_IN_FLIGHT:
            queue.flushing += 1
            task = asyncio.create_task(self._flush(stream, queue), name=f"group-commit:{stream}")
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await pending.done

    async def _flush(self, stream: str, queue: _StreamQueue) -> None:
        try:
            while queue.waiting:  # until this stream's queue is empty
                count = min(len(queue.waiting), MAX_ATOMIC_BATCH_MESSAGES)
                lot = [queue.waiting.popleft() for _ in range(count)]
                PUBLISH_BATCH_MESSAGES.labels(stream).observe(len(lot))
                await self._store(stream, queue, lot)
        finally:
            queue.flushing -= 1

    async def _store(self, stream: str, queue: _StreamQueue, lot: list[_Pending]) -> None:
        try:
            if not self.nc.is_connected:
                # nats-py would keep the messages in its reconnect buffer and send them later:
                # stored after the caller was told 503. Refuse them now instead.
                raise nats.errors.ConnectionReconnectingError
            if len(lot) > 1 and queue.atomic and await self._store_atomic(stream, queue, lot):
                return
            await self._store_one_by_one(stream, lot)
        except Exception as error:  # the connection failed: every caller answers 503
            for pending in lot:
                if not pending.done.done():
                    pending.done.set_exception(error)

    async def _store_atomic(self, stream: str, queue: _StreamQueue, lot: list[_Pending]) -> bool:
        """True when the batch was stored and its callers answered."""
        # As js.publish(stream=...) does: a subject that another stream holds is refused (10060),
        # never stored there.
        messages = [
            OutgoingMessage(
                p.message.subject,
                p.message.body,
                {**p.message.headers, Header.EXPECTED_STREAM: stream},
            )
            for p in lot
        ]
        try:
            ack = await publish_atomic(self.nc, messages, self.timeout_s)
        except (AtomicBatchRejected, nats.errors.TimeoutError) as error:
            if isinstance(error, AtomicBatchRejected) and error.code == ATOMIC_DISABLED_CODE:
                queue.atomic = False
                log.warning(
                    "stream refuses atomic batches; publishing one by one",
                    extra={"stream": stream, "hint": "payments nats provision sets allow_atomic"},
                )
            return False
        first_seq = ack.last_seq - ack.count + 1
        for offset, pending in enumerate(lot):
            if not pending.done.done():
                pending.done.set_result(PubAck(stream=ack.stream, seq=first_seq + offset))
        return True

    async def _store_one_by_one(self, stream: str, lot: list[_Pending]) -> None:
        answers = await publish_each(self.js, stream, [p.message for p in lot], self.timeout_s)
        for pending, answer in zip(lot, answers, strict=True):
            if pending.done.done():
                continue
            if isinstance(answer, BaseException):
                pending.done.set_exception(answer)
            else:
                pending.done.set_result(answer)
