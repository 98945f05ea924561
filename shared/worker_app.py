"""What every worker process shares: the FastStream app, the database, NATS, logs and metrics.

A worker module builds one `WorkerRuntime`, registers its handlers with `runtime.consume(spec)`
(durable pull consumer, batches, manual acks; see shared.pull_loop) or
`runtime.broker.subscriber(..., queue=...)` (request-reply commands), and exposes
`app = runtime.app` for `faststream run workers.<role>:app`.

SIGTERM and Ctrl-C stop fetching, let the batch in hand commit and ack (up to GRACEFUL_DRAIN_S),
then close the connections.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.security import SASLPlaintext
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.streams import ConsumerSpec
from shared.db.engine import make_engine
from shared.db.migrate import require_schema_at_head
from shared.db.repositories import outbox
from shared.event_consumer import EventConsumer, Projector
from shared.gc_freeze import freeze_startup_objects
from shared.nats_client import RECONNECT_WAIT_S, connect, credentials
from shared.observability import configure_logging, start_metrics_server
from shared.outbox_relay import OutboxRelay
from shared.pull_loop import BatchHandler, PartitionedPullLoop, PullLoop
from shared.settings import Settings
from shared.status import LagPoller

# Time a stopping worker gives its in-flight batch to commit and ack.
GRACEFUL_DRAIN_S = 20.0
# How long a starting worker waits for the server to confirm its subscriptions.
STARTUP_FLUSH_TIMEOUT_S = 10

log = logging.getLogger(__name__)


class MissingConsumer(RuntimeError):
    pass


async def _raw_body(message: Any) -> Any:
    # The handlers decode and validate bodies themselves; FastStream must not parse them (its
    # error logs would print the body) nor validate them (that would skip our dead letters).
    return message.body


class WorkerRuntime:
    def __init__(self, role: str, settings: Settings) -> None:
        self.role = role
        self.settings = settings
        self.consumer_specs: list[ConsumerSpec] = []
        self.sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(
            expire_on_commit=False
        )
        # Sessions that never take SQLite's write lock: consumers read there what they prepare
        # before their write transaction (shared.event_consumer).
        self.read_sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker(
            expire_on_commit=False
        )
        self._engine: AsyncEngine | None = None
        self._reader_engine: AsyncEngine | None = None
        self._nc: NatsClient | None = None
        creds = credentials(settings, "worker")
        self.broker = NatsBroker(
            servers=[url.strip() for url in settings.resolved_nats_url.split(",")],
            name=f"payments-{role}",
            security=SASLPlaintext(username=creds["user"], password=creds["password"])
            if creds
            else None,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]
            graceful_timeout=GRACEFUL_DRAIN_S,
            logger=logging.getLogger(f"faststream.{role}"),
            decoder=_raw_body,
        )
        self.app = FastStream(
            self.broker,
            logger=logging.getLogger(f"faststream.{role}"),
            on_startup=[self._startup],
            after_startup=[self._start_pulling],
            on_shutdown=[self._shutdown],
        )
        self.pull_loops: list[PullLoop | PartitionedPullLoop] = []
        self.event_consumers: list[EventConsumer[Any]] = []
        self.relay: OutboxRelay | None = None
        self.lag_poller = LagPoller(settings.consumer_lag_poll_seconds)
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        # Run first at shutdown, while NATS and the database are still open.
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []

    # -- resources ----------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the worker has not started")
        return self._engine

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("the worker has not started")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    async def _startup(self) -> None:
        configure_logging(self.role, self.settings.log_level)
        self._engine = make_engine(self.settings.resolved_database_url, writer=True)
        self.sessionmaker.configure(bind=self._engine)
        self._reader_engine = make_engine(self.settings.resolved_database_url, writer=False)
        self.read_sessionmaker.configure(bind=self._reader_engine)
        await require_schema_at_head(self._engine)
        self._nc = await connect(self.settings, "worker", f"payments-{self.role}-publisher")
        await self._require_consumers()
        self.relay = OutboxRelay(self.sessionmaker, self.nc, self.role)
        for consumer in self.event_consumers:
            consumer.relay = self.relay
        self.relay.start()
        if self.settings.metrics_port:
            start_metrics_server(self.settings.metrics_port)
            # Only worth the server's time when something can scrape the gauges.
            self.lag_poller.start(self.js)
        for hook in self.startup_hooks:
            await hook()
        freeze_startup_objects()

    async def _start_pulling(self) -> None:
        """Runs once the broker has subscribed: only then is the worker ready to be sent work."""
        for loop in self.pull_loops:
            await loop.start(self.nc)
        # A round trip to the server, so the broker's subscriptions (the request-reply commands)
        # have reached it: a request sent after "worker started" finds a responder.
        await self.broker.connection.flush(timeout=STARTUP_FLUSH_TIMEOUT_S)
        log.info("worker started", extra={"consumers": [s.durable for s in self.consumer_specs]})

    async def _shutdown(self) -> None:
        await self.lag_poller.stop()
        for hook in self.shutdown_hooks:
            await hook()
        for loop in self.pull_loops:
            await loop.stop(GRACEFUL_DRAIN_S)
        if self.relay is not None:
            await self.relay.stop(GRACEFUL_DRAIN_S)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except nats.errors.Error:
                # Reconnecting or already closing: nothing left to flush that the outbox won't.
                await self._nc.close()
        for engine in (self._engine, self._reader_engine):
            if engine is not None:
                await engine.dispose()
        log.info("worker stopped")

    async def _require_consumers(self) -> None:
        for spec in self.consumer_specs:
            try:
                await self.js.consumer_info(spec.stream, spec.durable)
            except NotFoundError:
                raise MissingConsumer(
                    f"consumer {spec.stream}/{spec.durable} is missing: "
                    "run `payments nats provision`"
                ) from None

    # -- handlers -----------------------------------------------------------------------------

    async def commit_and_publish(self, session: AsyncSession) -> None:
        """Commit a command's transaction, then publish what it wrote to the outbox."""
        await session.commit()
        pending = outbox.pending_of(session)
        if self.relay is not None and pending:
            await self.relay.publish_now(pending)

    def event_consumer(
        self, *, consumer: str, schemas: dict[str, type[Any]], projector: Projector[Any]
    ) -> EventConsumer[Any]:
        """An EventConsumer on this worker's database whose outbox this worker publishes."""
        built: EventConsumer[Any] = EventConsumer(
            consumer=consumer,
            schemas=schemas,
            projector=projector,
            sessionmaker=self.sessionmaker,
            reader=self.read_sessionmaker,
        )
        self.event_consumers.append(built)
        return built

    def consume(self, spec: ConsumerSpec) -> Callable[[BatchHandler], BatchHandler]:
        """Register `handler` for batches of the durable pull consumer `spec`."""
        self.consumer_specs.append(spec)

        def decorate(handler: BatchHandler) -> BatchHandler:
            self.pull_loops.append(PullLoop(spec, handler))
            return handler

        return decorate

    def consume_partitions(
        self, specs: tuple[ConsumerSpec, ...]
    ) -> Callable[[BatchHandler], BatchHandler]:
        """Register `handler` for the strictly ordered partition consumers `specs`."""
        self.consumer_specs.extend(specs)

        def decorate(handler: BatchHandler) -> BatchHandler:
            self.pull_loops.append(PartitionedPullLoop(specs, handler))
            return handler

        return decorate
