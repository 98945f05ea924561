"""`payments backup --out DIR` and `payments restore --from DIR` (docs/backups.md).

A backup holds, in this order of copying:

1. the database: SQLite through sqlite3's online backup API (a consistent copy while workers
   write), PostgreSQL through `pg_dump --format=custom`;
2. the audit files under the data folder, cut at the audit worker's saved position;
3. a snapshot of every stream, without consumers (shared.stream_backup).

The order is what makes the parts agree. Everything the database and the audit files hold was
derived from stream messages stored before they were copied, so the snapshots, taken last, hold
all of it (and maybe more). `payments restore` creates the streams from the snapshots,
provisions the consumers afresh (delivering from each stream's first message), then puts the
database and the audit files back. When the workers start, every message is delivered again:
the inbox (and the audit worker's position) skip what the restored database and files already
hold, and apply what arrived between the database copy and the snapshots. Nothing is applied
twice and nothing accepted before the backup is lost.

`manifest.json` is written last, with the size and sha256 of every file: a backup without one
is incomplete and restore refuses it, as it refuses a file whose checksum differs. The backup
holds the database, so it holds sealed image secrets, token hashes and invite hashes: protect
it like the database. It never holds PAYMENTS_SECRET_KEY (nor any other environment secret),
without which the sealed secrets cannot be opened: keep that key in your secret store.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
from pydantic import SecretStr
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from contracts.streams import ALL_STREAMS
from shared.db.engine import is_sqlite
from shared.db.migrate import upgrade
from shared.nats_client import connect
from shared.settings import Settings
from shared.stream_backup import (
    StreamBackupError,
    read_metadata,
    restore_stream,
    sha256_of,
    snapshot_stream,
)

BACKUP_FORMAT = 1
MANIFEST = "manifest.json"
DATABASE_DIR = "database"
SQLITE_FILE = "payments.db"
PG_DUMP_FILE = "payments.pgdump"
AUDIT_DIR = "audit"
STREAMS_DIR = "streams"
# Kept beside the audit logs by the audit worker (workers/audit.py).
AUDIT_POSITION_FILE = ".audit-sink.position"
PG_TOOL_TIMEOUT_S = 3600.0
# Owner-only: the backup holds everything the database holds.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class BackupError(RuntimeError):
    """Refused or failed; the message says what to do and never quotes a secret."""


class BackupFailed(BackupError):
    """A step failed (rather than a check refusing): the message names the step."""


# What the steps below raise besides BackupError; `backup` and `restore` turn each into one
# BackupError naming the step, so the command prints one line instead of a traceback.
FAILURES: tuple[type[BaseException], ...] = (
    StreamBackupError,
    nats.errors.Error,
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    sqlite3.Error,
    SQLAlchemyError,  # the migration after the database is restored
    subprocess.SubprocessError,
    ValueError,
    KeyError,
    TypeError,
)
CAUGHT: tuple[type[BaseException], ...] = (BackupError, *FAILURES)


def inside(base: Path, relative: str | Path) -> Path:
    """`base / relative`, resolved; refused unless it lies inside `base` (a manifest is not
    trusted: `audit/../..` or an absolute path must not reach another folder)."""
    root = base.resolve()
    path = (base / relative).resolve()
    if path == root or not path.is_relative_to(root):
        raise BackupError(f"the manifest names {str(relative)!r}, outside {base}: not restoring it")
    return path


@dataclass
class Manifest:
    created_at: str
    database: dict[str, Any]
    streams: list[dict[str, Any]] = field(default_factory=list)
    audit_files: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": BACKUP_FORMAT,
                "created_at": self.created_at,
                "copied_in_order": ["database", "audit", "streams"],
                "database": self.database,
                "streams": self.streams,
                "audit_files": self.audit_files,
                "files": self.files,
                "not_included": (
                    "PAYMENTS_SECRET_KEY and every other secret of the environment; "
                    "JetStream consumers (payments restore provisions them)"
                ),
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise BackupError(f"{folder} has no {MANIFEST}: not a backup, or an interrupted one")
        try:
            document = json.loads(path.read_text())
            if document.get("format") != BACKUP_FORMAT:
                raise BackupError(f"unknown backup format {document.get('format')!r}")
            return cls(
                created_at=document["created_at"],
                database=document["database"],
                streams=document["streams"],
                audit_files=document["audit_files"],
                files=document["files"],
            )
        except (ValueError, KeyError, AttributeError) as error:
            raise BackupError(f"{path} is damaged ({type(error).__name__}: {error})") from None

    def lines(self) -> list[str]:
        db = self.database
        found = [
            f"database: {db['kind']} ({db['file']}, {db['bytes']} bytes, "
            f"schema {db['alembic_revision']})"
        ]
        for stream in self.streams:
            found.append(
                f"stream {stream['name']}: {stream['messages']} messages, {stream['bytes']} "
                f"bytes, sequences {stream['first_seq']}-{stream['last_seq']}"
            )
        found.append(f"audit files: {len(self.audit_files)}")
        return found


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _private_file(path: Path) -> None:
    os.chmod(path, PRIVATE_FILE_MODE)


def _walk_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path


# -- the database -------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database:
        raise BackupError("the SQLite database URL names no file")
    return Path(database)


def sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy through SQLite's online backup API (writers may keep writing)."""
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def copy_durably(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def sqlite_revision(path: Path) -> str | None:
    connection = sqlite3.connect(path)
    try:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        connection.close()
    return str(row[0]) if row else None


def libpq_env(url: URL) -> dict[str, str]:
    """pg_dump/pg_restore connection settings. The password travels in PGPASSWORD, never argv,
    so `ps` cannot show it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    for name, value in (
        ("PGHOST", url.host),
        ("PGPORT", str(url.port) if url.port else None),
        ("PGUSER", url.username),
        ("PGPASSWORD", url.password),
        ("PGDATABASE", url.database),
    ):
        if value:
            env[name] = str(value)
    sslmode = url.query.get("sslmode") or url.query.get("ssl")
    if isinstance(sslmode, str):
        env["PGSSLMODE"] = sslmode
    return env


def pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} not found: install the PostgreSQL client tools (the server's major "
            "version or newer) to back up or restore a PostgreSQL database"
        )
    return found


def run_pg_tool(argv: list[str], url: URL) -> None:
    done = subprocess.run(
        argv, env=libpq_env(url), capture_output=True, timeout=PG_TOOL_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise BackupError(f"{Path(argv[0]).name} failed: {' '.join(detail[-3:])}")


def asyncpg_dsn(url: URL, database: str | None = None) -> str:
    target = url.set(drivername="postgresql")
    if database is not None:
        target = target.set(database=database)
    return target.render_as_string(hide_password=False)


async def pg_revision(url: URL) -> str | None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        value = await connection.fetchval(
            "SELECT version_num FROM alembic_version"
            if await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
            else "SELECT NULL"
        )
    finally:
        await connection.close()
    return None if value is None else str(value)


async def backup_database(database_url: str, out: Path) -> dict[str, Any]:
    folder = out / DATABASE_DIR
    folder.mkdir(mode=PRIVATE_DIR_MODE)
    if is_sqlite(database_url):
        source = sqlite_path(database_url)
        if not source.is_file():
            raise BackupError(f"no SQLite database at {source}")
        target = folder / SQLITE_FILE
        await asyncio.to_thread(sqlite_copy, source, target)
        kind, revision = "sqlite", await asyncio.to_thread(sqlite_revision, target)
    else:
        url = make_url(database_url)
        target = folder / PG_DUMP_FILE
        revision = await pg_revision(url)
        argv = [pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges"]
        await asyncio.to_thread(run_pg_tool, [*argv, f"--file={target}"], url)
        kind = "postgresql"
    _private_file(target)
    return {
        "kind": kind,
        "file": str(target.relative_to(out)),
        "bytes": target.stat().st_size,
        "alembic_revision": revision,
        "source": redacted(database_url),
    }


async def sqlite_is_empty(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return True

    def tables() -> int:
        connection = sqlite3.connect(path)
        try:
            return int(
                connection.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
            )
        finally:
            connection.close()

    return await asyncio.to_thread(tables) == 0


async def pg_prepare_target(url: URL) -> None:
    """Create the target database when it does not exist; refuse one that has tables."""
    name = url.database
    if not name:
        raise BackupError("the PostgreSQL database URL names no database")
    admin = await asyncpg.connect(asyncpg_dsn(url, "postgres"))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
            return
    finally:
        await admin.close()
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await connection.close()
    if tables:
        raise BackupError(
            f"database {name} is not empty ({tables} tables): restore only into an empty one"
        )


async def check_database_target(database_url: str) -> None:
    if is_sqlite(database_url):
        path = sqlite_path(database_url)
        if not await sqlite_is_empty(path):
            raise BackupError(f"{path} already holds a database: restore only into an empty one")
    else:
        await pg_prepare_target(make_url(database_url))


def check_database_kind(manifest: Manifest, database_url: str) -> str | None:
    """Refuse a backup of the other database kind; for PostgreSQL, the pg_restore to use.
    Called before anything is restored, so a refusal changes nothing."""
    kind = manifest.database["kind"]
    if is_sqlite(database_url) != (kind == "sqlite"):
        raise BackupError(
            f"the backup holds a {kind} database; PAYMENTS_DATABASE_URL names another kind "
            "(move between them with `payments replay --into`)"
        )
    return None if kind == "sqlite" else pg_tool("pg_restore")


async def restore_database(backup: Path, manifest: Manifest, database_url: str) -> None:
    source = inside(backup, manifest.database["file"])
    pg_restore = check_database_kind(manifest, database_url)
    if pg_restore is None:
        target = sqlite_path(database_url)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
            # An empty file or the WAL of a deleted database would be read as part of ours.
            leftover.unlink(missing_ok=True)
        # The backup API wrote every page into the one file: a byte copy is the database.
        await asyncio.to_thread(copy_durably, source, target)
    else:
        url = make_url(database_url)
        argv = [
            pg_restore,
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={url.database}",
            str(source),
        ]
        await asyncio.to_thread(run_pg_tool, argv, url)
    # A backup made by an older release is migrated forward, as `payments db upgrade` would.
    await asyncio.to_thread(upgrade, database_url)


# -- audit files --------------------------------------------------------------------------------


def audit_position(audit_dir: Path) -> int | None:
    try:
        return int(json.loads((audit_dir / AUDIT_POSITION_FILE).read_text())["stream_seq"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def complete_lines_up_to(source: Path, position: int | None) -> Iterator[bytes]:
    """The log's whole lines written for AUDIT messages up to `position`, read one at a time
    (a log may be larger than memory).

    The audit worker appends a line, then saves its position; a copy taken in between would hold
    a line the position does not cover, and the restored worker would write it again.
    """
    with open(source, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # a line being written while we copied
            if position is not None:
                try:
                    seq = json.loads(line).get("stream_seq")
                except (ValueError, AttributeError):
                    seq = None
                if isinstance(seq, int) and seq > position:
                    continue
            yield line


def backup_audit(audit_dir: Path, out: Path) -> list[str]:
    target_dir = out / AUDIT_DIR
    target_dir.mkdir(mode=PRIVATE_DIR_MODE)
    if not audit_dir.is_dir():
        return []
    # The position first: every line copied after it that it does not cover is dropped.
    position = audit_position(audit_dir)
    copied = []
    for source in _walk_files(audit_dir):
        relative = source.relative_to(audit_dir)
        target = target_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        if source.name == AUDIT_POSITION_FILE or source.suffix != ".log":
            shutil.copyfile(source, target)
        else:
            with open(target, "wb") as copy:
                copy.writelines(complete_lines_up_to(source, position))
        _private_file(target)
        copied.append(str(target.relative_to(out)))
    # Written last though read first: its value is the one the copied lines were cut at.
    if position is not None:
        (target_dir / AUDIT_POSITION_FILE).write_text(json.dumps({"stream_seq": position}))
    return copied


def audit_paths(backup: Path, relative: str, audit_dir: Path) -> tuple[Path, Path]:
    """Where a manifest's audit file is read from and written to, each refused unless it lies
    inside its folder (the backup's audit folder, the deployment's audit folder)."""
    parts = Path(relative).parts
    if not parts or parts[0] != AUDIT_DIR:
        raise BackupError(f"the manifest names {relative!r} as an audit file: not restoring it")
    inner = Path(*parts[1:])
    return inside(backup / AUDIT_DIR, inner), inside(audit_dir, inner)


def restore_audit(backup: Path, manifest: Manifest, audit_dir: Path) -> int:
    # Every path is checked before the first file is written.
    pairs = [audit_paths(backup, relative, audit_dir) for relative in manifest.audit_files]
    audit_dir.mkdir(parents=True, exist_ok=True)
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return len(pairs)


def audit_dir_is_empty(audit_dir: Path) -> bool:
    return not audit_dir.exists() or not any(_walk_files(audit_dir))


# -- NATS ---------------------------------------------------------------------------------------


@asynccontextmanager
async def nats_for(settings: Settings, allow_embedded: bool) -> Any:
    """The ops connection, and the settings to use. With no PAYMENTS_NATS_URL and
    `allow_embedded`, the embedded nats-server is started on its store for the duration."""
    server = None
    if allow_embedded and not settings.nats_url:
        from shared.stack import _overrides, start_embedded_nats

        try:
            server, extra_env = start_embedded_nats(settings)
        except (RuntimeError, TimeoutError, OSError) as error:
            raise BackupError(
                f"could not start the embedded nats-server ({error}): stop `make run` first"
            ) from None
        overrides = _overrides(extra_env)
        settings = settings.model_copy(
            update={
                "nats_url": overrides["nats_url"],
                "nats_ops_password": SecretStr(overrides["nats_ops_password"]),
            }
        )
    try:
        nc = await connect(settings, "ops", "payments-backup")
    except Exception as error:
        if server is not None:
            server.stop()
        raise BackupError(
            f"NATS at {settings.resolved_nats_url} is unreachable ({type(error).__name__})"
        ) from None
    try:
        yield nc, settings
    finally:
        await nc.close()
        if server is not None:
            server.stop()


# -- the two commands ---------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a backup or restore is, for the message of a failure."""

    step: str = "starting"
    changed: bool = False


def secrets_of(settings: Settings) -> list[str]:
    found: list[Any] = []
    for url in (settings.resolved_database_url, settings.nats_url):
        with suppress(Exception):  # an unparsable URL: nothing to find in it
            found.append(make_url(url).password if url else None)
    found += [
        password.get_secret_value() if password else None
        for password in (
            settings.nats_ops_password,
            settings.nats_worker_password,
            settings.nats_ingress_password,
        )
    ]
    return [str(value) for value in found if value]


def describe(error: BaseException, secrets: list[str]) -> str:
    """One line for `error`, with no secret in it."""
    text = " ".join(str(error).split())
    if not isinstance(error, BackupError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def prepare_out(out: Path) -> None:
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BackupError(f"{out} exists and is not an empty folder")
        out.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        os.chmod(out, PRIVATE_DIR_MODE)
    except OSError as error:
        raise BackupError(f"cannot create {out} ({describe(error, [])})") from None


async def backup(settings: Settings, out: Path) -> Manifest:
    """Write a backup to `out` (new or empty). Any failure is one BackupError saying which step
    failed and that `out` is incomplete."""
    prepare_out(out)
    progress = Progress(step="connecting to NATS")
    try:
        return await _backup(settings, out, progress)
    except CAUGHT as error:
        raise BackupFailed(
            f"{progress.step} failed ({describe(error, secrets_of(settings))}); {out} is "
            "incomplete: remove it before retrying"
        ) from None


async def _backup(settings: Settings, out: Path, progress: Progress) -> Manifest:
    async with nats_for(settings, allow_embedded=False) as (nc, settings):
        progress.step = "copying the database"
        database = await backup_database(settings.resolved_database_url, out)
        progress.step = "copying the audit files"
        audit_files = await asyncio.to_thread(backup_audit, settings.resolved_audit_dir, out)
        progress.step = "listing the streams"
        js = nc.jetstream()
        present = {info.config.name for info in await js.streams_info()}
        streams = []
        for spec in ALL_STREAMS:
            if spec.name not in present:
                continue  # never provisioned: nothing to keep
            progress.step = f"taking the snapshot of stream {spec.name}"
            snapshot = await snapshot_stream(nc, spec.name, out / STREAMS_DIR / spec.name)
            streams.append(
                {
                    "name": snapshot.name,
                    "folder": f"{STREAMS_DIR}/{spec.name}",
                    "messages": snapshot.messages,
                    "bytes": snapshot.bytes,
                    "first_seq": snapshot.first_seq,
                    "last_seq": snapshot.last_seq,
                }
            )
    progress.step = "writing the manifest"
    for path in _walk_files(out):
        _private_file(path)
    for folder in out.rglob("*"):
        if folder.is_dir():
            os.chmod(folder, PRIVATE_DIR_MODE)
    manifest = Manifest(
        created_at=datetime.now(UTC).isoformat(),
        database=database,
        streams=streams,
        audit_files=audit_files,
        files={
            str(path.relative_to(out)): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
            for path in _walk_files(out)
        },
    )
    manifest_path = out / MANIFEST
    manifest_path.write_text(manifest.to_json())
    _private_file(manifest_path)
    return manifest


def verify(backup_dir: Path, manifest: Manifest) -> None:
    for relative, expected in manifest.files.items():
        path = inside(backup_dir, relative)
        if not path.is_file():
            raise BackupError(f"{relative} is missing from the backup")
        if sha256_of(path) != expected["sha256"]:
            raise BackupError(f"{relative} does not match its checksum: the backup is damaged")


def check_manifest_paths(backup_dir: Path, manifest: Manifest, audit_dir: Path) -> None:
    """Every path the manifest names lies inside its folder (see `inside`)."""
    inside(backup_dir, manifest.database["file"])
    for stream in manifest.streams:
        inside(backup_dir, stream["folder"])
    for relative in manifest.audit_files:
        audit_paths(backup_dir, relative, audit_dir)


async def restore(settings: Settings, backup_dir: Path) -> list[str]:
    """Put a backup back; refuses (changing nothing) unless every target is empty. Any failure
    is one BackupError saying which step failed and, past the checks, what to clean up."""
    progress = Progress(step="checking the backup")
    try:
        return await _restore(settings, backup_dir, progress)
    except CAUGHT as error:
        text = describe(error, secrets_of(settings))
        if not progress.changed and isinstance(error, BackupError):
            raise BackupError(text) from None  # a refusal: it says what to do
        if not progress.changed:
            raise BackupFailed(f"{progress.step} failed ({text}); nothing was changed") from None
        raise BackupFailed(
            f"{progress.step} failed ({text}); the restore stopped part way: empty the streams, "
            "the database and the audit folder before retrying"
        ) from None


async def _restore(settings: Settings, backup_dir: Path, progress: Progress) -> list[str]:
    manifest = Manifest.load(backup_dir)
    await asyncio.to_thread(verify, backup_dir, manifest)
    check_manifest_paths(backup_dir, manifest, settings.resolved_audit_dir)
    # Before any stream is touched: a backup of the other kind, or no pg_restore, is refused.
    check_database_kind(manifest, settings.resolved_database_url)
    done: list[str] = []
    progress.step = "connecting to NATS"
    async with nats_for(settings, allow_embedded=True) as (nc, settings):
        progress.step = "checking the targets are empty"
        js = nc.jetstream()
        existing = {info.config.name: info for info in await js.streams_info()}
        in_the_way = [
            name
            for name in (s["name"] for s in manifest.streams)
            if name in existing and existing[name].state.messages > 0
        ]
        if in_the_way:
            raise BackupError(
                f"streams already hold messages: {', '.join(in_the_way)}; restore only into "
                "a NATS server without them"
            )
        if not audit_dir_is_empty(settings.resolved_audit_dir):
            raise BackupError(f"{settings.resolved_audit_dir} is not empty")
        await check_database_target(settings.resolved_database_url)

        for stream in manifest.streams:
            name = stream["name"]
            progress.step, progress.changed = f"restoring stream {name}", True
            if name in existing:
                # Empty (checked above): made by provisioning or a stack started before the
                # restore. Its consumers go with it and are provisioned again below.
                await js.delete_stream(name)
            folder = inside(backup_dir, stream["folder"])
            state = await restore_stream(nc, folder, settings.stream_replicas)
            expected = read_metadata(folder)["state"]
            if int(state.get("last_seq", -1)) != int(expected.get("last_seq", -2)):
                raise BackupError(f"stream {name} restored to sequence {state.get('last_seq')}")
            done.append(f"stream {name}: {state.get('messages', 0)} messages restored")

        from shared.provisioning import provision

        progress.step, progress.changed = "provisioning the consumers", True
        # Fresh consumers deliver every stream from its first message; see the module's doc.
        results = await provision(js, settings.stream_replicas, update=True)
        created = sum(1 for r in results if r.kind == "consumer" and r.action == "created")
        done.append(
            f"consumers: {created} provisioned, each starting at its stream's first message"
        )
        done += [
            r.line()
            for r in results
            if r.action != "ok" and not (r.kind == "consumer" and r.action == "created")
        ]

    progress.step, progress.changed = "restoring the database", True
    await restore_database(backup_dir, manifest, settings.resolved_database_url)
    done.append(
        f"database: {manifest.database['kind']} restored into "
        f"{redacted(settings.resolved_database_url)} and migrated to the newest schema"
    )
    progress.step = "restoring the audit files"
    count = await asyncio.to_thread(
        restore_audit, backup_dir, manifest, settings.resolved_audit_dir
    )
    done.append(f"audit files: {count} restored into {settings.resolved_audit_dir}")
    return done
