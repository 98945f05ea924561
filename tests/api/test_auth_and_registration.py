"""Auth is secure by default, X-Forwarded-For is believed only from trusted proxies, and public
registration is a command answered by the registry worker (denylist, rank, rate limits).

The stack (tests/api/conftest.py) runs several api processes that differ only in their auth
settings, beside the api under test.
"""

from __future__ import annotations

from typing import Any

import pytest

from contracts import subjects
from contracts.events import AuditEventV1
from contracts.streams import AUDIT, HEALTH, REGISTRY
from tests.api.conftest import (
    DENIED_ADDRESS,
    HEALTH_URL,
    MANAGER_IP,
    ORCH_ID,
    PUBLIC_IP,
    VIEWER_TOKENS,
)
from tests.e2e import (
    Answer,
    Stack,
    call,
    inbox_rows,
    orchestrator_row,
    post_health,
    stream_count,
)
from tests.harness import ADMIN_TOKEN, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="package")

REDACTED = ("host_public_ip", "last_seen_ip", "health_url")


def base(stack: Stack, variant: str) -> str:
    return stack.apis[variant]


async def get(stack: Stack, url: str, token: str | None = ADMIN_TOKEN, **extra: str) -> Answer:
    headers = {**extra}
    if token is not None:
        headers["X-Admin-Token"] = token
    return await call(stack.http, "GET", url, headers=headers)


# -- secure by default --------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", ADMIN_TOKEN, "guess"], ids=repr)
async def test_without_an_admin_token_admin_and_viewer_routes_refuse(
    stack: Stack, token: str | None
) -> None:
    api = base(stack, "no-token")
    before = await stream_count(stack.js, HEALTH.name)
    for url in (f"{api}/api/orchestrators", f"{api}/api/orchestrators/{ORCH_ID}"):
        answer = await get(stack, url, token)
        assert (answer.status, answer.body) == (401, {"detail": "Admin token required"}), url
    posted = await post_health(stack, ORCH_ID, base=api, token=token)
    assert (posted.status, posted.body) == (401, {"detail": "Admin token required"})
    assert await stream_count(stack.js, HEALTH.name) == before
    assert (await call(stack.http, "GET", f"{api}/healthz")).status == 200


async def test_insecure_dev_mode_without_a_token_opens_them(stack: Stack) -> None:
    api = base(stack, "dev-open")
    listing = await get(stack, f"{api}/api/orchestrators", token=None)
    assert listing.status == 200, listing
    assert [o["orchestrator_id"] for o in listing.body["orchestrators"]] == [ORCH_ID]
    assert (await get(stack, f"{api}/api/orchestrators/{ORCH_ID}", token=None)).status == 200
    before = await stream_count(stack.js, HEALTH.name)
    posted = await post_health(stack, ORCH_ID, base=api, token=None, key="dev-mode-1")
    assert posted.status == 202, posted
    assert await stream_count(stack.js, HEALTH.name) == before + 1
    await wait_for(lambda: inbox_rows(stack, posted.body["event_key"]), timeout_s=15)


async def test_viewer_tokens_read_but_cannot_post_health(stack: Stack) -> None:
    api = base(stack, "viewers")
    for token in (*VIEWER_TOKENS, ADMIN_TOKEN):
        assert (await get(stack, f"{api}/api/orchestrators", token)).status == 200, token
        assert (await get(stack, f"{api}/api/orchestrators/{ORCH_ID}", token)).status == 200
    for token in (None, "viewer-three", "viewer-one viewer-two"):
        refused = await get(stack, f"{api}/api/orchestrators", token)
        assert (refused.status, refused.body) == (401, {"detail": "Viewer token required"})

    before = await stream_count(stack.js, HEALTH.name)
    for token in VIEWER_TOKENS:
        posted = await post_health(stack, ORCH_ID, base=api, token=token)
        assert (posted.status, posted.body) == (401, {"detail": "Admin token required"})
    assert await stream_count(stack.js, HEALTH.name) == before
    control = await post_health(stack, ORCH_ID, base=api, key="viewers-control")
    assert control.status == 202 and control.body["duplicate"] is False, control
    assert await stream_count(stack.js, HEALTH.name) == before + 1


# -- X-Forwarded-For only from trusted proxies ----------------------------------------------------


async def record_seen_by(
    stack: Stack, variant: str | None, forwarded_for: str | None
) -> dict[str, Any]:
    extra = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    api = base(stack, variant) if variant else stack.base
    one = await get(stack, f"{api}/api/orchestrators/{ORCH_ID}", **extra)
    listing = await get(stack, f"{api}/api/orchestrators", **extra)
    assert one.status == 200 and listing.status == 200, (one, listing)
    assert listing.body["orchestrators"] == [one.body]
    return dict(one.body)


