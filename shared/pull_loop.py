"""The fetch loop of one durable pull consumer, feeding batches to an EventConsumer-style handler.

Why not FastStream's pull subscriber: when nats-py's `fetch` raises the builtin TimeoutError
(it does when a fetch's deadline runs out between its two pull requests), FastStream's loop
does not catch it and drops the messages it had already fetched for that batch; they come back
only after ack_wait. Owning the loop keeps every fetched message handled at once, and keeps the
ack decisions in shared.event_consumer. The batches come from shared.pull_consumer, which asks
JetStream's pull API directly instead of through nats-py's per-message `fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from contracts.streams import ConsumerSpec
from shared.observability import EVENT_DELAY_SECONDS, HANDLER_SECONDS, MESSAGES_FETCHED, handling
from shared.pull_consumer import PullConsumer, PullError

log = logging.getLogger(__name__)

# Pause after a connection problem before fetching again.
FETCH_ERROR_PAUSE_S = 0.5

BatchHandler = Callable[[list[Msg]], Awaitable[None]]


async def handle_observed(consumer: str, handler: BatchHandler, messages: list[Msg]) -> None:
    """Run `handler` on a batch: its log lines name the batch, its time and delay are metrics.

    Shielded: a fetched batch is always handled to the end, even while stopping (its messages
    are ours until acked, and handling them beats waiting for ack_wait).
    """
    MESSAGES_FETCHED.labels(consumer).inc(len(messages))
    started = time.perf_counter()
    with handling(consumer, messages):
        # The shielded task copies this context, so the handler's log lines carry the batch.
        await asyncio.shield(handler(messages))
    HANDLER_SECONDS.labels(consumer).observe(time.perf_counter() - started)
    try:
        stored = messages[0].metadata.timestamp
    except Exception:  # not a JetStream message (a test double): no stored time
        return
    EVENT_DELAY_SECONDS.labels(consumer).observe(max(0.0, time.time() - stored.timestamp()))


class PullLoop:
    def __init__(self, spec: ConsumerSpec, handler: BatchHandler) -> None:
        self.spec = spec
        self.handler = handler
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def start(self, nc: NatsClient) -> None:
        consumer = PullConsumer(nc, self.spec.stream, self.spec.durable)
        await consumer.start()
        self._running = True
        self._task = asyncio.create_task(self._run(consumer), name=f"pull:{self.spec.durable}")

    async def _run(self, consumer: PullConsumer) -> None:
        # The next batch is fetched while this one is applied, so the round trip and the
        # parsing of the next batch overlap the database work of this one.
        next_batch: asyncio.Task[list[Msg]] | None = asyncio.create_task(self._fetch(consumer))
        while next_batch is not None:  # until stop(): then the batch in flight is the last
            messages = await next_batch
            next_batch = asyncio.create_task(self._fetch(consumer)) if self._running else None
            if messages:
                await handle_observed(self.spec.durable, self.handler, messages)
        with contextlib.suppress(Exception):
            await consumer.stop()

    async def _fetch(self, consumer: PullConsumer) -> list[Msg]:
        """One batch; empty when nothing arrived within fetch_timeout_s or the fetch failed.

        Never more than max_ack_pending: the server stops delivering there and holds the
        request open until it expires, so a larger batch would always wait out the timeout.
        """
        batch = min(self.spec.batch_size, self.spec.max_ack_pending)
        return await fetch_or_pause(consumer, batch, self.spec.fetch_timeout_s)

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching; let the batch in hand commit and ack for up to `timeout_s`."""
        self._running = False
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout_s)
        except TimeoutError:
            self._task.cancel()
            log.warning("batch still running at shutdown", extra={"consumer": self.spec.durable})


async def fetch_or_pause(consumer: PullConsumer, batch: int, timeout_s: float) -> list[Msg]:
    """A batch of `consumer`, with its metadata parsed; empty after a failure, logged, and a
    pause (the connection is down, or the server refused the request)."""
    try:
        messages = await consumer.fetch(batch, timeout_s)
    except (nats.errors.Error, OSError, PullError) as error:
        log.warning(
            "fetch failed",
            extra={"consumer": consumer.consumer, "error": f"{type(error).__name__}: {error}"},
        )
        await asyncio.sleep(FETCH_ERROR_PAUSE_S)
        return []
    _parse_metadata(messages)
    return messages


