"""PAYMENTS_SECRET_KEY on the real stack: `payments secrets rotate` re-seals every image secret
under a new key while the old one still opens them; a worker with only the new key leases the
same secrets, a worker with only the old key answers 503, and a worker with no key answers 503
with a clear message to every licensing command and changes nothing.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shared.secrets_box import key_id
from tests.conftest import database_backends
from tests.licensing_stack import (
    ADMIN,
    AgeKey,
    LicensingStack,
    address,
    licensing_stack,
    new_secret_key,
    onboard,
    run_cli,
    unique,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

GRANTEE = "orch-grantee"
BOOTSTRAP = [{"orchestrator_id": GRANTEE, "address": address(GRANTEE)}]
NOT_CONFIGURED = {"detail": "Licensing is not configured: PAYMENTS_SECRET_KEY is unset"}
CANNOT_OPEN = {"detail": "no configured key opens this secret (rotated away?)"}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LicensingStack]:
    tmp: Path = tmp_path_factory.mktemp(f"licensing-keys-{request.param}")
    async with licensing_stack(request.param, tmp, bootstrap=BOOTSTRAP, s3=False) as running:
        yield running


async def sealed_rows(stack: LicensingStack) -> dict[str, bytes]:
    return {
        row["image_ref"]: bytes(row["secret_sealed"]) for row in await stack.rows("license_images")
    }


def rotate(stack: LicensingStack, current: str, previous: str | None = None) -> tuple[int, str]:
    env = {**stack.env, "PAYMENTS_SECRET_KEY": current}
    env.pop("PAYMENTS_SECRET_KEY_PREVIOUS", None)
    if previous is not None:
        env["PAYMENTS_SECRET_KEY_PREVIOUS"] = previous
    done = run_cli(env, "secrets", "rotate")
    output = done.stdout + done.stderr
    assert not stack.vault.find_in(output.encode()), output
    return done.returncode, output.strip()


async def test_rotation_reseals_every_secret_and_only_the_new_key_opens_them(
    stack: LicensingStack,
) -> None:
    key_a = stack.secret_key
    key_b, key_c = new_secret_key(), new_secret_key()
    stack.vault.add("secret_key", key_b)
    stack.vault.add("secret_key", key_c)

    # Three images sealed under A, all granted to one orchestrator; the A worker leases them.
    done = await onboard(stack, "rotation")
    keys = {done.image_ref: done.key}
    for _ in range(2):
        key = AgeKey.generate()
        image_ref = f"ghcr.io/example/{unique('rotation')}:v1"
        await stack.put_image(image_ref, key.secret_b64)
        grant = {"orchestrator_id": done.orchestrator_id, "image_ref": image_ref}
        await stack.admin("POST", "/api/licenses/access/grant", grant)
        keys[image_ref] = key
    for image_ref, key in keys.items():
        status, lease = await stack.lease(done.token, image_ref)
        assert status == 200, lease
        assert lease["secret_b64"] == key.secret_b64
    under_a = await sealed_rows(stack)
    assert {sealed[:8] for sealed in under_a.values()} == {key_id(base64.b64decode(key_a))}

    # Rotate to B while A is still the running worker's only key: nothing is restarted.
    assert rotate(stack, key_b, key_a) == (
        0,
        f"re-sealed {len(keys)} image secrets; 0 were already under the current key",
    )
    under_b = await sealed_rows(stack)
    assert set(under_b) == set(under_a)
    for image_ref, sealed in under_b.items():
        assert sealed[:8] == key_id(base64.b64decode(key_b))
        assert sealed != under_a[image_ref]
    # Rotating again finds nothing to do.
    assert rotate(stack, key_b, key_a) == (
        0,
        f"re-sealed 0 image secrets; {len(keys)} were already under the current key",
    )
    # A key that opens nothing fails the whole rotation and changes no row.
    status, output = rotate(stack, key_c)
    assert status == 1 and output.startswith("rotation failed:"), output
    assert await sealed_rows(stack) == under_b

    # The worker that only knows A can no longer open them: 503, and no lease is issued.
    async with stack.unchanged():
        for image_ref in keys:
            assert await stack.lease(done.token, image_ref) == (503, CANNOT_OPEN)

    # A worker with only B leases the very same secrets.
    await stack.stop_worker("licensing")
    await stack.start_worker("licensing", PAYMENTS_SECRET_KEY=key_b)
    for image_ref, key in keys.items():
        status, lease = await stack.lease(done.token, image_ref)
        assert status == 200, lease
        assert lease["secret_b64"] == key.secret_b64
    # New images are sealed under B.
    fresh = await stack.put_image(f"ghcr.io/example/{unique('after-rotation')}:v1")
    assert (await sealed_rows(stack))[fresh["image_ref"]][:8] == key_id(base64.b64decode(key_b))


async def test_every_licensing_command_answers_503_while_the_key_is_unset(
    stack: LicensingStack,
) -> None:
    done = await onboard(stack, "unset")
    invite = await stack.create_invite(done.image_ref, address(unique("unset-wallet")))
    status, lease = await stack.lease(done.token, done.image_ref)
    assert status == 200, lease

    await stack.stop_worker("licensing")
    worker = await stack.start_worker("licensing", PAYMENTS_SECRET_KEY="")
    assert NOT_CONFIGURED["detail"] in worker.log_text()

    token = {"Content-Type": "application/json", "Authorization": f"Bearer {done.token}"}
    requests = [
        ("PUT", "/api/licenses/images", {"image_ref": unique("image")}, ADMIN),
        ("POST", "/api/licenses/images/revoke", {"image_ref": done.image_ref}, ADMIN),
        (
            "POST",
            "/api/licenses/access/grant",
            {"orchestrator_id": GRANTEE, "image_ref": done.image_ref},
            ADMIN,
        ),
        (
            "POST",
            "/api/licenses/access/revoke",
            {"orchestrator_id": done.orchestrator_id, "image_ref": done.image_ref},
            ADMIN,
        ),
        ("POST", f"/api/licenses/orchestrators/{GRANTEE}/tokens", None, ADMIN),
        (
            "DELETE",
            f"/api/licenses/orchestrators/{done.orchestrator_id}/tokens/{done.token_id}",
            None,
            ADMIN,
        ),
        (
            "POST",
            "/api/licenses/invites",
            {"image_ref": done.image_ref, "bound_address": address("x")},
            ADMIN,
        ),
        ("POST", "/api/licenses/invites/revoke", {"invite_id": invite["invite_id"]}, ADMIN),
        (
            "POST",
            "/api/licenses/invites/redeem",
            {
                "code": invite["code"],
                "orchestrator_id": unique("orch"),
                "address": address(unique("w")),
            },
            {"Content-Type": "application/json"},
        ),
        ("POST", "/api/licenses/lease", {"image_ref": done.image_ref}, token),
        ("POST", f"/api/licenses/lease/{lease['lease_id']}/heartbeat", None, token),
    ]
    async with stack.unchanged():
        for method, path, body, headers in requests:
            async with stack.http.request(
                method, f"{stack.base}{path}", json=body, headers=headers
            ) as answer:
                assert answer.status == 503, (path, await answer.text())
                assert await answer.json() == NOT_CONFIGURED, path
                assert answer.headers.get("Retry-After"), path
    # Reads do not need the key.
    status, images = await stack.call("GET", "/api/licenses/images", None, ADMIN)
    assert status == 200 and done.image_ref in {i["image_ref"] for i in images["images"]}


async def test_no_secret_or_key_leaked(stack: LicensingStack) -> None:
    """Runs last: the keys themselves are secrets too."""
    leaks = await stack.scan_for_secrets()
    assert leaks == {}, leaks
    stack.assert_scan_covered_everything()
