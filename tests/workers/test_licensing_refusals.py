"""Image licensing refusals on the real stack: each gets the original's status and `detail`,
and changes nothing (no licensing row, no registration, no audit event), except the refusals
that are documented to end leases. Two licensing worker copies answer, so concurrent
redemptions race across processes. The module ends with a leak scan of its stack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import database_backends
from tests.licensing_stack import (
    ADMIN,
    LicensingStack,
    Onboarded,
    address,
    licensing_stack,
    onboard,
    unique,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BYSTANDER = "orch-bystander"
BOOTSTRAP = [{"orchestrator_id": BYSTANDER, "address": address(BYSTANDER)}]
REDEEM_LIMIT = 3
TOKEN_REQUIRED = {"detail": "Orchestrator token required"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LicensingStack]:
    tmp = tmp_path_factory.mktemp(f"licensing-refusals-{request.param}")
    async with licensing_stack(
        request.param,
        tmp,
        bootstrap=BOOTSTRAP,
        licensing_copies=2,
        s3=False,
        extra_apis={"limited": {"PAYMENTS_LICENSE_REDEEM_PER_MINUTE": str(REDEEM_LIMIT)}},
    ) as running:
        yield running


async def new_image(stack: LicensingStack) -> str:
    image_ref = f"ghcr.io/example/{unique('refusals')}:v1"
    await stack.put_image(image_ref)
    return image_ref


async def registered(stack: LicensingStack, orchestrator_id: str) -> bool:
    return await stack.orchestrator_registered(orchestrator_id)


# -- invites --------------------------------------------------------------------------------


async def test_wrong_wallet_is_refused_with_403_and_changes_nothing(stack: LicensingStack) -> None:
    image_ref = await new_image(stack)
    invite = await stack.create_invite(image_ref, address(unique("bound")))
    orchestrator_id = unique("orch-wrong-wallet")
    async with stack.unchanged():
        status, body = await stack.redeem(invite["code"], orchestrator_id, address("somebody-else"))
    assert (status, body) == (403, {"detail": "Wallet address does not match this invite code"})
    assert not await registered(stack, orchestrator_id)


async def test_unknown_code_is_refused_with_404(stack: LicensingStack) -> None:
    async with stack.unchanged():
        status, body = await stack.redeem("ABCD-EFGH-JKLM-NPQR-STUV", unique("orch"), address("x"))
    assert (status, body) == (404, {"detail": "Invite not found"})


async def test_expired_invite_is_refused_with_410_and_changes_nothing(
    stack: LicensingStack,
) -> None:
    image_ref = await new_image(stack)
    wallet = address(unique("expired"))
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    invite = await stack.create_invite(image_ref, wallet, expires_at=past)
    orchestrator_id = unique("orch-expired")
    async with stack.unchanged():
        status, body = await stack.redeem(invite["code"], orchestrator_id, wallet)
    assert (status, body) == (410, {"detail": "Invite expired"})
    assert not await registered(stack, orchestrator_id)


async def test_revoked_invite_is_refused_with_403_and_changes_nothing(
    stack: LicensingStack,
) -> None:
    image_ref = await new_image(stack)
    wallet = address(unique("revoked"))
    invite = await stack.create_invite(image_ref, wallet)
    await stack.admin("POST", "/api/licenses/invites/revoke", {"invite_id": invite["invite_id"]})
    orchestrator_id = unique("orch-revoked-invite")
    async with stack.unchanged():
        status, body = await stack.redeem(invite["code"], orchestrator_id, wallet)
    assert (status, body) == (403, {"detail": "Invite revoked"})
    assert not await registered(stack, orchestrator_id)


async def test_reused_invite_is_refused_with_409_and_changes_nothing(
    stack: LicensingStack,
) -> None:
    done = await onboard(stack, "reused")
    for orchestrator_id in (done.orchestrator_id, unique("orch-second-comer")):
        async with stack.unchanged():
            status, body = await stack.redeem(done.code, orchestrator_id, done.wallet)
        assert (status, body) == (409, {"detail": "Invite already redeemed"})
    tokens = [r for r in await stack.rows("orchestrator_tokens") if r["token_id"] == done.token_id]
    assert len(tokens) == 1


async def test_concurrent_redemptions_of_one_code_have_exactly_one_winner(
    stack: LicensingStack,
) -> None:
    image_ref = await new_image(stack)
    wallets = [address(unique("race")) for _ in range(4)]
    invites = [await stack.create_invite(image_ref, wallet) for wallet in wallets]
    contenders = [(unique("orch-race-a"), unique("orch-race-b")) for _ in invites]
    await stack.outbox_drained()
    tokens_before = len(await stack.rows("orchestrator_tokens"))

    attempts = [
        stack.redeem(invite["code"], orchestrator_id, wallet)
        for invite, wallet, pair in zip(invites, wallets, contenders, strict=True)
        for orchestrator_id in pair
    ]
    answers = await asyncio.gather(*attempts)

    invite_rows = {row["invite_id"]: row for row in await stack.rows("license_invites")}
    access = await stack.rows("license_access")
    for index, invite in enumerate(invites):
        pair = answers[2 * index : 2 * index + 2]
        statuses = sorted(status for status, _ in pair)
        assert statuses == [200, 409], pair
        (winner_body,) = [body for status, body in pair if status == 200]
        (loser_body,) = [body for status, body in pair if status == 409]
        assert loser_body["detail"] in {
            "Invite already redeemed",
            "Invite redemption already in progress",
        }
        winner = winner_body["orchestrator_id"]
        (loser,) = [o for o in contenders[index] if o != winner]
        row = invite_rows[invite["invite_id"]]
        assert row["redeemed_by"] == winner
        assert row["redeemed_token_id"] == winner_body["token_id"]
        assert row["redeeming_at"] is None
        assert await registered(stack, winner)
        assert not await registered(stack, loser)
        assert [
            a["orchestrator_id"] for a in access if a["orchestrator_id"] in (winner, loser)
        ] == [winner]
    assert len(await stack.rows("orchestrator_tokens")) == tokens_before + len(invites)


async def test_redeem_is_rate_limited_per_client_ip(stack: LicensingStack) -> None:
    limited = stack.apis["limited"]
    image_ref = await new_image(stack)
    wallet = address(unique("limited"))
    invite = await stack.create_invite(image_ref, wallet)
    orchestrator_id = unique("orch-limited")
    async with stack.unchanged():
        for _ in range(REDEEM_LIMIT):
            status, body = await stack.redeem(
                "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ", unique("orch"), wallet, base=limited
            )
            assert (status, body) == (404, {"detail": "Invite not found"})
        status, body = await stack.redeem(invite["code"], orchestrator_id, wallet, base=limited)
        assert (status, body) == (429, {"detail": "Too many attempts; slow down"})
        # X-Forwarded-For from an untrusted peer does not buy a fresh allowance.
        spoofed = {"Content-Type": "application/json", "X-Forwarded-For": "198.51.100.9"}
        request = {"code": invite["code"], "orchestrator_id": orchestrator_id, "address": wallet}
        status, body = await stack.call(
            "POST", "/api/licenses/invites/redeem", request, spoofed, limited
        )
        assert (status, body) == (429, {"detail": "Too many attempts; slow down"})
    # The refused code was not consumed: it still redeems (the other api has its own limit).
    status, body = await stack.redeem(invite["code"], orchestrator_id, wallet)
    assert status == 200, body


async def refusal(
    stack: LicensingStack, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, str]:
    """(status, detail) of a refused request, whose answer echoes no secret."""
    status, answer = await stack.call(method, path, body, headers)
    assert not stack.vault.find_in(json.dumps(answer).encode()), answer
    assert isinstance(answer["detail"], str) and answer["detail"], answer
    return status, answer["detail"]


async def test_bad_admin_input_gets_a_clear_4xx_and_changes_nothing(
    stack: LicensingStack,
) -> None:
    image_ref = await new_image(stack)
    not_base64 = "!!" + base64.b64encode(os.urandom(40)).decode() + "!!"
    short = base64.b64encode(os.urandom(16)).decode()
    too_long = base64.b64encode(os.urandom(2000)).decode()
    for secret in (not_base64, short, too_long):
        stack.vault.add("refused_secret", secret)
    wallet = address(unique("bad-input"))
    json_only = {"Content-Type": "application/json"}

    async def put(headers: dict[str, str] = ADMIN, **fields: Any) -> tuple[int, str]:
        body = {"image_ref": image_ref, **fields}
        return await refusal(stack, "PUT", "/api/licenses/images", body, headers)

    async def invite(headers: dict[str, str] = ADMIN, **fields: Any) -> tuple[int, str]:
        body = {"image_ref": image_ref, "bound_address": wallet, **fields}
        return await refusal(stack, "POST", "/api/licenses/invites", body, headers)

    async with stack.unchanged():
        assert await put(secret_b64=not_base64) == (400, "secret_b64 must be valid base64")
        assert await put(secret_b64=short) == (
            400,
            "secret_b64 must decode to at least 32 bytes",
        )
        assert (await put(secret_b64=too_long))[0] == 422
        assert await put(artifact_s3_uri="https://b/k") == (400, "Expected s3:// URI")
        assert await put(json_only, secret_b64=short) == (401, "Admin token required")
        wrong_admin = {**json_only, "X-Admin-Token": "wrong"}
        assert await invite(wrong_admin) == (401, "Admin token required")
        assert (await invite(ttl_seconds=600, expires_at="2030-01-01T00:00:00Z"))[0] == 422
        assert (await invite(ttl_seconds=5))[0] == 422
        assert await invite(image_ref=unique("no-such")) == (404, "Image not found")
        assert await invite(expires_at="next tuesday") == (
            400,
            "Invalid expires_at; expected an ISO 8601 timestamp",
        )
        assert (await invite(bound_address="0x1234"))[0] == 422
        no_address = {"code": "ABCD-EFGH", "orchestrator_id": "x"}
        redeem = await refusal(stack, "POST", "/api/licenses/invites/redeem", no_address, json_only)
        assert redeem[0] == 422


# -- tokens ---------------------------------------------------------------------------------


async def test_missing_token_is_refused_with_401(stack: LicensingStack) -> None:
    done = await onboard(stack, "missing-token")
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease
    async with stack.unchanged():
        assert await stack.lease(None, done.image_ref) == (401, TOKEN_REQUIRED)
        assert await stack.heartbeat(None, lease["lease_id"]) == (401, TOKEN_REQUIRED)
        basic = {"Content-Type": "application/json", "Authorization": f"Basic {done.token}"}
        status, body = await stack.call(
            "POST", "/api/licenses/lease", {"image_ref": done.image_ref}, basic
        )
        assert (status, body) == (401, TOKEN_REQUIRED)
        assert await stack.lease("not-a-token", done.image_ref) == (401, TOKEN_REQUIRED)


async def test_revoked_token_is_refused_with_401_and_changes_nothing(
    stack: LicensingStack,
) -> None:
    done = await onboard(stack, "revoked-token")
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease
    path = f"/api/licenses/orchestrators/{done.orchestrator_id}/tokens/{done.token_id}"
    assert await stack.admin("DELETE", path) == {"ok": True}
    async with stack.unchanged():
        assert await stack.lease(done.token, done.image_ref) == (401, TOKEN_REQUIRED)
        assert await stack.heartbeat(done.token, lease["lease_id"]) == (401, TOKEN_REQUIRED)
        x_header = {"Content-Type": "application/json", "X-Orchestrator-Token": done.token}
        status, body = await stack.call(
            "POST", "/api/licenses/lease", {"image_ref": done.image_ref}, x_header
        )
        assert (status, body) == (401, TOKEN_REQUIRED)
    tokens = await stack.admin("GET", f"/api/licenses/orchestrators/{done.orchestrator_id}/tokens")
    (listed,) = [t for t in tokens["tokens"] if t["token_id"] == done.token_id]
    assert listed["revoked_at"] is not None
    assert "token" not in listed and "token_hash" not in listed


async def test_token_revoke_through_another_orchestrators_path_is_404(
    stack: LicensingStack,
) -> None:
    done = await onboard(stack, "wrong-path")
    async with stack.unchanged():
        status, body = await stack.call(
            "DELETE", f"/api/licenses/orchestrators/{BYSTANDER}/tokens/{done.token_id}", None, ADMIN
        )
        assert (status, body) == (404, {"detail": "Token not found"})
    # The token still works.
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease


# -- leases ---------------------------------------------------------------------------------


async def test_heartbeat_of_another_orchestrators_lease_is_403(stack: LicensingStack) -> None:
    owner = await onboard(stack, "lease-owner")
    other = await onboard(stack, "lease-other")
    status, lease = await stack.lease(owner.token, owner.image_ref)
    assert status == 200, lease
    async with stack.unchanged():
        status, body = await stack.heartbeat(other.token, lease["lease_id"])
        assert (status, body) == (403, {"detail": "Lease not found"})
        status, body = await stack.heartbeat(other.token, "0" * 32)
        assert (status, body) == (404, {"detail": "Lease not found"})
        # Nor can it lease an image it was not granted.
        status, body = await stack.lease(other.token, owner.image_ref)
        assert (status, body) == (403, {"detail": "Image access denied"})
    status, beat = await stack.heartbeat(owner.token, lease["lease_id"])
    assert status == 200, beat


async def lease_row(stack: LicensingStack, lease_id: str) -> dict[str, Any]:
    (row,) = [row for row in await stack.rows("license_leases") if row["lease_id"] == lease_id]
    return row


async def active_lease_ids(stack: LicensingStack, done: Onboarded) -> set[str]:
    status, body = await stack.call(
        "GET", f"/api/licenses/leases?orchestrator_id={done.orchestrator_id}", None, ADMIN
    )
    assert status == 200, body
    return {lease["lease_id"] for lease in body["leases"]}


async def test_revoking_an_image_ends_its_leases(stack: LicensingStack) -> None:
    done = await onboard(stack, "image-revoked")
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease
    assert await active_lease_ids(stack, done) == {lease["lease_id"]}

    wallet = address(unique("late-comer"))
    late_invite = await stack.create_invite(done.image_ref, wallet)
    await stack.admin("POST", "/api/licenses/images/revoke", {"image_ref": done.image_ref})
    row = await lease_row(stack, lease["lease_id"])
    assert row["revoked_at"] is not None and row["end_reason"] == "image_revoked"
    assert await active_lease_ids(stack, done) == set()
    async with stack.unchanged():
        status, body = await stack.heartbeat(done.token, lease["lease_id"])
        assert status == 403, body
        status, body = await stack.lease(done.token, done.image_ref)
        assert (status, body) == (403, {"detail": "Image access revoked"})
        status, body = await stack.redeem(late_invite["code"], unique("orch-late"), wallet)
        assert (status, body) == (403, {"detail": "Image access revoked"})
    status, body = await stack.call(
        "POST", "/api/licenses/images/revoke", {"image_ref": unique("no-such-image")}, ADMIN
    )
    assert (status, body) == (404, {"detail": "Image not found"})


async def test_withdrawing_access_ends_the_leases_too(stack: LicensingStack) -> None:
    done = await onboard(stack, "access-revoked")
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease
    grant = {"orchestrator_id": done.orchestrator_id, "image_ref": done.image_ref}
    access = await stack.admin("POST", "/api/licenses/access/revoke", grant)
    assert done.image_ref not in access["access"].get(done.orchestrator_id, [])
    row = await lease_row(stack, lease["lease_id"])
    assert row["revoked_at"] is not None and row["end_reason"] == "access_revoked"
    assert await active_lease_ids(stack, done) == set()
    async with stack.unchanged():
        status, body = await stack.heartbeat(done.token, lease["lease_id"])
        assert status == 403, body
        status, body = await stack.lease(done.token, done.image_ref)
        assert (status, body) == (403, {"detail": "Image access denied"})


async def test_no_secret_leaked_by_any_refusal(stack: LicensingStack) -> None:
    """Runs last: every request above carried a secret, a token or an invite code."""
    assert len(stack.vault.needles) > 40
    leaks = await stack.scan_for_secrets()
    assert leaks == {}, leaks
    stack.assert_scan_covered_everything()
