"""Small pieces of the operator tooling: log lines name the event being handled, the audit copy
is cut where the audit worker's position says, a damaged backup or one whose manifest names a
path outside its folders is refused, a failing step is one clear error, and restore checks the
database kind before it touches any stream."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import shared.backup
from shared.backup import (
    BackupError,
    BackupFailed,
    Manifest,
    check_manifest_paths,
    complete_lines_up_to,
    restore_audit,
    verify,
)
from shared.cli import cmd_backup, cmd_restore
from shared.observability import JsonFormatter, handling
from shared.settings import Settings, build_settings
from shared.stream_backup import StreamBackupError, sha256_of

PASSWORD = "hunter2-not-to-be-printed"


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
    assert b"".join(complete_lines_up_to(log, 2)).decode().splitlines() == lines[:2]
    assert b"".join(complete_lines_up_to(log, None)).decode().splitlines() == lines


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


def test_a_manifest_path_outside_its_folder_is_refused(tmp_path: Path) -> None:
    backup_dir, audit_dir = tmp_path / "backup", tmp_path / "data" / "audit"
    (backup_dir / "audit").mkdir(parents=True)
    (tmp_path / "outside").write_text("not part of the backup")
    escaping = Manifest(
        created_at="2025-01-01T00:00:00+00:00",
        database={"kind": "sqlite", "file": "database/payments.db"},
        files={"../outside": {"bytes": 22, "sha256": sha256_of(tmp_path / "outside")}},
    )
    with pytest.raises(BackupError, match="outside"):
        verify(backup_dir, escaping)
    for audit_file in ("audit/../../outside", "audit/../../../etc/passwd", "/etc/passwd"):
        escaping.audit_files = [audit_file]
        with pytest.raises(BackupError, match="not restoring it"):
            restore_audit(backup_dir, escaping, audit_dir)
        with pytest.raises(BackupError, match="not restoring it"):
            check_manifest_paths(backup_dir, escaping, audit_dir)
    assert not audit_dir.exists(), "nothing is written before every path is checked"
    escaping.audit_files = []
    for database_file in ("../outside", "/etc/passwd"):
        escaping.database["file"] = database_file
        with pytest.raises(BackupError, match="outside"):
            check_manifest_paths(backup_dir, escaping, audit_dir)
    escaping.database["file"] = "database/payments.db"
    escaping.streams = [{"name": "WORKLOADS", "folder": "streams/../../outside"}]
    with pytest.raises(BackupError, match="outside"):
        check_manifest_paths(backup_dir, escaping, audit_dir)


class FakeJetStream:
    def __init__(self, calls: list[str], streams: list[str]) -> None:
        self.calls, self.streams = calls, streams

    async def streams_info(self) -> list[Any]:
        self.calls.append("streams_info")
        return [SimpleNamespace(config=SimpleNamespace(name=name)) for name in self.streams]

    async def delete_stream(self, name: str) -> None:
        self.calls.append(f"delete {name}")


def fake_nats(monkeypatch: pytest.MonkeyPatch, calls: list[str], streams: list[str]) -> None:
    @asynccontextmanager
    async def nats_for(settings: Settings, allow_embedded: bool) -> AsyncIterator[Any]:
        calls.append("connect")
        nc = SimpleNamespace(jetstream=lambda: FakeJetStream(calls, streams))
        yield nc, settings

    monkeypatch.setattr(shared.backup, "nats_for", nats_for)


def settings_for(tmp_path: Path, database_url: str | None = None) -> Settings:
    return build_settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        nats_url="nats://127.0.0.1:4222",
        nats_ops_password=PASSWORD,
    )


def test_a_failing_backup_step_is_one_clear_error_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    fake_nats(monkeypatch, calls, ["WORKLOADS"])

    async def backup_database(url: str, out: Path) -> dict[str, Any]:
        return {"kind": "sqlite"}

    async def snapshot_stream(nc: Any, stream: str, folder: Path) -> Any:
        raise StreamBackupError(f"{stream}: no snapshot data (ops password {PASSWORD})")

    monkeypatch.setattr(shared.backup, "backup_database", backup_database)
    monkeypatch.setattr(shared.backup, "snapshot_stream", snapshot_stream)
    out = tmp_path / "backup"
    with pytest.raises(BackupFailed) as failed:
        asyncio.run(shared.backup.backup(settings_for(tmp_path), out))
    message = str(failed.value)
    assert "taking the snapshot of stream WORKLOADS failed" in message
    assert f"{out} is incomplete: remove it before retrying" in message
    assert PASSWORD not in message and "***" in message

    # Through the command: one line on stderr, a non-zero exit, no traceback.
    async def timing_out(nc: Any, stream: str, folder: Path) -> Any:
        raise TimeoutError

    monkeypatch.setattr(shared.backup, "snapshot_stream", timing_out)
    code = cmd_backup(argparse.Namespace(out=tmp_path / "second"), settings_for(tmp_path))
    printed = capsys.readouterr()
    assert code == 1 and printed.out == ""
    assert printed.err.count("\n") == 1 and "TimeoutError" in printed.err
    assert printed.err.startswith("backup failed: taking the snapshot of stream WORKLOADS")


def write_backup(folder: Path, kind: str) -> None:
    folder.mkdir()
    manifest = Manifest(
        created_at="2025-01-01T00:00:00+00:00",
        database={"kind": kind, "file": "database/payments.pgdump"},
        streams=[{"name": "WORKLOADS", "folder": "streams/WORKLOADS"}],
    )
    (folder / "manifest.json").write_text(manifest.to_json())


def test_restore_refuses_another_database_kind_before_touching_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    fake_nats(monkeypatch, calls, ["WORKLOADS"])

    async def restore_stream(nc: Any, folder: Path, replicas: int) -> dict[str, Any]:
        calls.append("restore_stream")
        return {}

    monkeypatch.setattr(shared.backup, "restore_stream", restore_stream)
    backup_dir = tmp_path / "backup"
    write_backup(backup_dir, "postgresql")
    # A PostgreSQL backup, a SQLite target: refused before NATS is even asked.
    code = cmd_restore(argparse.Namespace(source=backup_dir), settings_for(tmp_path))
    printed = capsys.readouterr()
    assert code == 2 and "restore refused: the backup holds a postgresql database" in printed.err
    assert calls == []
    # A PostgreSQL target without pg_restore installed: refused the same way.
    monkeypatch.setattr(shared.backup.shutil, "which", lambda name: None)
    postgres = settings_for(tmp_path, f"postgresql+asyncpg://u:{PASSWORD}@127.0.0.1:1/db")
    with pytest.raises(BackupError, match="pg_restore not found") as refused:
        asyncio.run(shared.backup.restore(postgres, backup_dir))
    assert not isinstance(refused.value, BackupFailed) and PASSWORD not in str(refused.value)
    assert calls == []
