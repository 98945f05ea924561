"""Forwarder health reports through the whole pipeline: HTTP -> HEALTH stream -> registry worker
-> projection -> HTTP read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from shared.embedded_nats import EmbeddedNats
from tests.harness import Database, Process, headers, stack_env, start_api, start_worker, wait_for

ORCH_ID = "orch-1"
ORCH_ADDRESS = "0x1111111111111111111111111111111111111111"
BOOTSTRAP = json.dumps([{"orchestrator_id": ORCH_ID, "address": ORCH_ADDRESS}])
HEALTHY = {"summary": {"services_up": 2, "total_services": 2}, "ip": "203.0.113.7"}


@dataclass
class Stack:
    base: str
    api: Process
    workers: list[Process]
    env: dict[str, str]
    logs: Path


@pytest.fixture
async def stack(
    provisioned: EmbeddedNats, database: Database, tmp_path: Path
) -> AsyncIterator[Stack]:
    env = stack_env(
        provisioned,
        database,
        tmp_path / "data",
        PAYMENTS_BOOTSTRAP_ORCHESTRATORS=BOOTSTRAP,
        PAYMENTS_FORWARDER_HEALTH_TTL_SECONDS="2",
    )
    worker = start_worker("registry", env, tmp_path)
    api, base = start_api(env, tmp_path)
    yield Stack(base, api, [worker], env, tmp_path)
    api.terminate()
    worker.terminate()


async def fetch_record(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(f"{base}/api/orchestrators/{ORCH_ID}", headers=headers()) as answer:
        return await answer.json() if answer.status == 200 else {}


async def test_health_report_drives_active_reason_until_ttl(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    await wait_for(lambda: fetch_record(http, stack.base))
    async with http.post(
        f"{stack.base}/api/orchestrators/{ORCH_ID}/health",
        json={"data": HEALTHY},
        headers=headers(),
    ) as answer:
        assert answer.status == 202, await answer.text()
        body = await answer.json()
    assert body["ok"] is True and body["duplicate"] is False

    async def shows_report() -> dict:
        record = await fetch_record(http, stack.base)
        return record if record.get("active_reason") == "forwarder_health" else {}

    record = await wait_for(shows_report, timeout_s=1.0)
    assert record["active"] is True
    assert record["forwarder_health"]["data"] == HEALTHY
    assert record["last_seen_ip"] == "203.0.113.7"

    async def report_stale() -> dict:
        record = await fetch_record(http, stack.base)
        return record if record.get("active_reason") != "forwarder_health" else {}

    # TTL is 2 s here; the contact the report recorded still counts as recent (300 s floor).
    stale = await wait_for(report_stale, timeout_s=5.0)
    assert stale["active_reason"] == "recent_contact"
