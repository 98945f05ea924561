"""What the streams and their consumers hold: `payments status`, and the lag gauges of /metrics.

A consumer's lag is `num_pending` (stored, not yet delivered) plus `num_ack_pending` (delivered,
not yet acknowledged): the messages its worker role still owes. `payments status` (ops user)
lists every stream and consumer the server has, and names the consumers `contracts.streams`
defines that are missing. Workers may not list streams or consumers (nats.conf), so the
`LagPoller` every worker runs asks about each one `contracts.streams` defines, by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field

import nats.errors
from nats.js.api import ConsumerInfo, StreamInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.streams import ALL_CONSUMERS, ALL_STREAMS
from shared.observability import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    STREAM_BYTES,
    STREAM_LAST_SEQ,
    STREAM_MESSAGES,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerStatus:
    stream: str
    consumer: str
    pending: int  # num_pending: stored, not yet delivered
    ack_pending: int  # num_ack_pending: delivered, not yet acknowledged
    redelivered: int
    waiting: int  # pull requests waiting: copies of the role that are fetching
    last_delivered_seq: int
    ack_floor_seq: int
    defined: bool  # one of contracts.streams' durables

    @property
    def lag(self) -> int:
        return self.pending + self.ack_pending


@dataclass(frozen=True)
class StreamStatus:
    stream: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumer_count: int


@dataclass
class Status:
    streams: list[StreamStatus] = field(default_factory=list)
    consumers: list[ConsumerStatus] = field(default_factory=list)
    missing_streams: list[str] = field(default_factory=list)
    missing_consumers: list[str] = field(default_factory=list)

    @property
    def max_lag(self) -> int:
        return max((c.lag for c in self.consumers), default=0)

    def to_json(self) -> str:
        document = {
            "streams": [asdict(s) for s in self.streams],
            "consumers": [{**asdict(c), "lag": c.lag} for c in self.consumers],
            "missing_streams": self.missing_streams,
            "missing_consumers": self.missing_consumers,
        }
        return json.dumps(document, indent=2, sort_keys=True)


_DEFINED = {(spec.stream, spec.durable) for spec in ALL_CONSUMERS}


def stream_status(info: StreamInfo) -> StreamStatus:
    state = info.state
    return StreamStatus(
        stream=info.config.name or "",
        messages=state.messages,
        bytes=state.bytes,
        first_seq=state.first_seq,
        last_seq=state.last_seq,
        consumer_count=state.consumer_count,
    )


def consumer_status(info: ConsumerInfo) -> ConsumerStatus:
    return ConsumerStatus(
        stream=info.stream_name,
        consumer=info.name,
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        waiting=info.num_waiting or 0,
        last_delivered_seq=(info.delivered.stream_seq or 0) if info.delivered else 0,
        ack_floor_seq=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
        defined=(info.stream_name, info.name) in _DEFINED,
    )


async def gather(js: JetStreamContext) -> Status:
    """Every stream and consumer on the server (needs the ops user's list permissions)."""
    status = Status()
    streams = sorted(await js.streams_info(), key=lambda info: info.config.name or "")
    for info in streams:
        status.streams.append(stream_status(info))
        consumers = await js.consumers_info(info.config.name or "")
        status.consumers += sorted(
            (consumer_status(c) for c in consumers), key=lambda c: c.consumer
        )
    present = {s.stream for s in status.streams}
    status.missing_streams = [spec.name for spec in ALL_STREAMS if spec.name not in present]
    held = {(c.stream, c.consumer) for c in status.consumers}
    status.missing_consumers = [
        f"{spec.stream}/{spec.durable}"
        for spec in ALL_CONSUMERS
        if (spec.stream, spec.durable) not in held
    ]
    return status


async def gather_defined(js: JetStreamContext) -> Status:
    """The streams and consumers contracts.streams defines, asked for one by one by name."""
    status = Status()
    for stream in ALL_STREAMS:
        try:
            status.streams.append(stream_status(await js.stream_info(stream.name)))
        except NotFoundError:
            status.missing_streams.append(stream.name)
    for spec in ALL_CONSUMERS:
        try:
            status.consumers.append(
                consumer_status(await js.consumer_info(spec.stream, spec.durable))
            )
        except NotFoundError:
            status.missing_consumers.append(f"{spec.stream}/{spec.durable}")
    return status


def export(status: Status) -> None:
    """Set the /metrics gauges from a status."""
    for s in status.streams:
        STREAM_MESSAGES.labels(s.stream).set(s.messages)
        STREAM_BYTES.labels(s.stream).set(s.bytes)
        STREAM_LAST_SEQ.labels(s.stream).set(s.last_seq)
    for c in status.consumers:
        CONSUMER_PENDING.labels(c.stream, c.consumer).set(c.pending)
        CONSUMER_ACK_PENDING.labels(c.stream, c.consumer).set(c.ack_pending)
        CONSUMER_REDELIVERED.labels(c.stream, c.consumer).set(c.redelivered)


def render(status: Status) -> str:
    """The operator's table: streams, then consumers with their lag."""
    lines = [
        f"{'STREAM':<12} {'MESSAGES':>10} {'BYTES':>12} {'FIRST SEQ':>10} {'LAST SEQ':>10} "
        f"{'CONSUMERS':>9}"
    ]
    for s in status.streams:
        lines.append(
            f"{s.stream:<12} {s.messages:>10} {s.bytes:>12} {s.first_seq:>10} {s.last_seq:>10} "
            f"{s.consumer_count:>9}"
        )
    lines.append("")
    lines.append(
        f"{'STREAM':<12} {'CONSUMER':<20} {'LAG':>8} {'PENDING':>8} {'ACK PENDING':>11} "
        f"{'REDELIVERED':>11} {'WAITING':>7} {'DELIVERED':>10} {'ACK FLOOR':>10}"
    )
    for c in status.consumers:
        name = c.consumer if c.defined else f"{c.consumer} (not ours)"
        lines.append(
            f"{c.stream:<12} {name:<20} {c.lag:>8} {c.pending:>8} {c.ack_pending:>11} "
            f"{c.redelivered:>11} {c.waiting:>7} {c.last_delivered_seq:>10} {c.ack_floor_seq:>10}"
        )
    for name in status.missing_streams:
        lines.append(f"missing stream {name}: run `payments nats provision`")
    for name in status.missing_consumers:
        lines.append(f"missing consumer {name}: run `payments nats provision`")
    return "\n".join(lines)


class LagPoller:
    """Every `interval_s`, the stream and consumer gauges of /metrics, from the server."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self, js: JetStreamContext) -> None:
        self._task = asyncio.create_task(self._run(js), name="lag-poller")

    async def _run(self, js: JetStreamContext) -> None:
        while True:  # until stop() cancels it
            try:
                export(await gather_defined(js))
            except (nats.errors.Error, TimeoutError, OSError) as error:
                # Reconnecting: the gauges keep their last values until the next poll.
                log.debug("lag poll failed", extra={"error": type(error).__name__})
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
