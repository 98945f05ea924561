"""Real parts for tests: nats-server from the pinned wheel, fresh SQLite/PostgreSQL databases,
the api and workers as separate processes (so they can be killed), and polling helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from shared.db.migrate import upgrade
from shared.embedded_nats import EmbeddedNats, NatsPasswords, free_port, free_ports

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"
PROCESS_READY_TIMEOUT_S = 30.0


async def wait_for(
    probe: Callable[[], Awaitable[T]], timeout_s: float = 10.0, interval_s: float = 0.05
) -> T:
    """Poll `probe` until it returns something truthy; fail with the last value after timeout."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s; last value: {last!r}")


def start_nats(tmp: Path, passwords: NatsPasswords | None = None) -> EmbeddedNats:
    client_port, monitor_port = free_ports(2)
    server = EmbeddedNats(
        store_dir=tmp / "jetstream",
        port=client_port,
        monitor_port=monitor_port,
        passwords=passwords or NatsPasswords(),
        log_file=tmp / "nats-server.log",
    )
    server.start()
    return server


@dataclass
class Database:
    url: str
    backend: str
    drop: Callable[[], Awaitable[None]] | None = None


async def create_database(backend: str, tmp: Path) -> Database:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'payments.db'}"
        await asyncio.to_thread(upgrade, url)
        return Database(url, backend)
    admin_url = os.environ["PAYMENTS_TEST_POSTGRES_URL"]
    name = f"payments_test_{uuid.uuid4().hex[:12]}"
    parsed = make_url(admin_url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    url = parsed.set(database=name).render_as_string(hide_password=False)
    await asyncio.to_thread(upgrade, url)

    async def drop() -> None:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return Database(url, backend, drop)


def stack_env(
    nats: EmbeddedNats, database: Database, data_dir: Path, **extra: str
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAYMENTS_")}
    env.update(
        {
            "PAYMENTS_NATS_URL": nats.url,
            "PAYMENTS_DATABASE_URL": database.url,
            "PAYMENTS_DATA_DIR": str(data_dir),
            "PAYMENTS_API_ADMIN_TOKEN": ADMIN_TOKEN,
            "PAYMENTS_LOG_LEVEL": "INFO",
            **nats.passwords.env(),
        }
    )
    env.update(extra)
    return env


@dataclass
class Process:
    """A child process of the stack: the api or one worker copy."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, **extra_env: str) -> Process:
        self.extra_env = extra_env
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv, env={**self.env, **extra_env}, stdout=log, stderr=log, cwd=PROJECT_ROOT
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout_s: float = PROCESS_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never logged {needle!r}:\n{self.log_text()[-3000:]}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        if not self.running():
            return self.process.returncode if self.process else None
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def worker_process(role: str, env: dict[str, str], log_dir: Path, copy: int = 0) -> Process:
    faststream = str(Path(sys.executable).parent / "faststream")
    return Process(
        name=f"{role}-{copy}",
        argv=[faststream, "run", f"workers.{role}:app"],
        env=env,
        log_path=log_dir / f"{role}-{copy}.log",
    )


def start_worker(
    role: str, env: dict[str, str], log_dir: Path, copy: int = 0, **extra: str
) -> Process:
    worker = worker_process(role, env, log_dir, copy).start(**extra)
    worker.wait_log("worker started")
    return worker


def start_api(
    env: dict[str, str], log_dir: Path, port: int | None = None, **extra: str
) -> tuple[Process, str]:
    """Start an api process on `port` (a free one by default) and wait until it serves.

    Several api processes may share a port (PAYMENTS_API_REUSE_PORT): then the first one
    answers /healthz before a later one listens, so readiness is also this process's own
    listening socket. Each process logs to its own file.
    """
    port = port or free_port()
    api = Process(
        name="api",
        argv=[sys.executable, "-m", "api.app"],
        env={**env, "PAYMENTS_API_PORT": str(port), "PAYMENTS_API_HOST": "127.0.0.1"},
        log_path=unused_path(log_dir / f"api-{port}.log"),
    ).start(**extra)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not api.running():
            raise AssertionError(f"api exited early:\n{api.log_text()[-3000:]}")
        if api.process is not None and listening_on(api.process.pid, port):
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    return api, base
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError("api did not start")


def unused_path(path: Path) -> Path:
    """`path`, or `name-2.ext`, `name-3.ext`, ... when it exists already."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


# /proc/net/tcp's state code for a listening socket.
TCP_LISTEN = "0A"


def listening_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (read from /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == TCP_LISTEN and fields[9] in inodes:
                    return True
    return False


def headers(admin: bool = True, **extra: str) -> dict[str, Any]:
    found: dict[str, Any] = {"Content-Type": "application/json"}
    if admin:
        found["X-Admin-Token"] = ADMIN_TOKEN
    found.update(extra)
    return found
