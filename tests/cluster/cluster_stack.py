"""The scaled-out deployment of docker-compose.yml, played on loopback without Docker.

`NatsCluster` runs three nats-server processes from the pinned wheel with nats-cluster.conf,
each with its own ports and store, routed to each other. `cluster_stack` adds what compose
runs: a fresh PostgreSQL database, the compose `provision` job's commands (`payments nats
provision` with PAYMENTS_STREAM_REPLICAS=3, then `payments db upgrade`), several copies of every
worker role and several api processes, all given the three nodes' URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.streams import ALL_CONSUMERS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Orchestrator
from shared.embedded_nats import (
    NATS_CLUSTER_CONF,
    EmbeddedNats,
    NatsPasswords,
    free_port,
    free_ports,
    new_password,
)
from shared.nats_client import connect
from shared.settings import build_settings
from tests.conftest import POSTGRES_URL_ENV
from tests.e2e import run_cli
from tests.harness import ADMIN_TOKEN, Process, wait_for, worker_process
from workers.roles import ROLES

T = TypeVar("T")
CLUSTER_SIZE = 3
# Quorum of a 3-node raft group: one node may be down and R3 streams still take writes.
QUORUM = CLUSTER_SIZE // 2 + 1
CLUSTER_FORM_TIMEOUT_S = 30.0
NODE_RESTART_TIMEOUT_S = 30.0
PROVISION_TIMEOUT_S = 90.0
HTTP_PROBE_TIMEOUT_S = 2.0
WORKER_START_NEEDLE = "worker started"
# Sixteen Python processes start at once on two cores: each needs a few CPU seconds to import.
PROCESS_START_TIMEOUT_S = 90.0


def route_url(password: str, port: int) -> str:
    return f"nats-route://route:{password}@127.0.0.1:{port}"


def _http_status(url: str) -> int:
    """The status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _http_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as answer:
            found: dict[str, Any] = json.loads(answer.read())
            return found
    except (OSError, ValueError):
        return {}