def _parse_metadata(messages: list[Msg]) -> None:
    """Parse the messages' JetStream metadata now; nats-py keeps it on each message.

    A prefetch runs while the batch before it waits on the database, so work done here fills
    otherwise idle time of the event loop instead of adding to the next batch's.
    """
    for message in messages:
        try:
            message.metadata  # noqa: B018 - parsed and memoized by the property
        except Exception:  # unparsable: the consumer's decode step dead-letters it
            return


# How long the partitioned loop waits for more partitions' messages before applying a batch.
PARTITION_LINGER_S = 0.005


class PartitionedPullLoop:
    """Strictly ordered partitions, applied together.

    Each partition is a durable consumer with max_ack_pending 1, so JetStream hands out one of
    its messages at a time across every copy of the worker, and the next only after that one is
    acked (or, after a nak or a crash, redelivered): events of one key never overtake each
    other. One fetch task per partition feeds a queue; the applier takes whatever the partitions
    have ready and applies it as one batch (one transaction), so partitions proceed in parallel
    and share the cost of a commit.
    """

    def __init__(self, specs: tuple[ConsumerSpec, ...], handler: BatchHandler) -> None:
        self.specs = specs
        self.handler = handler
        self._running = False
        self._fetching_done = False
        self._queue: asyncio.Queue[tuple[Msg, asyncio.Future[None]]] = asyncio.Queue()
        self._all_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._applier: asyncio.Task[None] | None = None
        # One label for the partitions' shared batches: their durables' common prefix.
        self._label = _common_prefix([spec.durable for spec in specs])

    async def start(self, nc: NatsClient) -> None:
        self._running = True
        for spec in self.specs:
            consumer = PullConsumer(nc, spec.stream, spec.durable)
            await consumer.start()
            self._tasks.append(
                asyncio.create_task(self._fetch(spec, consumer), name=f"pull:{spec.durable}")
            )
        self._applier = asyncio.create_task(self._apply(), name="pull:partitions")

    async def _fetch(self, spec: ConsumerSpec, consumer: PullConsumer) -> None:
        while self._running:  # runs until stop()
            for message in await fetch_or_pause(consumer, 1, spec.fetch_timeout_s * 10):
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                await self._queue.put((message, done))
                if self._queue.qsize() + 1 >= len(self.specs):
                    self._all_ready.set()  # with the one the applier has taken, all are here
                await done  # the partition's next message comes only after this one is settled
        with contextlib.suppress(Exception):
            await consumer.stop()

    async def _apply(self) -> None:
        while not (self._fetching_done and self._queue.empty()):
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            await self._linger()
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await handle_observed(
                    self._label, self.handler, [message for message, _done in batch]
                )
            finally:
                for _message, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _linger(self) -> None:
        """Let the other partitions' messages join the batch: until every partition has one
        ready (each holds at most one), or PARTITION_LINGER_S has passed. Under a backlog all of
        them arrive within a round trip, so the batch starts then instead of after the linger."""
        self._all_ready.clear()
        if self._queue.qsize() + 1 >= len(self.specs):  # the one taken counts too
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_ready.wait(), PARTITION_LINGER_S)

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching; every message already fetched is applied and acked before we return.

        Cancelling a fetch could strand a message it just received: with max_ack_pending 1
        that would hold its partition until ack_wait. So fetchers finish their current fetch.
        """
        self._running = False
        deadline = asyncio.get_running_loop().time() + timeout_s
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        self._fetching_done = True
        if self._applier is None:  # stopped before start() finished
            return
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self._applier, remaining)
        except TimeoutError:
            self._applier.cancel()
        for task in self._tasks:
            task.cancel()


def _common_prefix(names: list[str]) -> str:
    """`sessions-p0`, `sessions-p1`, ... -> `sessions-p*` (character by character)."""
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return f"{prefix}*"
