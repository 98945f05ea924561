"""Bad session events get a clear 4xx and are never published (guarantee 8); the session
reporter token is enforced when set (original-behaviour §2 and §7.1).

A live nats-server and two api processes (no workers are needed: nothing is applied): "open"
without a reporter token and "guarded" with PAYMENTS_SESSION_REPORTER_TOKEN. Every case counts
the SESSIONS stream's messages through the ops user before and after the request: the ingress
publishes before it answers, so an unchanged count right after the answer means nothing was
stored. Control cases show the count does move for a good event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.session_stack import SessionStack, call, session_stack, stream_count

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPORTER_TOKEN = "edge-reporter-secret-1"
GOOD = {
    "session_id": "sess-valid",
    "upstream_addr": "198.51.100.7",
    "upstream_port": 8443,
    "edge_id": "edge-a",
    "event": "heartbeat",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sessions_api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SessionStack]:
    tmp: Path = tmp_path_factory.mktemp("sessions-validation")
    async with session_stack(
        "sqlite",
        tmp,
        [],
        workers=(),
        apis={"open": {}, "guarded": {"PAYMENTS_SESSION_REPORTER_TOKEN": REPORTER_TOKEN}},
    ) as running:
        yield running


def doc(**changes: Any) -> bytes:
    document = {**GOOD, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


CASES = [
    Case(
        "hostname-upstream",
        doc(upstream_addr="edge.example.com"),
        422,
        "upstream_addr: Value error, upstream_addr must be an IP address literal, not a hostname",
    ),
    Case("hostname-localhost", doc(upstream_addr="localhost"), 422, "IP address literal"),
    Case("ip-with-port", doc(upstream_addr="198.51.100.7:8443"), 422, "IP address literal"),
    Case("bad-event-type", doc(event="pause"), 422, "event must be start, heartbeat or end"),
    Case("empty-event-type", doc(event=""), 422, "event must be start, heartbeat or end"),
    Case("event-not-string", doc(event=3), 422, "event"),
    Case("port-zero", doc(upstream_port=0), 422, "upstream_port"),
    Case("port-70000", doc(upstream_port=70_000), 422, "upstream_port"),
    Case("port-negative", doc(upstream_port=-1), 422, "upstream_port"),
    Case("port-not-number", doc(upstream_port="https"), 422, "upstream_port"),
    Case("session-id-129-chars", doc(session_id="s" * 129), 422, "session_id"),
    Case("session-id-empty", doc(session_id=""), 422, "session_id"),
    Case("edge-id-65-chars", doc(edge_id="e" * 65), 422, "edge_id"),
    Case("event-id-129-chars", doc(event_id="i" * 129), 422, "event_id"),
    Case("missing-session-id", doc(session_id=...), 422, "session_id: Field required"),
    Case("missing-upstream-addr", doc(upstream_addr=...), 422, "upstream_addr: Field required"),
    Case("unknown-field", doc(bitrate=5), 422, "bitrate"),
    Case("malformed-json", b'{"session_id": "s", ', 400, "Malformed JSON body"),
    Case("trailing-garbage", doc() + b" x", 400, "Malformed JSON body"),
    Case("empty-body", b"", 400, "Request body is empty"),
    Case("array-body", json.dumps([GOOD]).encode(), 400, "Request body must be a JSON object"),
    Case("nul-in-string", doc(edge_id="a\u0000b"), 400, "NUL"),
    Case(
        "idempotency-key-too-long",
        doc(),
        400,
        "Idempotency-Key must be 1-200 printable characters",
        headers={"Idempotency-Key": "k" * 201},
    ),
]


async def post_raw(
    stack: SessionStack, api: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    answer = await call(
        stack.http,
        "POST",
        stack.url("/api/sessions/events", api),
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return answer.status, answer.body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_session_event_is_refused_clearly_and_not_published(
    sessions_api: SessionStack, case: Case
) -> None:
    before = await stream_count(sessions_api.js)
    status, body = await post_raw(sessions_api, "open", case.body, case.headers)
    assert status == case.status, body
    assert isinstance(body, dict) and case.detail in body["detail"], body
    assert await stream_count(sessions_api.js) == before


async def test_values_at_the_limits_are_accepted_and_published(sessions_api: SessionStack) -> None:
    """The control: the same count moves for good events, including the largest allowed ids."""
    before = await stream_count(sessions_api.js)
    accepted = [
        doc(),
        doc(session_id="s" * 128, edge_id="e" * 64, event_id="i" * 128),
        doc(session_id="sess-ports-1", upstream_port=1),
        doc(session_id="sess-ports-2", upstream_port=65_535),
        doc(session_id="sess-v6", upstream_addr="2001:db8::7", event="START"),
        doc(session_id="sess-no-edge", edge_id=None, event=" End "),
    ]
    for body in accepted:
        status, answer = await post_raw(sessions_api, "open", body)
        assert status == 202, answer
        assert answer["ok"] is True and answer["duplicate"] is False
    assert await stream_count(sessions_api.js) == before + len(accepted)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Session-Token": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": REPORTER_TOKEN},  # not a Bearer credential
        {"X-Admin-Token": "test-admin-token"},  # the admin token is not a reporter token
        {"X-Session-Token": REPORTER_TOKEN + "x"},
    ],
    ids=["missing", "wrong-header", "wrong-bearer", "no-bearer-scheme", "admin", "longer"],
)
async def test_reporter_token_missing_or_wrong_is_401_and_not_published(
    sessions_api: SessionStack, headers: dict[str, str]
) -> None:
    before = await stream_count(sessions_api.js)
    status, body = await post_raw(sessions_api, "guarded", doc(), headers)
    assert status == 401, body
    assert body["detail"] == "Session reporter token required"
    assert REPORTER_TOKEN not in json.dumps(body)
    assert await stream_count(sessions_api.js) == before


async def test_reporter_token_checked_before_the_body(sessions_api: SessionStack) -> None:
    status, body = await post_raw(sessions_api, "guarded", doc(upstream_addr="example.com"))
    assert status == 401, body


@pytest.mark.parametrize(
    "headers",
    [{"X-Session-Token": REPORTER_TOKEN}, {"Authorization": f"Bearer {REPORTER_TOKEN}"}],
    ids=["x-session-token", "bearer"],
)
async def test_right_reporter_token_is_accepted(
    sessions_api: SessionStack, headers: dict[str, str]
) -> None:
    before = await stream_count(sessions_api.js)
    session_id = f"sess-token-{'bearer' if 'Authorization' in headers else 'header'}"
    status, body = await post_raw(sessions_api, "guarded", doc(session_id=session_id), headers)
    assert status == 202, body
    assert await stream_count(sessions_api.js) == before + 1
    # A bad body with the right token is still a 422 and still not published.
    status, body = await post_raw(sessions_api, "guarded", doc(upstream_port=0), headers)
    assert status == 422 and "upstream_port" in body["detail"]
    assert await stream_count(sessions_api.js) == before + 1
