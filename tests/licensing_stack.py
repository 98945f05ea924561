"""The real image-licensing stack for end-to-end tests, a record of every secret it handed out,
and the scans that prove none of them leaked.

`licensing_stack` starts a provisioned nats-server, a fresh database, an S3 server (moto in
server mode, on its own loopback port), the registry, licensing and audit workers and the api,
all as separate processes, and waits until the bootstrapped orchestrators are registered.

Every helper that creates or receives a secret (an image secret, an orchestrator token, an
invite code) records it in the stack's `Vault`. The scans then read everything the stack
wrote: every message of every stream (as the ops user), every process log, every file under
the data folder (the audit JSONL logs), the JetStream store on disk, and every row of every
table (and, for SQLite, the raw database files), and report any recorded secret they find.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pyrage
from botocore.config import Config as BotoConfig
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.streams import AUDIT
from shared.db.engine import make_engine, make_sessionmaker
from shared.embedded_nats import EmbeddedNats, free_port
from shared.nats_client import connect
from shared.provisioning import provision
from shared.secrets_box import normalize_invite
from shared.settings import build_settings
from tests.harness import (
    ADMIN_TOKEN,
    PROJECT_ROOT,
    Database,
    Process,
    create_database,
    stack_env,
    start_api,
    start_nats,
    wait_for,
    worker_process,
)

ADMIN = {"Content-Type": "application/json", "X-Admin-Token": ADMIN_TOKEN}
BUCKET = "licensed-artifacts"
AWS_ACCESS_KEY_ID = "licensing-test-access-key"
AWS_SECRET_ACCESS_KEY = "licensing-test-secret-access-key-do-not-leak"
AWS_REGION = "us-east-1"
ALL_STREAMS = ("HEALTH", "REGISTRY", "SESSIONS", "WORKLOADS", "LEDGER", "PAYOUTS", "AUDIT")
LICENSE_AUDIT_EVENTS = (
    "token_minted",
    "token_revoked",
    "image_upserted",
    "image_revoked",
    "access_granted",
    "access_revoked",
    "invite_created",
    "invite_revoked",
    "invite_redeemed",
    "lease_issued",
    "lease_heartbeat",
)
LICENSING_TABLES = (
    "license_images",
    "orchestrator_tokens",
    "license_access",
    "license_invites",
    "license_leases",
)


def new_secret_key() -> str:
    """A PAYMENTS_SECRET_KEY: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def address(seed: str) -> str:
    """A wallet address unique to `seed` (the registry refuses one address for two ids)."""
    return "0x" + hashlib.sha256(seed.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class AgeKey:
    """An age identity and its identity file, as the seed README's `.agekey` file holds it."""

    identity: pyrage.x25519.Identity

    @classmethod
    def generate(cls) -> AgeKey:
        return cls(pyrage.x25519.Identity.generate())

    @property
    def file_bytes(self) -> bytes:
        public = self.identity.to_public()
        return (
            f"# created: 2026-01-01T00:00:00Z\n# public key: {public}\n{self.identity}\n"
        ).encode("ascii")

    @property
    def secret_b64(self) -> str:
        return base64.b64encode(self.file_bytes).decode("ascii")

    def encrypt(self, payload: bytes) -> bytes:
        return bytes(pyrage.encrypt(payload, [self.identity.to_public()]))


def identity_from_secret(secret_b64: str) -> pyrage.x25519.Identity:
    """The identity in a leased `secret_b64` (an age identity file: comments, then the key)."""
    lines = base64.b64decode(secret_b64).decode("ascii").splitlines()
    key_line = next(line for line in lines if line.startswith("AGE-SECRET-KEY-"))
    return pyrage.x25519.Identity.from_str(key_line)


@dataclass
class Vault:
    """Every secret the tests saw, in each form a leak could take (label -> bytes)."""

    needles: dict[str, bytes] = field(default_factory=dict)

    def add(self, label: str, value: bytes | str) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else value
        if data:
            self.needles[f"{label}:{hashlib.sha256(data).hexdigest()[:12]}"] = data

    def secret(self, secret_b64: str) -> None:
        raw = base64.b64decode(secret_b64)
        self.add("secret_b64", secret_b64)
        self.add("secret_raw", raw)
        self.add("secret_hex", raw.hex())
        self.add("secret_b64url", base64.urlsafe_b64encode(raw).decode("ascii"))
        for line in raw.decode("ascii", errors="ignore").splitlines():
            if line.startswith("AGE-SECRET-KEY-"):
                self.add("age_identity", line)

    def token(self, token: str) -> None:
        self.add("token", token)

    def invite(self, code: str) -> None:
        self.add("invite_code", code)
        self.add("invite_code_normalized", normalize_invite(code))

    def find_in(self, data: bytes) -> list[str]:
        lowered = data.lower()
        found = []
        for label, needle in self.needles.items():
            # Invite codes are case-insensitive; everything else is compared exactly.
            if needle in data or (label.startswith("invite") and needle.lower() in lowered):
                found.append(label)
        return found


class Moto:
    """moto in server mode: a real S3 endpoint on a free loopback port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = Process(
            name="moto",
            argv=[
                str(Path(sys.executable).parent / "moto_server"),
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            env={**os.environ, **aws_env()},
            log_path=tmp / "moto.log",
        )

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return
            except OSError:
                if not self.process.running():
                    log = self.process.log_text()[-2000:]
                    raise AssertionError(f"moto exited:\n{log}") from None
                time.sleep(0.1)
        raise AssertionError("moto did not start")

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=AWS_REGION,
            aws_access_key_id=AWS_ACCESS_KEY_ID,
            aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
            config=BotoConfig(s3={"addressing_style": "path"}),
        )


def aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": AWS_REGION,
    }


@dataclass
class LicensingStack:
    tmp: Path
    nats: EmbeddedNats
    database: Database
    env: dict[str, str]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    ops: NatsClient
    http: aiohttp.ClientSession
    moto: Moto
    secret_key: str
    vault: Vault = field(default_factory=Vault)
    workers: dict[str, Process] = field(default_factory=dict)
    # Every process this stack ever started (restarted ones too): their logs are scanned.
    processes: list[Process] = field(default_factory=list)
    api: Process | None = None
    base: str = ""
    apis: dict[str, str] = field(default_factory=dict)
    scanned: dict[str, Any] = field(default_factory=dict)

    @property
    def js(self) -> JetStreamContext:
        return self.ops.jetstream()

    @property
    def data_dir(self) -> Path:
        return Path(self.env["PAYMENTS_DATA_DIR"])

    @property
    def license_log(self) -> Path:
        return self.data_dir / "audit" / "license.log"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_text()[-2500:]}" for p in self.processes)

    # -- processes --------------------------------------------------------------------------

    async def start_worker(self, role: str, copy: int = 0, **extra: str) -> Process:
        """Start a worker copy with this stack's env plus `extra` (a "" value unsets a variable)."""
        env = {k: v for k, v in self.env.items() if extra.get(k) != ""}
        worker = worker_process(role, env, self.tmp, copy)
        worker.log_path = self.tmp / f"{role}-{copy}-{len(self.processes)}.log"
        worker.start(**{k: v for k, v in extra.items() if v != ""})
        self.processes.append(worker)
        await asyncio.to_thread(worker.wait_log, "worker started")
        self.workers[f"{role}-{copy}"] = worker
        return worker

    async def stop_worker(self, role: str, copy: int = 0) -> None:
        worker = self.workers.pop(f"{role}-{copy}")
        await asyncio.to_thread(worker.terminate)

    async def start_api(self, **extra: str) -> tuple[Process, str]:
        api, base = await asyncio.to_thread(start_api, self.env, self.tmp, None, **extra)
        self.processes.append(api)
        return api, base

    async def stop_all(self) -> None:
        running = [p for p in self.processes if p.running()]
        await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in running))

    # -- HTTP -------------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        base: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.request(
            method, f"{base or self.base}{path}", json=body, headers=headers
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def admin(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        status, answer = await self.call(method, path, body, ADMIN)
        assert status == 200, (method, path, status, answer)
        return answer

    async def put_image(
        self, image_ref: str, secret_b64: str | None = None, artifact_s3_uri: str | None = None
    ) -> dict[str, Any]:
        if secret_b64 is not None:
            self.vault.secret(secret_b64)
        body: dict[str, Any] = {"image_ref": image_ref}
        if secret_b64 is not None:
            body["secret_b64"] = secret_b64
        if artifact_s3_uri is not None:
            body["artifact_s3_uri"] = artifact_s3_uri
        image = await self.admin("PUT", "/api/licenses/images", body)
        self.vault.secret(image["secret_b64"])
        return image

    async def create_invite(self, image_ref: str, bound: str, **extra: Any) -> dict[str, Any]:
        invite = await self.admin(
            "POST",
            "/api/licenses/invites",
            {"image_ref": image_ref, "bound_address": bound, **extra},
        )
        self.vault.invite(invite["code"])
        return invite

    async def redeem(
        self, code: str, orchestrator_id: str, wallet: str, base: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        self.vault.invite(code)
        body = {"code": code, "orchestrator_id": orchestrator_id, "address": wallet}
        status, answer = await self.call(
            "POST", "/api/licenses/invites/redeem", body, {"Content-Type": "application/json"}, base
        )
        if status == 200:
            self.vault.token(answer["token"])
        return status, answer

    async def mint_token(self, orchestrator_id: str) -> dict[str, Any]:
        minted = await self.admin("POST", f"/api/licenses/orchestrators/{orchestrator_id}/tokens")
        self.vault.token(minted["token"])
        return minted

    async def lease(self, token: str | None, image_ref: str) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            self.vault.token(token)
            headers["Authorization"] = f"Bearer {token}"
        status, answer = await self.call(
            "POST", "/api/licenses/lease", {"image_ref": image_ref}, headers
        )
        if status == 200:
            self.vault.secret(answer["secret_b64"])
        return status, answer

    async def heartbeat(self, token: str | None, lease_id: str) -> tuple[int, dict[str, Any]]:
        headers = {}
        if token is not None:
            self.vault.token(token)
            headers["Authorization"] = f"Bearer {token}"
        return await self.call("POST", f"/api/licenses/lease/{lease_id}/heartbeat", None, headers)

    async def orchestrator_registered(self, orchestrator_id: str) -> bool:
        async with self.http.get(
            f"{self.base}/api/orchestrators/{orchestrator_id}", headers=ADMIN
        ) as answer:
            return answer.status == 200

    # -- database ---------------------------------------------------------------------------

    async def rows(self, table: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            result = await connection.execute(text(f'SELECT * FROM "{table}"'))
            return [dict(row._mapping) for row in result]

    async def licensing_snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every licensing row, plus the registered orchestrator ids, in a stable order."""
        snapshot: dict[str, list[dict[str, Any]]] = {}
        for table in LICENSING_TABLES:
            rows = await self.rows(table)
            snapshot[table] = sorted(rows, key=lambda row: json.dumps(row, default=str))
        orchestrators = await self.rows("orchestrators")
        snapshot["orchestrator_ids"] = sorted(
            ({"id": row["orchestrator_id"]} for row in orchestrators), key=lambda row: row["id"]
        )
        return snapshot

    async def stream_totals(self) -> dict[str, int]:
        """Messages stored per stream."""
        return {name: int((await self.js.stream_info(name)).state.messages) for name in ALL_STREAMS}

    async def table_names(self) -> list[str]:
        async with self.engine.connect() as connection:
            return await connection.run_sync(lambda sync: inspect(sync).get_table_names())

    @contextlib.asynccontextmanager
    async def unchanged(self) -> AsyncIterator[None]:
        """Assert that the block changes no licensing row, registers no one and publishes
        nothing (no registration, no audit event)."""
        await self.outbox_drained()
        before = (await self.licensing_snapshot(), await self.stream_totals())
        yield
        await self.outbox_drained()
        after = (await self.licensing_snapshot(), await self.stream_totals())
        assert after == before

    # -- quiescence -------------------------------------------------------------------------

    async def outbox_drained(self) -> None:
        async def drained() -> bool:
            rows = await self.rows("outbox")
            return all(row["published_at"] is not None for row in rows)

        await wait_for(drained, timeout_s=15.0)

    async def audit_caught_up(self) -> None:
        """Wait until the audit sink has written every AUDIT message to its files."""
        await self.outbox_drained()
        last = (await self.js.stream_info(AUDIT.name)).state.last_seq
        position = self.data_dir / "audit" / ".audit-sink.position"

        async def written() -> bool:
            try:
                return int(json.loads(position.read_text())["stream_seq"]) >= last
            except (FileNotFoundError, ValueError, KeyError):
                return last == 0

        await wait_for(written, timeout_s=15.0)

    def license_log_records(self) -> list[dict[str, Any]]:
        if not self.license_log.exists():
            return []
        return [json.loads(line) for line in self.license_log.read_text().splitlines() if line]

    async def audit_messages(self) -> list[tuple[int, str, dict[str, Any]]]:
        """(stream sequence, subject, body) of every AUDIT message."""
        found = []
        for message in await stream_messages(self.js):
            if message.stream == AUDIT.name:
                found.append((message.seq, message.subject, json.loads(message.body)))
        return found

    # -- the leak scan ----------------------------------------------------------------------

    async def scan_for_secrets(self) -> dict[str, list[str]]:
        """Where any recorded secret appears: {place: [needle labels]} (empty when clean).

        Stops every process first, so their last log lines are on disk.
        """
        await self.audit_caught_up()
        await self.stop_all()
        leaks: dict[str, list[str]] = {}
        assert self.processes and all(not p.running() for p in self.processes)

        def check(place: str, data: bytes) -> None:
            found = self.vault.find_in(data)
            if found:
                leaks.setdefault(place, []).extend(found)

        messages = await stream_messages(self.js)
        for m in messages:
            check(
                f"stream {m.stream} #{m.seq} {m.subject}", m.subject.encode() + m.headers + m.body
            )
        files = self.scanned_files()
        for path in files:
            check(str(path), path.read_bytes())
        for place, found in (await self.scan_database()).items():
            leaks.setdefault(place, []).extend(found)
        # What was read, so a test can tell that the scan covered everything.
        self.scanned = {
            "streams": sorted({m.stream for m in messages}),
            "messages": len(messages),
            "files": [str(path) for path in files],
            "tables": await self.table_names(),
        }
        return leaks

    def assert_scan_covered_everything(self) -> None:
        scanned = self.scanned
        assert {"AUDIT", "REGISTRY"} <= set(scanned["streams"]), scanned["streams"]
        assert scanned["messages"] >= len(LICENSE_AUDIT_EVENTS), scanned
        files = set(scanned["files"])
        assert {str(p.log_path) for p in self.processes} <= files
        assert str(self.license_log) in files
        assert {"dead_letters", "outbox", *LICENSING_TABLES} <= set(scanned["tables"])

    async def scan_database(self) -> dict[str, list[str]]:
        """Where any recorded secret appears in any row of any table: {table: [labels]}."""
        leaks: dict[str, list[str]] = {}
        for table in await self.table_names():
            for row in await self.rows(table):
                found = self.vault.find_in(row_bytes(row))
                if found:
                    leaks.setdefault(f"table {table}", []).extend(found)
        return leaks

    def scanned_files(self) -> list[Path]:
        files = [p.log_path for p in self.processes if p.log_path.exists()]
        files.append(self.tmp / "nats" / "nats-server.log")
        files.extend(walk(self.data_dir))
        files.extend(walk(self.tmp / "nats" / "jetstream"))
        if self.database.backend == "sqlite":
            files.extend(self.tmp.glob("payments.db*"))
        return [path for path in files if path.is_file()]


def walk(folder: Path) -> Iterable[Path]:
    return (path for path in folder.rglob("*") if path.is_file()) if folder.exists() else ()


def row_bytes(row: dict[str, Any]) -> bytes:
    parts = []
    for value in row.values():
        if isinstance(value, bytes | bytearray | memoryview):
            parts.append(bytes(value))
        elif isinstance(value, dict | list):
            parts.append(json.dumps(value, default=str).encode())
        else:
            parts.append(str(value).encode())
    return b"\x00".join(parts)


@dataclass(frozen=True)
class StoredMessage:
    stream: str
    seq: int
    subject: str
    headers: bytes
    body: bytes


async def stream_messages(js: JetStreamContext) -> list[StoredMessage]:
    """Every stored message of every stream (all of them, not only the licensing ones)."""
    found = []
    names = [str(info.config.name) for info in await js.streams_info()]
    assert set(ALL_STREAMS) <= set(names), names
    for name in names:
        state = (await js.stream_info(name)).state
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            try:
                message = await js.get_msg(name, seq)
            except NotFoundError:
                continue
            headers = json.dumps(message.headers or {}).encode()
            found.append(
                StoredMessage(name, seq, message.subject or "", headers, message.data or b"")
            )
    return found


@contextlib.asynccontextmanager
async def licensing_stack(
    backend: str,
    tmp: Path,
    *,
    bootstrap: list[dict[str, Any]],
    api_env: dict[str, str] | None = None,
    extra_apis: dict[str, dict[str, str]] | None = None,
    licensing_copies: int = 1,
    s3: bool = True,
    **env_extra: str,
) -> AsyncIterator[LicensingStack]:
    """nats-server, a migrated database, moto (unless `s3=False`), the registry, licensing and
    audit workers, and the api; `extra_apis` start more apis with their own settings
    (`stack.apis[name]` is each one's base URL)."""
    async with contextlib.AsyncExitStack() as cleanup:
        nats = start_nats(tmp / "nats")
        cleanup.callback(nats.stop)
        settings = build_settings(nats_url=nats.url, nats_ops_password=nats.passwords.ops)
        ops = await connect(settings, "ops", "test-licensing-ops")
        cleanup.push_async_callback(ops.close)
        await provision(ops.jetstream(), replicas=1)
        database = await create_database(backend, tmp)
        if database.drop is not None:
            cleanup.push_async_callback(database.drop)
        # Without s3 the endpoint is configured but nothing listens: no lease has an artifact.
        moto = Moto(tmp)
        cleanup.callback(moto.process.terminate)
        moto_started = asyncio.create_task(asyncio.to_thread(moto.start if s3 else bool))
        secret_key = new_secret_key()
        env = stack_env(
            nats,
            database,
            tmp / "data",
            PAYMENTS_BOOTSTRAP_ORCHESTRATORS=json.dumps(bootstrap),
            PAYMENTS_SECRET_KEY=secret_key,
            PAYMENTS_S3_ENDPOINT_URL=moto.endpoint,
            PAYMENTS_S3_ADDRESSING_STYLE="path",
            PAYMENTS_LICENSE_ARTIFACT_REGION=AWS_REGION,
            **aws_env(),
            **env_extra,
        )
        engine = make_engine(database.url, writer=False)
        cleanup.push_async_callback(engine.dispose)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        cleanup.push_async_callback(http.close)
        stack = LicensingStack(
            tmp, nats, database, env, engine, make_sessionmaker(engine), ops, http, moto, secret_key
        )
        stack.vault.add("secret_key", secret_key)
        stack.vault.add("aws_secret", AWS_SECRET_ACCESS_KEY)
        cleanup.push_async_callback(stack.stop_all)
        workers = [("registry", 0), ("audit", 0)]
        workers += [("licensing", copy) for copy in range(licensing_copies)]
        more_apis = extra_apis or {}
        apis = asyncio.gather(
            stack.start_api(**(api_env or {})),
            *(stack.start_api(**variant) for variant in more_apis.values()),
        )
        await asyncio.gather(
            moto_started, apis, *(stack.start_worker(role, copy) for role, copy in workers)
        )
        started: list[tuple[Process, str]] = apis.result()
        stack.api, stack.base = started[0]
        stack.apis = {name: base for name, (_, base) in zip(more_apis, started[1:], strict=True)}
        for entry in bootstrap:
            registered = functools.partial(stack.orchestrator_registered, entry["orchestrator_id"])
            await wait_for(registered, timeout_s=20.0, interval_s=0.1)
        if s3:
            moto.client().create_bucket(Bucket=BUCKET)
        yield stack


# -- building blocks ------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def parse_time(value: str | datetime) -> datetime:
    """An ISO string from the api or a raw database value (SQLite's are naive UTC) as UTC."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Onboarded:
    """An image, and an orchestrator that redeemed an invite to it."""

    image_ref: str
    key: AgeKey
    orchestrator_id: str
    wallet: str
    token: str
    token_id: str
    invite_id: str
    code: str


async def onboard(stack: LicensingStack, tag: str, artifact_s3_uri: str | None = None) -> Onboarded:
    """Register an image, invite a fresh wallet, redeem it: the orchestrator holds a token."""
    key = AgeKey.generate()
    image_ref = f"ghcr.io/example/{unique(tag)}:enc-v1"
    await stack.put_image(image_ref, key.secret_b64, artifact_s3_uri)
    orchestrator_id = unique(f"orch-{tag}")
    wallet = address(orchestrator_id)
    invite = await stack.create_invite(image_ref, wallet)
    status, redeemed = await stack.redeem(invite["code"], orchestrator_id, wallet)
    assert status == 200, (status, redeemed)
    return Onboarded(
        image_ref,
        key,
        orchestrator_id,
        wallet,
        redeemed["token"],
        redeemed["token_id"],
        invite["invite_id"],
        invite["code"],
    )


async def exercise_everything(stack: LicensingStack, other_orchestrator: str) -> dict[str, Any]:
    """Every licensing command, every audit event, and refusals that carry a secret in the
    request: what a leak scan should run over. Returns the identifiers it made."""
    done = await onboard(stack, "all")
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease
    assert lease["secret_b64"] == done.key.secret_b64
    status, beat = await stack.heartbeat(done.token, lease["lease_id"])
    assert status == 200, beat

    # A generated secret, an admin-minted token, a grant and its withdrawal.
    generated = await stack.put_image(f"ghcr.io/example/{unique('generated')}:v1")
    minted = await stack.mint_token(other_orchestrator)
    await stack.admin(
        "POST",
        "/api/licenses/access/grant",
        {"orchestrator_id": other_orchestrator, "image_ref": generated["image_ref"]},
    )
    status, other_lease = await stack.lease(minted["token"], generated["image_ref"])
    assert status == 200, other_lease
    await stack.admin(
        "POST",
        "/api/licenses/access/revoke",
        {"orchestrator_id": other_orchestrator, "image_ref": generated["image_ref"]},
    )
    await stack.admin(
        "DELETE", f"/api/licenses/orchestrators/{other_orchestrator}/tokens/{minted['token_id']}"
    )
    # Refusals carrying secrets: a revoked token, a wrong wallet, a malformed secret.
    assert (await stack.lease(minted["token"], generated["image_ref"]))[0] == 401
    spare = await stack.create_invite(done.image_ref, address(unique("spare")))
    assert (await stack.redeem(spare["code"], unique("thief"), address("thief")))[0] == 403
    await stack.admin("POST", "/api/licenses/invites/revoke", {"invite_id": spare["invite_id"]})
    short_secret = base64.b64encode(os.urandom(16)).decode("ascii")
    stack.vault.secret(short_secret)
    status, refused = await stack.call(
        "PUT",
        "/api/licenses/images",
        {"image_ref": done.image_ref, "secret_b64": short_secret},
        ADMIN,
    )
    assert status == 400, refused
    await stack.admin("POST", "/api/licenses/images/revoke", {"image_ref": generated["image_ref"]})
    return {
        "onboarded": done,
        "lease_id": lease["lease_id"],
        "generated_image": generated["image_ref"],
        "minted_token_id": minted["token_id"],
        "spare_invite_id": spare["invite_id"],
    }


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    payments = str(Path(sys.executable).parent / "payments")
    return subprocess.run(
        [payments, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
