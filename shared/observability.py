"""Structured JSON logs and Prometheus metrics, shared by the api and every worker.

Log records carry fields (`event_key`, `stream`, `stream_seq`, `consumer`), never message
bodies, so no secret can reach a log line through them. While a pull loop hands a batch to its
handler, `handling()` puts the batch's consumer, stream and sequences (and, for a batch of one,
its event key) into a context variable that the formatter adds to every line the handler logs,
so a worker's log line about an event names it even when the line's own code did not.

Metric names are listed in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER

_STANDARD_ATTRIBUTES = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# The batch a pull loop is handling in this task; the formatter adds it to log lines.
_HANDLING: ContextVar[dict[str, Any] | None] = ContextVar("payments_handling", default=None)


def batch_fields(consumer: str, messages: Sequence[Msg]) -> dict[str, Any]:
    """What a log line written while handling `messages` should say about them."""
    fields: dict[str, Any] = {"consumer": consumer}
    if not messages:
        return fields
    try:
        first, last = messages[0].metadata, messages[-1].metadata
    except Exception:  # not a JetStream message (a test double): nothing to add
        return fields
    fields["stream"] = first.stream
    if len(messages) == 1:
        headers = messages[0].headers or {}
        fields["stream_seq"] = first.sequence.stream
        fields["event_key"] = headers.get(EVENT_KEY_HEADER) or headers.get(MSG_ID_HEADER)
    else:
        fields["stream_seq_first"] = first.sequence.stream
        fields["stream_seq_last"] = last.sequence.stream
        fields["batch_size"] = len(messages)
    return fields


@contextlib.contextmanager
def handling(consumer: str, messages: Sequence[Msg]) -> Iterator[None]:
    """Tag every log line written inside (and in tasks started inside) with the batch."""
    token = _HANDLING.set(batch_fields(consumer, messages))
    try:
        yield
    finally:
        _HANDLING.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # The batch being handled first, so a line's own fields (a single event) win.
        payload.update(_HANDLING.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            payload["error"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str)


def configure_logging(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # FastStream's own logger prints handler errors with message bodies; ours replace it.
    logging.getLogger("faststream").setLevel(logging.WARNING)


EVENTS_PROCESSED = Counter(
    "payments_events_processed_total",
    "Stream messages handled by a worker, by outcome.",
    ["consumer", "outcome"],
)
BATCH_SECONDS = Histogram(
    "payments_batch_seconds",
    "Time from fetch to commit of one batch.",
    ["consumer"],
)
DEAD_LETTERS = Counter("payments_dead_letters_total", "Messages dead-lettered.", ["consumer"])
REDELIVERIES = Counter(
    "payments_redeliveries_total", "Messages seen with num_delivered > 1.", ["consumer"]
)
CONSUMER_LAG = Gauge(
    "payments_consumer_lag_messages", "num_pending reported with the last batch.", ["consumer"]
)
HTTP_REQUESTS = Counter(
    "payments_http_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram("payments_http_request_seconds", "HTTP request latency.", ["route"])
PUBLISH_SECONDS = Histogram(
    "payments_publish_seconds", "JetStream publish latency (until PubAck).", ["stream"]
)
# Messages the api stored with one write (api.group_commit): 1 under light load, more while
# earlier writes are in flight.
PUBLISH_BATCH_MESSAGES = Histogram(
    "payments_publish_batch_messages",
    "Messages stored together by one api group commit.",
    ["stream"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)

# Seconds from JetStream storing a message to its worker finishing the batch that held it:
# the delay an operator feels. Buckets reach past ack_wait (30 s) and into minutes, since a
# stopped or lagging role shows up here once it runs again.
EVENT_DELAY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
EVENT_DELAY_SECONDS = Histogram(
    "payments_event_delay_seconds",
    "Time from JetStream storing a message to its batch being handled (oldest of each batch).",
    ["consumer"],
    buckets=EVENT_DELAY_BUCKETS_S,
)
HANDLER_SECONDS = Histogram(
    "payments_handler_seconds",
    "Time a worker's handler took for one fetched batch (every consumer, any handler).",
    ["consumer"],
)
MESSAGES_FETCHED = Counter(
    "payments_messages_fetched_total", "Messages fetched from a durable consumer.", ["consumer"]
)

# Polled from the server (shared.consumer_lag), for every consumer in contracts.streams, by
# every worker: the lag of a role that is down still shows on the others' /metrics.
CONSUMER_PENDING = Gauge(
    "payments_consumer_pending_messages",
    "Messages stored but not yet delivered to the consumer (num_pending).",
    ["stream", "consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "payments_consumer_ack_pending_messages",
    "Messages delivered but not yet acknowledged (num_ack_pending).",
    ["stream", "consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "payments_consumer_redelivered_messages",
    "Messages delivered more than once and not yet acknowledged (num_redelivered).",
    ["stream", "consumer"],
)
STREAM_MESSAGES = Gauge("payments_stream_messages", "Messages a stream holds.", ["stream"])
STREAM_BYTES = Gauge("payments_stream_bytes", "Bytes a stream holds.", ["stream"])
STREAM_LAST_SEQ = Gauge("payments_stream_last_seq", "A stream's last sequence.", ["stream"])

# Payouts, by the state each one reaches (claimed, signed, broadcast, paid, short_paid, retry,
# reverted, failed, expired, simulated: contracts.events.PayoutStatus). The payout engine
# increments it once per state change it commits.
PAYOUTS = Counter(
    "payments_payouts_total", "Payout state changes, by the state reached.", ["state"]
)


def start_metrics_server(port: int | None) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0")
