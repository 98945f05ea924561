"""The restore drill: back up a running stack, destroy it, restore, replay, and the balances match.

A stack (nats-server, the database, the registry, ledger and audit workers, the api) credits
time workloads sent over HTTP. `payments backup` runs while more workloads keep arriving, so
the database copy and the stream snapshots are taken at different moments. Then the database,
the JetStream store and the audit files are destroyed, a fresh nats-server is started and
`payments restore` puts everything back. The workers, started again on the restored database,
apply what arrived between the database copy and the snapshots; the balances then equal what
the test computes on its own from the workloads the restored stream holds (every one accepted
before the backup started among them), and `payments replay` into an empty database rebuilds
the same ledger, entry for entry, each naming the same source sequence. Along the way: nothing
secret is in the backup, the audit log holds each audit message once, and a second restore is
refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from contracts.events import WorkloadTimeRecordedV1
from contracts.streams import ALL_STREAMS, AUDIT, AUDIT_SINK_CONSUMER, WORKLOADS
from shared.db.engine import make_engine, make_sessionmaker
from shared.embedded_nats import NatsPasswords
from shared.nats_client import connect
from shared.settings import build_settings
from tests.conftest import database_backends
from tests.harness import start_nats, worker_process
from tests.ledger_stack import (
    LedgerStack,
    balances,
    call,
    empty_postgres_database,
    entries,
    ledger_stack,
    orchestrator,
    processed_count,
    read_stream,
    run_payments,
    wait_until,
)

ORCHESTRATORS = [orchestrator(f"orch-b{i}", digit) for i, digit in enumerate("abc")]
IDS = [o["orchestrator_id"] for o in ORCHESTRATORS]
BEFORE_BACKUP = 60
DURING_BACKUP = 60
# The default rate (0.000005353596 ETH a minute) is a whole number of wei per millisecond.
WEI_PER_MS = 5_353_596_000_000 // 60_000
SECRET_KEY = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWstMzI="  # base64 of 32 bytes


def workload(n: int) -> dict[str, object]:
    return {
        "workload_id": f"drill-{n}",
        "orchestrator_id": IDS[n % len(IDS)],
        "duration_ms": 1000 * (1 + n % 7),
        "artifact_uri": f"/out/drill-{n}.webm",
    }


async def post_workloads(stack: LedgerStack, numbers: range) -> set[str]:
    """Send the workloads over HTTP; the ids answered 202 (stored in the stream)."""
    accepted = set()
    for n in numbers:
        body = workload(n)
        answer = await call(stack.http, "POST", f"{stack.base}/api/workloads/time", json=body)
        assert answer.status == 202, answer
        accepted.add(str(body["workload_id"]))
    return accepted


def expected_balances(workload_ids: set[str]) -> dict[str, int]:
    found: dict[str, int] = defaultdict(int)
    for n in range(BEFORE_BACKUP + DURING_BACKUP):
        body = workload(n)
        if body["workload_id"] in workload_ids:
            found[str(body["orchestrator_id"])] += int(str(body["duration_ms"])) * WEI_PER_MS
    return dict(found)


async def workload_ids_in_stream(nc: NatsClient) -> set[str]:
    messages = await read_stream(nc.jetstream(), WORKLOADS.name, "workloads.time.>")
    return {WorkloadTimeRecordedV1.model_validate_json(m.data).workload_id for m in messages}


async def balances_at(url: str) -> dict[str, int]:
    engine = make_engine(url, writer=False)
    try:
        return await balances(make_sessionmaker(engine))
    finally:
        await engine.dispose()


async def ledger_rows(url: str) -> set[tuple[str, str, int, str, int]]:
    """Every entry: orchestrator, key, amount, source stream and sequence."""
    engine = make_engine(url, writer=False)
    try:
        return {
            (e.orchestrator_id, e.entry_key, e.amount_wei, e.source_stream, e.source_seq)
            for e in await entries(make_sessionmaker(engine))
        }
    finally:
        await engine.dispose()


async def drained(nc: NatsClient, stream: str, durable: str) -> bool:
    info = await nc.jetstream().consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize("backend", database_backends())
async def test_restore_drill_rebuilds_the_same_balances(backend: str, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backup"
    async with ledger_stack(
        backend, tmp_path / "stack", ORCHESTRATORS, PAYMENTS_SECRET_KEY=SECRET_KEY
    ) as stack:
        audit = worker_process("audit", stack.env, stack.tmp)
        audit.start()
        try:
            await asyncio.to_thread(audit.wait_log, "worker started")
            before = await post_workloads(stack, range(BEFORE_BACKUP))

            async def credited() -> bool:
                return await processed_count(stack.sessions, "workload_time:") == BEFORE_BACKUP

            await wait_until(credited, 30.0, stack)
            await wait_until(
                lambda: drained(stack.ops, AUDIT.name, AUDIT_SINK_CONSUMER.durable), 30.0, stack
            )
            # The backup runs while workloads keep arriving.
            during = asyncio.create_task(
                post_workloads(stack, range(BEFORE_BACKUP, BEFORE_BACKUP + DURING_BACKUP))
            )
            made = await run_payments(stack.env, "backup", "--out", str(backup_dir))
            await during
        finally:
            audit.terminate()
        assert made.code == 0, made.stderr[-3000:]
        assert "PAYMENTS_SECRET_KEY is not in it" in made.stdout
        manifest = json.loads((backup_dir / "manifest.json").read_text())
        assert {s["name"] for s in manifest["streams"]} == {s.name for s in ALL_STREAMS}
        assert manifest["database"]["kind"] == ("sqlite" if backend == "sqlite" else "postgresql")
        assert "audit/registry.log" in manifest["audit_files"], manifest["audit_files"]
        # Nothing secret in the listing, the manifest or any file of the backup.
        secrets = [SECRET_KEY, *stack.nats.passwords.env().values(), "test-admin-token"]
        for path in backup_dir.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert not any(s.encode() in content for s in secrets), path
        assert not any(s in made.stdout + made.stderr for s in secrets)
        assert (backup_dir.stat().st_mode & 0o077) == 0, "the backup must be private"
        registry_log = (stack.tmp / "data" / "audit" / "registry.log").read_text()

        # Destroy: the processes, the JetStream store, the database and the audit files.
        processes = [stack.registry, *stack.ledger, *([stack.api] if stack.api else [])]
        await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in processes))
        await stack.ops.close()
        await stack.engine.dispose()
        stack.nats.stop()
        shutil.rmtree(stack.nats.store_dir)
        shutil.rmtree(stack.tmp / "data" / "audit")
        if backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{stack.tmp / 'payments.db'}{suffix}").unlink(missing_ok=True)
        else:
            assert stack.database.drop is not None
            await stack.database.drop()

        # A new, empty nats-server; restore into it and into the (gone) database.
        fresh = start_nats(tmp_path / "fresh-nats", NatsPasswords())
        try:
            worker_env = {**stack.env, "PAYMENTS_NATS_URL": fresh.url, **fresh.passwords.env()}
            env = {**worker_env, "PAYMENTS_LOG_LEVEL": "WARNING"}
            restored = await run_payments(env, "restore", "--from", str(backup_dir))
            assert restored.code == 0, restored.stdout + restored.stderr[-3000:]
            # Run again (while the workers start): it refuses, changing nothing.
            refusing = asyncio.create_task(run_payments(env, "restore", "--from", str(backup_dir)))

            settings = build_settings(nats_url=fresh.url, nats_ops_password=fresh.passwords.ops)
            ops = await connect(settings, "ops", "test-drill")
            try:
                for stream in manifest["streams"]:
                    info = await ops.jetstream().stream_info(stream["name"])
                    assert info.state.messages == stream["messages"], stream
                    assert info.state.last_seq == stream["last_seq"], stream
                in_stream = await workload_ids_in_stream(ops)
                # Everything accepted before the backup started is in it, and only what was sent.
                assert before <= in_stream <= before | await during
                assert (stack.tmp / "data" / "audit" / "registry.log").read_text() in registry_log

                # The workers catch the restored database up with the restored streams.
                workers = [
                    worker_process(role, worker_env, tmp_path, copy=1)
                    for role in ("registry", "ledger", "audit")
                ]
                for worker in workers:
                    worker.start()
                try:
                    await asyncio.gather(
                        *(asyncio.to_thread(w.wait_log, "worker started") for w in workers)
                    )
                    for spec_stream, durable in (
                        (WORKLOADS.name, "ledger-workloads"),
                        (AUDIT.name, AUDIT_SINK_CONSUMER.durable),
                    ):

                        async def caught_up(s: str = spec_stream, d: str = durable) -> bool:
                            return await drained(ops, s, d)

                        await wait_until(caught_up, 60.0)
                finally:
                    await asyncio.gather(*(asyncio.to_thread(w.terminate) for w in workers))
                refused = await refusing
                assert refused.code == 2 and "restore refused" in refused.stderr, refused.stderr
                # Each audit message is written once: none lost, none written twice.
                logs = sorted((stack.tmp / "data" / "audit").glob("*.log"))
                lines = [line for log in logs for line in log.read_text().splitlines()]
                seqs = sorted(json.loads(line)["stream_seq"] for line in lines)
                audit_last = (await ops.jetstream().stream_info(AUDIT.name)).state.last_seq
                assert seqs == list(range(1, audit_last + 1))
            finally:
                await ops.close()
            expected = expected_balances(in_stream)
            assert await balances_at(stack.database.url) == expected

            # Replay the restored streams into an empty database: the same ledger.
            if backend == "sqlite":
                target, drop = f"sqlite+aiosqlite:///{tmp_path / 'replayed.db'}", None
            else:
                target, drop = await empty_postgres_database()
            try:
                replayed = await run_payments(env, "replay", "--into", target, "--quiet")
                assert replayed.code == 0, replayed.stderr[-3000:]
                assert await balances_at(target) == expected
                assert await ledger_rows(target) == await ledger_rows(stack.database.url)
            finally:
                if drop is not None:
                    await drop()
        finally:
            fresh.stop()
