"""The fetch loop of one durable pull consumer, feeding batches to an EventConsumer-style handler.

Why not FastStream's pull subscriber: when nats-py's `fetch` raises the builtin TimeoutError
(it does when a fetch's deadline runs out between its two pull requests), FastStream's loop
does not catch it and drops the messages it had already fetched for that batch; they come back
only after ack_wait. Owning the loop keeps every fetched message handled at once, and keeps the
ack decisions in shared.event_consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from contracts.streams import ConsumerSpec

log = logging.getLogger(__name__)

# Pause after a connection problem before fetching again.
FETCH_ERROR_PAUSE_S = 0.5

BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class PullLoop:
    def __init__(self, spec: ConsumerSpec, handler: BatchHandler) -> None:
        self.spec = spec
        self.handler = handler
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    async def start(self, js: JetStreamContext) -> None:
        subscription = await js.pull_subscribe_bind(self.spec.durable, self.spec.stream)
        self._running = True
        self._task = asyncio.create_task(self._run(subscription), name=f"pull:{self.spec.durable}")

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while self._running:  # runs until stop()
            try:
                messages = await subscription.fetch(
                    self.spec.batch_size, timeout=self.spec.fetch_timeout_s
                )
            except TimeoutError:
                continue  # nothing arrived within fetch_timeout_s
            except (nats.errors.ConnectionClosedError, nats.errors.Error, OSError) as error:
                log.warning(
                    "fetch failed",
                    extra={"consumer": self.spec.durable, "error": type(error).__name__},
                )
                await asyncio.sleep(FETCH_ERROR_PAUSE_S)
                continue
            # A fetched batch is always handled to the end, even while stopping: its messages
            # are ours until acked, and handling them is faster than waiting for ack_wait.
            await asyncio.shield(self.handler(messages))
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()

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