@dataclass
class NatsCluster:
    """Three nodes on loopback; each is an EmbeddedNats running nats-cluster.conf."""

    nodes: list[EmbeddedNats]
    passwords: NatsPasswords

    @classmethod
    def create(cls, root: Path, size: int = CLUSTER_SIZE) -> NatsCluster:
        passwords = NatsPasswords()
        route_password = new_password()
        # Every port of every node at once, so none is handed out twice.
        ports = free_ports(3 * size)
        cluster_ports = ports[:size]
        routes = {
            f"PAYMENTS_NATS_ROUTE_{index + 1}": route_url(route_password, port)
            for index, port in enumerate(cluster_ports)
        }
        nodes = []
        for index, cluster_port in enumerate(cluster_ports):
            name = f"nats-{index + 1}"
            nodes.append(
                EmbeddedNats(
                    store_dir=root / name / "store",
                    port=ports[size + index],
                    monitor_port=ports[2 * size + index],
                    passwords=passwords,
                    server_name=name,
                    log_file=root / f"{name}.log",
                    config=NATS_CLUSTER_CONF,
                    extra_env={
                        "PAYMENTS_NATS_CLUSTER_PORT": str(cluster_port),
                        "PAYMENTS_NATS_ROUTE_PASSWORD": route_password,
                        **routes,
                    },
                )
            )
        root.mkdir(parents=True, exist_ok=True)
        return cls(nodes, passwords)

    @property
    def urls(self) -> str:
        """PAYMENTS_NATS_URL for every client: all nodes, so a client survives losing one."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> EmbeddedNats:
        return next(node for node in self.nodes if node.server_name == name)

    def running(self) -> list[EmbeddedNats]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_formed()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def meta_leader(self, node: EmbeddedNats) -> str | None:
        meta = _http_json(f"http://127.0.0.1:{node.monitor_port}/jsz").get("meta_cluster") or {}
        leader = meta.get("leader")
        return str(leader) if leader else None

    def healthy(self, node: EmbeddedNats) -> bool:
        """The monitoring port's full health check: JetStream current with the meta leader and
        every stream and consumer replica it holds (what compose's healthcheck asks)."""
        return _http_status(f"http://127.0.0.1:{node.monitor_port}/healthz") == 200

    def wait_formed(self, timeout_s: float = CLUSTER_FORM_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.meta_leader(n) and self.healthy(n) for n in self.nodes):
                return
            time.sleep(0.1)
        raise AssertionError(f"the cluster did not form within {timeout_s}s:\n{self.logs()}")

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown, no flush; what survives is what was fsynced."""
        self.node(name).kill()

    def restart(self, name: str, timeout_s: float = NODE_RESTART_TIMEOUT_S) -> float:
        """Start a killed node on its old ports and store; return seconds until it is current."""
        node = self.node(name)
        started = time.monotonic()
        node.start()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.healthy(node):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{name} did not catch up within {timeout_s}s:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for node in self.nodes:
            text = node.log_file.read_text(errors="replace") if node.log_file else ""
            parts.append(f"--- {node.server_name}\n{text[-2000:]}")
        return "\n".join(parts)


def server_variables(node: EmbeddedNats) -> dict[str, Any]:
    """The node's /varz: its effective configuration, JetStream's included."""
    return _http_json(f"http://127.0.0.1:{node.monitor_port}/varz")


async def stream_leader(js: JetStreamContext, stream: str, timeout_s: float = 20.0) -> str:
    """The server that leads `stream`'s raft group, once it has one."""

    async def probe() -> str | None:
        try:
            info = await js.stream_info(stream)
        except Exception:  # asked while a node is down or a leader is elected: ask again
            return None
        return info.cluster.leader if info.cluster else None

    leader = await wait_for(probe, timeout_s=timeout_s, interval_s=0.1)
    assert leader is not None
    return leader


def restart_count(process: Process) -> int:
    return process.log_text().count(WORKER_START_NEEDLE)


def restart_worker(process: Process, timeout_s: float = PROCESS_START_TIMEOUT_S) -> None:
    """Start a killed worker copy again and wait for its new 'worker started' line (the log
    file is appended to, so the first start's line is already there)."""
    before = restart_count(process)
    process.start(**process.extra_env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if restart_count(process) > before:
            return
        if not process.running():
            raise AssertionError(f"{process.name} exited:\n{process.log_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{process.name} did not start again:\n{process.log_text()[-3000:]}")


@dataclass
class ClusterStack:
    tmp: Path
    cluster: NatsCluster
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    workers: dict[str, list[Process]] = field(default_factory=dict)
    apis: list[tuple[Process, str]] = field(default_factory=list)

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    @property
    def bases(self) -> list[str]:
        return [base for _, base in self.apis]

    def processes(self) -> list[Process]:
        workers = [p for copies in self.workers.values() for p in copies]
        return [*workers, *(p for p, _ in self.apis)]

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.log_text()[-1500:]}" for p in self.processes()]
        return "\n".join(parts) + "\n" + self.cluster.logs()

    async def until(self, probe: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        try:
            return await wait_for(probe, timeout_s=timeout_s, interval_s=0.25)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None


def postgres_admin_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        # The cluster deployment runs on PostgreSQL; this test never quietly skips it.
        pytest.fail(f"the cluster test needs {POSTGRES_URL_ENV} (a PostgreSQL server to use)")
    return url


async def empty_postgres_database(admin_url: str) -> tuple[str, Callable[[], Awaitable[None]]]:
    """A new, unmigrated database on the test server (the compose job migrates it); its URL and
    a function that drops it."""
    parsed = make_url(admin_url)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"payments_cluster_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()

    async def drop() -> None:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    return parsed.set(database=name).render_as_string(hide_password=False), drop


def _base_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PAYMENTS_")}


async def shorten_ack_wait(js: JetStreamContext, ack_wait_s: float) -> None:
    """Redeliver a killed worker's unacked messages after `ack_wait_s` instead of the production
    10-30 s, so the test settles in seconds (a test setting; the deployment keeps its own)."""
    for spec in ALL_CONSUMERS:
        config = (await js.consumer_info(spec.stream, spec.durable)).config
        config.ack_wait = ack_wait_s
        await js.add_consumer(spec.stream, config)


@contextlib.asynccontextmanager
async def cluster_stack(
    tmp: Path,
    orchestrators: list[dict[str, str]],
    *,
    worker_copies: int,
    api_copies: int,
    ack_wait_s: float,
    roles: tuple[str, ...] = ROLES,
    **env_extra: str,
) -> AsyncIterator[ClusterStack]:
    admin_url = postgres_admin_url()
    async with contextlib.AsyncExitStack() as cleanup:
        tmp.mkdir(parents=True, exist_ok=True)
        cluster = NatsCluster.create(tmp / "nats")
        cleanup.callback(cluster.stop)
        await asyncio.to_thread(cluster.start)
        database_url, drop = await empty_postgres_database(admin_url)
        cleanup.push_async_callback(drop)
        env = {
            **_base_env(),
            "PAYMENTS_NATS_URL": cluster.urls,
            "PAYMENTS_DATABASE_URL": database_url,
            "PAYMENTS_DATA_DIR": str(tmp / "data"),
            "PAYMENTS_API_ADMIN_TOKEN": ADMIN_TOKEN,
            "PAYMENTS_LOG_LEVEL": "INFO",
            "PAYMENTS_STREAM_REPLICAS": str(CLUSTER_SIZE),
            "PAYMENTS_BOOTSTRAP_ORCHESTRATORS": json.dumps(orchestrators),
            "PAYMENTS_BOOTSTRAP_SKIP_RANK_VALIDATION": "true",
            **cluster.passwords.env(),
            **env_extra,
        }
        # docker-compose.yml's one-shot `provision` job, as it runs it.
        for command in (("nats", "provision"), ("db", "upgrade")):
            result = await run_cli(env, *command, timeout_s=PROVISION_TIMEOUT_S)
            assert result.code == 0, (command, result, cluster.logs())
        ops_settings = build_settings(
            nats_url=cluster.urls, nats_ops_password=cluster.passwords.ops
        )
        ops = await connect(ops_settings, "ops", "test-cluster-ops")
        cleanup.push_async_callback(ops.close)
        await shorten_ack_wait(ops.jetstream(), ack_wait_s)
        engine = make_engine(database_url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        stack = ClusterStack(tmp, cluster, env, engine, make_sessionmaker(engine), ops)

        # Apis and workers stop (and drain) before NATS and the database go.
        cleanup.callback(lambda: stop_processes(stack.processes()))
        for role in roles:
            stack.workers[role] = [
                worker_process(role, env, tmp, copy).start() for copy in range(worker_copies)
            ]
        starting = [
            asyncio.to_thread(p.wait_log, WORKER_START_NEEDLE, PROCESS_START_TIMEOUT_S)
            for copies in stack.workers.values()
            for p in copies
        ]
        api_starts = [asyncio.to_thread(start_api_process, env, tmp) for _ in range(api_copies)]
        _, apis = await asyncio.gather(asyncio.gather(*starting), asyncio.gather(*api_starts))
        stack.apis = list(apis)
        wanted = {o["orchestrator_id"] for o in orchestrators}

        async def registered() -> bool:
            async with stack.sessions() as db:
                found = set((await db.execute(select(Orchestrator.orchestrator_id))).scalars())
            return wanted <= found

        await stack.until(registered, 30.0)
        yield stack


def start_api_process(
    env: dict[str, str], log_dir: Path, timeout_s: float = PROCESS_START_TIMEOUT_S
) -> tuple[Process, str]:
    """An api process on a free port, once its /healthz answers."""
    port = free_port()
    api = Process(
        name=f"api-{port}",
        argv=[sys.executable, "-m", "api.app"],
        env={**env, "PAYMENTS_API_PORT": str(port), "PAYMENTS_API_HOST": "127.0.0.1"},
        log_path=log_dir / f"api-{port}.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _http_status(f"{base}/healthz"):
            return api, base
        if not api.running():
            raise AssertionError(f"api exited early:\n{api.log_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"api did not start within {timeout_s}s:\n{api.log_text()[-3000:]}")


def stop_processes(processes: list[Process], timeout_s: float = 30.0) -> None:
    """SIGTERM all at once (each drains in parallel), then wait; SIGKILL what is left."""
    running = [p for p in processes if p.running()]
    for process in running:
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        assert process.process is not None
        try:
            process.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
