"""The real recording-jobs stack for end-to-end tests, and the fake orchestrator host it drives.

`jobs_stack` starts a provisioned nats-server (the jobs consumers' ack_wait shortened, so a
killed worker's job moves within seconds), a fresh database, an S3 server (moto in server mode,
with the recordings bucket), the registry, sessions, ledger and jobs workers and the api, all as
separate processes, plus `FakeHost`: three aiohttp servers on loopback playing the orchestrator
host's power, runner and recorder services. The fake recorder really PUTs its recording through
the presigned URL it is given. Probes read rows (jobs, leases, ledger), streams and the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.streams import (
    JOBS_DRIVER_CONSUMER,
    JOBS_PROJECTION_CONSUMER,
    LEDGER_WORKLOADS_CONSUMER,
    WORKLOADS,
)
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import ActivityLease, LedgerEntry, Orchestrator, RecordingJob, Workload
from shared.embedded_nats import EmbeddedNats, free_port
from shared.nats_client import connect
from shared.provisioning import provision
from shared.settings import build_settings
from tests.harness import (
    ADMIN_TOKEN,
    Database,
    Process,
    create_database,
    stack_env,
    start_api,
    start_nats,
    wait_for,
    worker_process,
)
from tests.licensing_stack import AWS_REGION, Moto, address, aws_env

T = TypeVar("T")
ADMIN = {"Content-Type": "application/json", "X-Admin-Token": ADMIN_TOKEN}
BUCKET = "recordings-test"
PREFIX = "recordings"
# The fake host listens here; an orchestrator on UNREACHABLE_HOST gets connection refused.
HOST = "127.0.0.1"
UNREACHABLE_HOST = "127.0.0.2"
# A killed jobs worker's message is redelivered after this (production: 30 s).
TEST_ACK_WAIT_S = 3.0
WORKERS = ("registry", "sessions", "ledger", "jobs")
# Small waits and retries, so failure paths end in well under a second.
FAST_JOB_SETTINGS = {
    "PAYMENTS_JOB_HTTP_TIMEOUT_SECONDS": "3",
    "PAYMENTS_JOB_READY_ATTEMPTS": "3",
    "PAYMENTS_JOB_READY_INTERVAL_SECONDS": "0.05",
    "PAYMENTS_JOB_POLL_INTERVAL_SECONDS": "0.1",
    "PAYMENTS_JOB_UPLOAD_ATTEMPTS": "3",
    "PAYMENTS_JOB_UPLOAD_INTERVAL_SECONDS": "0.1",
}


def orchestrator(orchestrator_id: str, host: str | None = HOST) -> dict[str, str]:
    entry = {"orchestrator_id": orchestrator_id, "address": address(orchestrator_id)}
    if host is not None:
        entry["host_public_ip"] = host
    return entry


# -- the fake orchestrator host -------------------------------------------------------------


def recording_bytes(file_name: str) -> bytes:
    """What the fake recorder "recorded" into `file_name`: distinct per file, ~64 KiB."""
    return (f"webm frames of {file_name};".encode() * 4096)[: 64 * 1024]


@dataclass
class FakeHost:
    """The host's power (9090), runner (9877) and recorder (8889) services, on free ports."""

    power_port: int = field(default_factory=free_port)
    runner_port: int = field(default_factory=free_port)
    recorder_port: int = field(default_factory=free_port)
    # Knobs a test sets before starting a job.
    recorder_start_fails: bool = False
    script_result: str = "completed"
    # The sha256 the recorder reports after an upload, instead of the real one.
    reported_sha256: str | None = None
    # A script reports "running" until this is set.
    script_release: asyncio.Event = field(default_factory=asyncio.Event)
    # What the services were asked.
    wakes: list[dict[str, Any]] = field(default_factory=list)
    executes: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    stops: int = 0
    status_polls: int = 0
    uploads: list[dict[str, Any]] = field(default_factory=list)
    scripts: set[str] = field(default_factory=set)
    # Every call, "<monotonic> <port> <method> <path> <status>", for a failing test's message.
    log_path: Path | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None

    def reset(self) -> None:
        self.recorder_start_fails = False
        self.script_result = "completed"
        self.reported_sha256 = None
        self.script_release.set()
        self.wakes.clear()
        self.executes.clear()
        self.starts.clear()
        self.uploads.clear()
        self.stops = 0
        self.status_polls = 0

    @property
    def env(self) -> dict[str, str]:
        return {
            "PAYMENTS_JOB_POWER_PORT": str(self.power_port),
            "PAYMENTS_JOB_RUNNER_PORT": str(self.runner_port),
            "PAYMENTS_JOB_RECORDER_PORT": str(self.recorder_port),
        }

    @web.middleware
    async def _log_calls(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        response: web.StreamResponse = await handler(request)
        if self.log_path is not None:
            with self.log_path.open("a") as log:
                line = f"{started:.3f} +{time.monotonic() - started:.3f}s {request.host} "
                log.write(f"{line}{request.method} {request.path} {response.status}\n")
        return response

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.script_release.set()
        power = web.Application(middlewares=[self._log_calls])
        power.router.add_post("/power", self.power)
        runner = web.Application(middlewares=[self._log_calls])
        runner.router.add_get("/health", self.ok)
        runner.router.add_post("/scripts/execute", self.execute)
        runner.router.add_get("/scripts/{session_id}", self.script_status)
        recorder = web.Application(middlewares=[self._log_calls])
        recorder.router.add_get("/", self.ok)
        recorder.router.add_post("/recordings/start", self.start_recording)
        recorder.router.add_post("/recordings/stop", self.stop_recording)
        recorder.router.add_post("/recordings/{file}/upload", self.upload)
        for app, port in (
            (power, self.power_port),
            (runner, self.runner_port),
            (recorder, self.recorder_port),
        ):
            app_runner = web.AppRunner(app, access_log=None)
            await app_runner.setup()
            await web.TCPSite(app_runner, HOST, port).start()
            self._runners.append(app_runner)

    async def stop(self) -> None:
        for app_runner in self._runners:
            await app_runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def power(self, request: web.Request) -> web.Response:
        self.wakes.append(await request.json())
        return web.json_response({"ok": True, "state": "awake"})

    async def execute(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.executes.append(body)
        self.scripts.add(body["session_id"])
        return web.json_response({"ok": True, "session_id": body["session_id"]})

    async def script_status(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        self.status_polls += 1
        if session_id not in self.scripts:
            return web.json_response({"detail": "unknown session"}, status=404)
        status = self.script_result if self.script_release.is_set() else "running"
        return web.json_response({"session_id": session_id, "status": status})

    async def start_recording(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.starts.append(body)
        if self.recorder_start_fails:
            return web.json_response({"detail": "no capture device"}, status=500)
        return web.json_response({"ok": True, "output": f"{body['label']}.webm"})

    async def stop_recording(self, request: web.Request) -> web.Response:
        self.stops += 1
        return web.json_response({"ok": True})

    async def upload(self, request: web.Request) -> web.Response:
        """PUT the recording through the presigned URL, as the real recorder does."""
        assert self._http is not None
        body = await request.json()
        file_name = request.match_info["file"]
        data = recording_bytes(file_name)
        self.uploads.append({"file": file_name, **body})
        try:
            async with self._http.put(body["upload_url"], data=data) as answer:
                if answer.status >= 300:
                    return web.json_response(
                        {"detail": f"PUT answered {answer.status}"}, status=502
                    )
        except aiohttp.ClientError as error:
            return web.json_response(
                {"detail": f"PUT to the upload URL failed: {type(error).__name__}"}, status=502
            )
        digest = self.reported_sha256 or hashlib.sha256(data).hexdigest()
        return web.json_response({"sha256": digest, "size": len(data)})


# -- the stack ------------------------------------------------------------------------------


@dataclass
class JobsStack:
    tmp: Path
    nats: EmbeddedNats
    database: Database
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    http: aiohttp.ClientSession
    moto: Moto
    host: FakeHost
    workers: dict[str, Process] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    base: str = ""

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    def logs(self) -> str:
        logs = [f"--- {p.name}\n{p.log_text()[-3000:]}" for p in self.processes]
        return "\n".join([*logs, f"--- fake host\n{self.host.log_text()[-3000:]}"])

    async def until(self, probe: Callable[[], Awaitable[T]], timeout_s: float = 20.0) -> T:
        """tests.harness.wait_for, with the processes' logs in the failure message."""
        try:
            return await wait_for(probe, timeout_s=timeout_s, interval_s=0.05)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None

    async def start_worker(self, role: str) -> Process:
        worker = worker_process(role, self.env, self.tmp, len(self.processes))
        worker.start()
        self.processes.append(worker)
        await asyncio.to_thread(worker.wait_log, "worker started")
        self.workers[role] = worker
        return worker

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": ADMIN if headers is None else headers}
        if body is not None:
            kwargs["data"] = body if isinstance(body, str | bytes) else json.dumps(body)
        async with self.http.request(method, f"{self.base}{path}", **kwargs) as answer:
            text = await answer.text()
        try:
            return answer.status, json.loads(text)
        except ValueError:
            return answer.status, text

    async def job(self, job_id: str) -> RecordingJob | None:
        async with self.sessions() as db:
            return await db.get(RecordingJob, job_id)

    async def ended(self, job_id: str, timeout_s: float = 20.0) -> RecordingJob:
        async def done() -> RecordingJob | None:
            job = await self.job(job_id)
            return job if job is not None and job.state not in ("pending", "running") else None

        return await self.until(done, timeout_s)

    async def lease(self, job_id: str) -> ActivityLease | None:
        async with self.sessions() as db:
            return await db.get(ActivityLease, f"job:{job_id}")

    async def ledger(self, orchestrator_id: str) -> list[LedgerEntry]:
        async with self.sessions() as db:
            query = select(LedgerEntry).where(LedgerEntry.orchestrator_id == orchestrator_id)  # type: ignore[arg-type]
            return list((await db.execute(query)).scalars())

    async def workload(self, workload_id: str) -> Workload | None:
        async with self.sessions() as db:
            return await db.get(Workload, workload_id)

    async def ledger_drained(self) -> None:
        """Until the ledger worker has settled every WORKLOADS message stored so far: a second
        credit, if one were coming, would be in the ledger then."""

        async def drained() -> bool:
            info = await self.js.consumer_info(WORKLOADS.name, LEDGER_WORKLOADS_CONSUMER.durable)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await self.until(drained)

    async def jobs_messages(self, subject: str = "jobs.>") -> int:
        info = await self.js.stream_info(WORKLOADS.name, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())


async def shorten_ack_wait(js: JetStreamContext) -> None:
    for spec in (JOBS_DRIVER_CONSUMER, JOBS_PROJECTION_CONSUMER):
        config = (await js.consumer_info(spec.stream, spec.durable)).config
        config.ack_wait = TEST_ACK_WAIT_S
        await js.add_consumer(spec.stream, config)


@contextlib.asynccontextmanager
async def jobs_stack(
    backend: str, tmp: Path, orchestrators: list[dict[str, str]]
) -> AsyncIterator[JobsStack]:
    async with contextlib.AsyncExitStack() as cleanup:
        tmp.mkdir(parents=True, exist_ok=True)
        nats = start_nats(tmp / "nats")
        cleanup.callback(nats.stop)
        ops_settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
        ops = await connect(ops_settings, "ops", "test-ops")
        cleanup.push_async_callback(ops.close)
        await provision(ops.jetstream(), replicas=1)
        await shorten_ack_wait(ops.jetstream())
        database = await create_database(backend, tmp)
        if database.drop is not None:
            cleanup.push_async_callback(database.drop)
        moto = Moto(tmp)
        cleanup.callback(moto.process.terminate)
        moto_started = asyncio.create_task(asyncio.to_thread(moto.start))
        host = FakeHost(log_path=tmp / "fake-host.log")
        await host.start()
        cleanup.push_async_callback(host.stop)
        env = stack_env(
            nats,
            database,
            tmp / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=json.dumps(orchestrators),
            PAYMENTS_RECORDINGS_BUCKET=BUCKET,
            PAYMENTS_RECORDINGS_PREFIX=PREFIX,
            PAYMENTS_RECORDINGS_REGION=AWS_REGION,
            PAYMENTS_S3_ENDPOINT_URL=moto.endpoint,
            PAYMENTS_S3_ADDRESSING_STYLE="path",
            **aws_env(),
            **host.env,
            **FAST_JOB_SETTINGS,
        )
        engine = make_engine(database.url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        cleanup.push_async_callback(http.close)
        stack = JobsStack(
            tmp, nats, database, env, engine, make_sessionmaker(engine), ops, http, moto, host
        )

        async def stop_all() -> None:
            running = [p for p in stack.processes if p.running()]
            await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in running))

        cleanup.push_async_callback(stop_all)
        api_started = asyncio.to_thread(start_api, env, tmp)
        results = await asyncio.gather(
            moto_started, api_started, *(stack.start_worker(role) for role in WORKERS)
        )
        api, stack.base = results[1]
        stack.processes.append(api)
        moto.client().create_bucket(Bucket=BUCKET)
        wanted = {o["orchestrator_id"] for o in orchestrators}

        async def registered() -> bool:
            async with stack.sessions() as db:
                ids = set((await db.execute(select(Orchestrator.orchestrator_id))).scalars())
            return wanted <= ids

        await stack.until(registered, 30.0)
        yield stack
