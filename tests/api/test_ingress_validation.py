"""Bad health reports get a clear 4xx and publish nothing (guarantee 8), on a live stack
(tests/api/conftest.py).

Every case counts the HEALTH stream's messages through the ops user before and after the
request: the ingress publishes synchronously before it answers, so an unchanged count right after
the answer means nothing was stored. A control case shows the count does move for a good report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from contracts.streams import HEALTH
from tests.api.conftest import MAX_BODY_BYTES, ORCH_ID
from tests.e2e import (
    HEALTHY,
    Stack,
    call,
    dead_letters,
    inbox_keys,
    post_health,
    stream_count,
)
from tests.harness import ADMIN_TOKEN, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="package")


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    detail: str
    orchestrator_id: str = ORCH_ID
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = ADMIN_TOKEN


def doc(document: Any) -> bytes:
    return json.dumps(document).encode()


VALID = doc({"data": HEALTHY})
DEEP = 3000

CASES = [
    Case("malformed-json", b'{"data": {"summary": ', 400, "Malformed JSON body"),
    Case("invalid-utf8", b'{"data": {"x": "\xff\xfe"}}', 400, "Malformed JSON body"),
    Case("trailing-garbage", VALID + b" trailing", 400, "Malformed JSON body"),
    Case("empty-body", b"", 400, "Request body is empty"),
    Case("array-body", doc([{"data": HEALTHY}]), 400, "Request body must be a JSON object"),
    Case("string-body", doc("health"), 400, "Request body must be a JSON object"),
    Case("null-body", b"null", 400, "Request body must be a JSON object"),
    Case("unknown-orchestrator", VALID, 404, "Unknown orchestrator", orchestrator_id="orch-x"),
    Case("oversized-source", doc({"source": "s" * 65, "data": HEALTHY}), 422, "source"),
    Case("empty-source", doc({"source": "", "data": HEALTHY}), 422, "source"),
    Case("missing-data", doc({"source": "forwarder"}), 422, "data: Field required"),
    Case("data-not-object", doc({"data": [1, 2]}), 422, "data"),
    Case("unknown-field", doc({"data": HEALTHY, "extra": 1}), 422, "extra"),
    Case(
        "body-over-limit",
        doc({"data": {"pad": "x" * MAX_BODY_BYTES}}),
        413,
        "Request body is too large",
    ),
    Case("missing-admin-token", VALID, 401, "Admin token required", token=None),
    Case("wrong-admin-token", VALID, 401, "Admin token required", token="wrong-secret-value"),
    Case(
        "idempotency-key-too-long",
        VALID,
        400,
        "Idempotency-Key must be 1-200 printable characters",
        headers={"Idempotency-Key": "k" * 201},
    ),
    Case(
        "idempotency-key-blank",
        VALID,
        400,
        "Idempotency-Key must be 1-200 printable characters",
        headers={"Idempotency-Key": "   "},
    ),
    # Input the stdlib parser chokes on, or that cannot be stored: still a 4xx, never a 5xx.
    Case("nested-too-deep", b'{"data": {"a": ' + b"[" * DEEP + b"]" * DEEP + b"}}", 400, ""),
    Case("number-too-long", b'{"data": {"x": ' + b"9" * 4400 + b"}}", 400, "Malformed JSON"),
    Case("lone-surrogate", b'{"data": {"x": "\\ud800"}}', 400, "Malformed JSON"),
    # PostgreSQL text cannot hold U+0000: refused here instead of failing in the worker.
    Case("nul-in-source", doc({"source": "fwd\u0000", "data": HEALTHY}), 400, "NUL"),
    Case("nul-in-path", VALID, 404, "Unknown orchestrator", orchestrator_id="orch%001"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_bad_health_report_gets_4xx_and_publishes_nothing(stack: Stack, case: Case) -> None:
    before = await stream_count(stack.js, HEALTH.name)
    headers = {"Content-Type": "application/json", **case.headers}
    if case.token is not None:
        headers["X-Admin-Token"] = case.token
    answer = await call(
        stack.http,
        "POST",
        f"{stack.base}/api/orchestrators/{case.orchestrator_id}/health",
        data=case.body,
        headers=headers,
    )
    assert answer.status == case.status, answer
    assert isinstance(answer.body, dict) and set(answer.body) == {"detail"}, answer
    assert case.detail in answer.body["detail"], answer
    assert "wrong-secret-value" not in answer.body["detail"]
    assert await stream_count(stack.js, HEALTH.name) == before


def nest(depth: int) -> Any:
    nested: Any = 1
    for _ in range(depth):
        nested = {"a": nested}
    return nested


async def test_whatever_nesting_the_ingress_accepts_is_applied(stack: Stack) -> None:
    """The ingress's JSON limits match the worker's: an accepted report is never one the worker
    cannot decode (it would be a dead letter after a 202)."""
    answers = {
        depth: await post_health(stack, ORCH_ID, {"data": {"nested": nest(depth)}})
        for depth in (8, 64, 150, 190, 197, 198, 199, 250, 400)
    }
    assert {answer.status for answer in answers.values()} <= {202, 400}, answers
    accepted = [depth for depth, answer in answers.items() if answer.status == 202]
    refused = [depth for depth, answer in answers.items() if answer.status == 400]
    assert accepted and max(accepted) >= 64
    assert not refused or min(refused) > max(accepted)
    for depth in accepted:
        key = answers[depth].body["event_key"]
        await wait_for(lambda k=key: inbox_keys(stack, k), timeout_s=15)
    assert await dead_letters(stack) == []


@pytest.mark.parametrize("orchestrator_id", ["orch-x", "orch%001", "o" * 300])
async def test_unknown_orchestrator_reads_are_404(stack: Stack, orchestrator_id: str) -> None:
    answer = await call(
        stack.http,
        "GET",
        f"{stack.base}/api/orchestrators/{orchestrator_id}",
        headers={"X-Admin-Token": ADMIN_TOKEN},
    )
    assert (answer.status, answer.body) == (404, {"detail": "Not found"})


async def test_valid_report_is_published_control(stack: Stack) -> None:
    """The probe above can fail: a good report moves the HEALTH count by exactly one."""
    before = await stream_count(stack.js, HEALTH.name)
    answer = await post_health(stack, ORCH_ID, key="validation-control")
    assert answer.status == 202 and answer.body["duplicate"] is False, answer
    assert await stream_count(stack.js, HEALTH.name) == before + 1
