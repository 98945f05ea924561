"""Small pieces of the operator tooling: log lines name the event being handled, the audit copy
is cut where the audit worker's position says, and a damaged backup is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.backup import BackupError, Manifest, complete_lines_up_to, verify
from shared.observability import JsonFormatter, handling
from shared.stream_backup import sha256_of


def fake_message(seq: int, key: str) -> Any:
    metadata = SimpleNamespace(stream="WORKLOADS", sequence=SimpleNamespace(stream=seq))
    return SimpleNamespace(metadata=metadata, headers={"Payments-Event-Key": key})


def formatted(message: str, **extra: Any) -> dict[str, Any]:
    record = logging.LogRecord("workers.x", logging.WARNING, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(record, name, value)
    document: dict[str, Any] = json.loads(JsonFormatter("ledger").format(record))
    return document


def test_a_log_line_written_while_handling_a_message_names_its_key_and_sequence() -> None:
    assert "event_key" not in formatted("outside")
    with handling("ledger-workloads", [fake_message(42, "workload_time:w-1:abc")]):
        line = formatted("something about the event")
    assert line["event_key"] == "workload_time:w-1:abc"
    assert line["stream_seq"] == 42
    assert line["stream"] == "WORKLOADS" and line["consumer"] == "ledger-workloads"
    assert line["role"] == "ledger"
    with handling("ledger-workloads", [fake_message(7, "a"), fake_message(9, "b")]):
        batch = formatted("about the batch")
        own = formatted("about one of them", event_key="b", stream_seq=9)
    assert (batch["stream_seq_first"], batch["stream_seq_last"], batch["batch_size"]) == (7, 9, 2)
    assert "event_key" not in batch
    # The line's own fields win over the batch's.
    assert (own["event_key"], own["stream_seq"]) == ("b", 9)
    assert "event_key" not in formatted("after")


def test_the_audit_copy_keeps_whole_lines_the_position_covers(tmp_path: Path) -> None:
    log = tmp_path / "registry.log"
    lines = [json.dumps({"event": "register", "stream_seq": seq}) for seq in (1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"event": "regis')
    assert complete_lines_up_to(log, 2).decode().splitlines() == lines[:2]
    assert complete_lines_up_to(log, None).decode().splitlines() == lines


def test_a_damaged_or_incomplete_backup_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"no manifest\.json"):
        Manifest.load(tmp_path)
    data = tmp_path / "database" / "payments.db"
    data.parent.mkdir()
    data.write_bytes(b"the database")
    manifest = Manifest(
        created_at="2025-01-01T00:00:00+00:00",
        database={},
        files={"database/payments.db": {"bytes": 12, "sha256": sha256_of(data)}},
    )
    verify(tmp_path, manifest)
    data.write_bytes(b"the databasX")
    with pytest.raises(BackupError, match="does not match its checksum"):
        verify(tmp_path, manifest)
    data.unlink()
    with pytest.raises(BackupError, match="missing"):
        verify(tmp_path, manifest)