def redacted(record: dict[str, Any]) -> bool:
    hidden = all(record[name] is None for name in REDACTED)
    return hidden and "ip" not in record["forwarder_health"]["data"]


async def test_forwarded_for_is_believed_only_from_trusted_proxies(stack: Stack) -> None:
    # A report that carries the orchestrator's IP, so the forwarder data is redacted too.
    posted = await post_health(stack, ORCH_ID, key="xff-report")
    assert posted.status == 202, posted
    await wait_for(lambda: inbox_rows(stack, posted.body["event_key"]), timeout_s=15)
    row = await orchestrator_row(stack, ORCH_ID)
    assert row is not None and row.host_public_ip == PUBLIC_IP and row.health_url == HEALTH_URL
    assert row.last_seen_ip

    # Without an allowlist (the stack's own api) nothing is redacted.
    full = await record_seen_by(stack, None, None)
    assert [full[name] for name in REDACTED] == [PUBLIC_IP, row.last_seen_ip, HEALTH_URL]
    assert full["forwarder_health"]["data"]["ip"] == row.last_seen_ip

    # The peer (127.0.0.1) is not a trusted proxy: its X-Forwarded-For is ignored.
    for forwarded in (MANAGER_IP, None):
        assert redacted(await record_seen_by(stack, "viewers", forwarded)), forwarded

    # Behind a trusted proxy the first X-Forwarded-For entry is the caller.
    trusted = await record_seen_by(stack, "trusted-proxy", MANAGER_IP)
    assert {name: trusted[name] for name in REDACTED} == {name: full[name] for name in REDACTED}
    assert trusted["forwarder_health"] == full["forwarder_health"]
    chained = await record_seen_by(stack, "trusted-proxy", f"{MANAGER_IP}, 127.0.0.1")
    assert not redacted(chained)
    for forwarded in ("10.1.1.1", f"127.0.0.1, {MANAGER_IP}", "not-an-ip", None):
        assert redacted(await record_seen_by(stack, "trusted-proxy", forwarded)), forwarded


# -- registration: a command answered by the registry worker --------------------------------------


async def register(stack: Stack, api: str, orchestrator_id: str, address: str) -> Answer:
    return await call(
        stack.http,
        "POST",
        f"{api}/api/orchestrators/register",
        json={"orchestrator_id": orchestrator_id, "address": address},
    )


async def test_denylisted_address_is_refused_and_audited(stack: Stack) -> None:
    denied_subject = subjects.audit("registry", "register_denied")
    audits_before = await stream_count(stack.js, AUDIT.name, denied_subject)
    answer = await register(stack, stack.base, "orch-denied", DENIED_ADDRESS)
    assert (answer.status, answer.body) == (
        403,
        {"detail": "Address is denylisted and cannot register"},
    )

    async def audited() -> bool:
        return await stream_count(stack.js, AUDIT.name, denied_subject) == audits_before + 1

    await wait_for(audited, timeout_s=15)
    message = await stack.js.get_last_msg(AUDIT.name, denied_subject)
    audit = AuditEventV1.model_validate_json(message.data or b"")
    assert (audit.domain, audit.event) == ("registry", "register_denied")
    assert audit.fields["orchestrator_id"] == "orch-denied"
    assert audit.fields["address"] == DENIED_ADDRESS.lower()
    assert await orchestrator_row(stack, "orch-denied") is None
    missing = await get(stack, f"{stack.base}/api/orchestrators/orch-denied")
    assert (missing.status, missing.body) == (404, {"detail": "Not found"})


async def test_rank_unknown_answers_503_and_registers_nothing(stack: Stack) -> None:
    before = await stream_count(stack.js, REGISTRY.name)
    answer = await register(stack, stack.base, "orch-new", "0x" + "7" * 40)
    assert answer.status == 503, answer
    assert answer.body == {"detail": "Unable to validate orchestrator rank at this time"}
    assert answer.headers.get("Retry-After") == "2"
    assert await stream_count(stack.js, REGISTRY.name) == before
    assert await orchestrator_row(stack, "orch-new") is None


async def test_invalid_registration_is_422_and_asks_no_worker(stack: Stack) -> None:
    before = await stream_count(stack.js, REGISTRY.name)
    answer = await register(stack, stack.base, "orch-bad", "0x1234")
    assert answer.status == 422, answer
    assert "address" in answer.body["detail"]
    assert await stream_count(stack.js, REGISTRY.name) == before


async def test_registration_attempts_beyond_the_burst_get_429(stack: Stack) -> None:
    api = base(stack, "viewers")
    statuses = []
    for attempt in range(4):
        answer = await register(stack, api, f"orch-burst-{attempt}", "0x" + "8" * 40)
        statuses.append(answer.status)
        if answer.status == 429:
            assert answer.body == {"detail": "Too many registration attempts; slow down"}
    assert statuses == [503, 503, 429, 429]
