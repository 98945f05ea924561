"""Audit worker: the AUDIT stream, written to JSONL files operators already read.

Consumes
  - AUDIT `audit.<domain>.<event>` through durable `audit-sink`, one message at a time in
    stream order (max_ack_pending 1), so any number of copies append in order.

Produces
  - `PAYMENTS_DATA_DIR/audit/<domain>.log` (license.log, registry.log, ...), one JSON object a
    line: `{"timestamp", "event", ...fields, "stream_seq", "event_key"}`;
    `PAYMENTS_LICENSE_AUDIT_LOG_PATH` overrides the license log's path.

Guarantee
  A line is appended and fsynced before its message is acked, and the last written stream
  sequence is kept beside the logs (`.audit-sink.position`, replaced atomically), so a
  redelivery after a crash is skipped rather than written twice. Producers put identifiers in
  audit events, never secrets; this worker writes what the stream holds and nothing else.

Limits
  Copies must share the audit folder (they do in the embedded stack); a malformed audit message
  is logged and terminated (it is kept in the stream).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from nats.aio.msg import Msg
from pydantic import ValidationError

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, AuditEventV1
from contracts.streams import AUDIT_SINK_CONSUMER
from shared.settings import Settings, load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)
POSITION_FILE = ".audit-sink.position"

settings = load_settings()
runtime = WorkerRuntime("audit", settings)
app = runtime.app


def log_path(config: Settings, domain: str) -> Path:
    if domain == "license":
        return config.resolved_license_audit_log
    if domain == "registry" and config.audit_log_path is not None:
        return config.audit_log_path
    safe = "".join(ch for ch in domain if ch.isalnum() or ch in "-_") or "other"
    return config.resolved_audit_dir / f"{safe}.log"


class AuditSink:
    def __init__(self, config: Settings) -> None:
        self.config = config
        self.position_path = config.resolved_audit_dir / POSITION_FILE

    def position(self) -> int:
        try:
            return int(json.loads(self.position_path.read_text())["stream_seq"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def save_position(self, stream_seq: int) -> None:
        self.position_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.position_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"stream_seq": stream_seq}))
        os.replace(temporary, self.position_path)

    def append(self, path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    async def handle(self, messages: list[Msg]) -> None:
        for message in messages:
            seq = message.metadata.sequence.stream
            if seq <= self.position():
                await message.ack()
                continue
            headers = message.headers or {}
            key = headers.get(EVENT_KEY_HEADER) or headers.get(MSG_ID_HEADER)
            try:
                event = AuditEventV1.model_validate_json(message.data)
            except ValidationError:
                log.warning("malformed audit message", extra={"stream_seq": seq, "event_key": key})
                await message.term()
                continue
            record = {
                "timestamp": event.at.isoformat(),
                "event": event.event,
                **event.fields,
                "stream_seq": seq,
                "event_key": key,
            }
            self.append(log_path(self.config, event.domain), json.dumps(record, default=str))
            self.save_position(seq)
            await message.ack()


sink = AuditSink(settings)


@runtime.consume(AUDIT_SINK_CONSUMER)
async def on_audit_events(messages: list[Msg]) -> None:
    await sink.handle(messages)
