"""Structured JSON logs and Prometheus metrics, shared by the api and every worker.

Log records carry fields (`event_key`, `stream`, `stream_seq`, `consumer`), never message
bodies, so no secret can reach a log line through them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_STANDARD_ATTRIBUTES = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


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


def start_metrics_server(port: int | None) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0")
