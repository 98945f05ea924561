# ruff: noqa: E501  (the seed README's commands are kept verbatim)
"""Image licensing end to end, on the real stack (nats-server, database, moto S3, registry,
licensing and audit workers, api): the seed README's curl sequence as written, an encrypted
artifact fetched through its presigned URL and decrypted with the leased secret, every license
audit event in license.log and on the AUDIT stream, and, last, scans of the database, every
stream, every log and every file for the secrets, tokens and invite codes the module used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pyrage
import pytest
import pytest_asyncio
from yarl import URL

from shared.secrets_box import digest, key_id, normalize_invite
from tests.conftest import database_backends
from tests.harness import ADMIN_TOKEN, wait_for
from tests.licensing_stack import (
    BUCKET,
    LICENSE_AUDIT_EVENTS,
    AgeKey,
    LicensingStack,
    address,
    exercise_everything,
    identity_from_secret,
    licensing_stack,
    parse_time,
    unique,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORCH_ADMIN_MINTED = "orch-minted"
BOOTSTRAP = [{"orchestrator_id": ORCH_ADMIN_MINTED, "address": address(ORCH_ADMIN_MINTED)}]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LicensingStack]:
    tmp = tmp_path_factory.mktemp(f"licensing-flow-{request.param}")
    async with licensing_stack(request.param, tmp, bootstrap=BOOTSTRAP) as running:
        yield running


# -- the seed README's "Image Licensing" commands, verbatim ---------------------------------
# Only the placeholders are filled in: https://<payments>, <bucket>/<path>, <INVITE_CODE>,
# <orchestrator_id> and <lease_id>. Each block runs in its own bash, with the variables an
# operator's shell would hold by then (IMAGE_REF, PAYMENTS_ADMIN_TOKEN, ORCH_TOKEN).

README_REGISTER_IMAGE = r"""
IMAGE_REF="ghcr.io/its-define/unreal_vtuber/embody-ue-ps:enc-v1"
ARTIFACT_S3_URI="s3://<bucket>/<path>/embody-ue-ps.tar.zst.age"

# secret_b64 is expected to be base64(age-identity-file-bytes)
SECRET_B64="$(python3 - <<'PY'
import base64, pathlib
print(base64.b64encode(pathlib.Path("embody-ue-ps-enc-v1.agekey").read_bytes()).decode("ascii"))
PY
)"

curl -sS -X PUT \
  -H "X-Admin-Token: $PAYMENTS_ADMIN_TOKEN" \
  -H "Content-Type: application/json" \
  -d "{\"image_ref\":\"$IMAGE_REF\",\"secret_b64\":\"$SECRET_B64\",\"artifact_s3_uri\":\"$ARTIFACT_S3_URI\"}" \
  "https://<payments>/api/licenses/images"
"""

README_CREATE_INVITE = r"""
curl -sS -X POST \
  -H "X-Admin-Token: $PAYMENTS_ADMIN_TOKEN" \
  -H "Content-Type: application/json" \
  -d "{\"image_ref\":\"$IMAGE_REF\",\"bound_address\":\"0x1111111111111111111111111111111111111111\",\"ttl_seconds\":604800,\"note\":\"onboarding\"}" \
  "https://<payments>/api/licenses/invites"
"""

README_REDEEM = r"""
curl -sS -X POST \
  -H "Content-Type: application/json" \
  -d "{\"code\":\"<INVITE_CODE>\",\"orchestrator_id\":\"<orchestrator_id>\",\"address\":\"0x1111111111111111111111111111111111111111\"}" \
  "https://<payments>/api/licenses/invites/redeem"
"""

README_LEASE = r"""
curl -sS -X POST \
  -H "Authorization: Bearer $ORCH_TOKEN" \
  -H "Content-Type: application/json" \
  -d "{\"image_ref\":\"$IMAGE_REF\"}" \
  "https://<payments>/api/licenses/lease"
"""

README_HEARTBEAT = r"""
curl -sS -X POST -H "Authorization: Bearer $ORCH_TOKEN" \
  "https://<payments>/api/licenses/lease/<lease_id>/heartbeat"
"""

README_IMAGE_REF = "ghcr.io/its-define/unreal_vtuber/embody-ue-ps:enc-v1"
README_WALLET = "0x1111111111111111111111111111111111111111"


def run_readme_block(
    block: str, stack: LicensingStack, cwd: Path, fill: dict[str, str], **variables: str
) -> dict[str, Any]:
    script = block.replace("https://<payments>", stack.base)
    for placeholder, value in fill.items():
        script = script.replace(placeholder, value)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "PAYMENTS_ADMIN_TOKEN": ADMIN_TOKEN,
        "IMAGE_REF": README_IMAGE_REF,
        **variables,
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def test_seed_readme_curl_sequence(stack: LicensingStack, tmp_path: Path) -> None:
    key = AgeKey.generate()
    (tmp_path / "embody-ue-ps-enc-v1.agekey").write_bytes(key.file_bytes)
    stack.vault.secret(key.secret_b64)
    fill = {"<bucket>/<path>": f"{BUCKET}/readme"}

    async def run(block: str, **variables: str) -> dict[str, Any]:
        return await asyncio.to_thread(run_readme_block, block, stack, tmp_path, fill, **variables)

    image = await run(README_REGISTER_IMAGE)
    assert image["image_ref"] == README_IMAGE_REF
    assert image["secret_b64"] == key.secret_b64
    assert image["artifact_s3_uri"] == f"s3://{BUCKET}/readme/embody-ue-ps.tar.zst.age"

    invite = await run(README_CREATE_INVITE)
    stack.vault.invite(invite["code"])
    assert invite["image_ref"] == README_IMAGE_REF
    assert invite["bound_address"] == README_WALLET
    lifetime = parse_time(invite["expires_at"]) - parse_time(invite["created_at"])
    assert lifetime.total_seconds() == 604800

    fill["<INVITE_CODE>"] = invite["code"]
    fill["<orchestrator_id>"] = "readme-orchestrator"
    redeemed = await run(README_REDEEM)
    stack.vault.token(redeemed["token"])
    assert redeemed["orchestrator_id"] == "readme-orchestrator"
    assert redeemed["image_ref"] == README_IMAGE_REF
    assert redeemed["token"] and redeemed["token_id"]
    # The redemption registered the orchestrator with the invite's wallet.
    status, record = await stack.call(
        "GET", "/api/orchestrators/readme-orchestrator", None, {"X-Admin-Token": ADMIN_TOKEN}
    )
    assert status == 200 and record["address"] == README_WALLET, record

    lease = await run(README_LEASE, ORCH_TOKEN=redeemed["token"])
    assert lease["secret_b64"] == key.secret_b64
    assert lease["orchestrator_id"] == "readme-orchestrator"
    assert lease["image_ref"] == README_IMAGE_REF
    assert lease["lease_seconds"] == 900
    artifact = URL(lease["artifact_url"])
    assert artifact.path == f"/{BUCKET}/readme/embody-ue-ps.tar.zst.age"
    assert "X-Amz-Signature" in artifact.query

    fill["<lease_id>"] = lease["lease_id"]
    beat = await run(README_HEARTBEAT, ORCH_TOKEN=redeemed["token"])
    assert beat["lease_id"] == lease["lease_id"]
    assert beat["lease_seconds"] == 900
    assert parse_time(beat["expires_at"]) > parse_time(lease["expires_at"])
    assert "secret_b64" not in beat

    rows = await stack.rows("license_leases")
    (row,) = [row for row in rows if row["lease_id"] == lease["lease_id"]]
    assert parse_time(row["expires_at"]) == parse_time(beat["expires_at"])


async def test_encrypted_artifact_downloads_through_presigned_url_and_decrypts(
    stack: LicensingStack,
) -> None:
    payload = os.urandom(200_000) + b"container image layers"
    key = AgeKey.generate()
    encrypted = key.encrypt(payload)
    object_key = f"images/{unique('artifact')}.tar.zst.age"
    s3 = stack.moto.client()
    await asyncio.to_thread(s3.put_object, Bucket=BUCKET, Key=object_key, Body=encrypted)

    image_ref = f"ghcr.io/example/{unique('s3')}:enc-v1"
    await stack.put_image(image_ref, key.secret_b64, f"s3://{BUCKET}/{object_key}")
    orchestrator_id = unique("orch-s3")
    wallet = address(orchestrator_id)
    invite = await stack.create_invite(image_ref, wallet)
    status, redeemed = await stack.redeem(invite["code"], orchestrator_id, wallet)
    assert status == 200, redeemed

    status, lease = await stack.lease(redeemed["token"], image_ref)
    assert status == 200, lease
    url = URL(lease["artifact_url"], encoded=True)
    assert f"{url.scheme}://{url.host}:{url.port}" == stack.moto.endpoint
    assert url.path == f"/{BUCKET}/{object_key}"
    # A plain HTTP client, no AWS credentials: the URL alone grants the download.
    async with aiohttp.ClientSession() as plain, plain.get(url) as answer:
        assert answer.status == 200, await answer.text()
        downloaded = await answer.read()
    assert downloaded == encrypted

    identity = identity_from_secret(lease["secret_b64"])
    assert pyrage.decrypt(downloaded, [identity]) == payload
    # Someone else's identity does not open it.
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(downloaded, [AgeKey.generate().identity])

    # A second lease carries a freshly presigned URL that works as well.
    # Presigned URLs are stamped to the second: wait for the next one on the clock.
    next_second = int(time.time()) + 1

    async def next_second_began() -> bool:
        return time.time() >= next_second

    await wait_for(next_second_began, timeout_s=3.0)
    status, again = await stack.lease(redeemed["token"], image_ref)
    assert status == 200, again
    assert again["artifact_url"] != lease["artifact_url"]
    async with (
        aiohttp.ClientSession() as plain,
        plain.get(URL(again["artifact_url"], encoded=True)) as answer,
    ):
        assert answer.status == 200
        assert await answer.read() == encrypted


async def test_every_license_audit_event_reaches_the_log_and_the_stream(
    stack: LicensingStack,
) -> None:
    made = await exercise_everything(stack, ORCH_ADMIN_MINTED)
    done = made["onboarded"]
    await stack.audit_caught_up()

    records = stack.license_log_records()
    logged = {record["event"] for record in records}
    assert set(LICENSE_AUDIT_EVENTS) <= logged, sorted(set(LICENSE_AUDIT_EVENTS) - logged)
    messages = await stack.audit_messages()
    subjects = {subject for _, subject, _ in messages}
    expected_subjects = {f"audit.license.{event}" for event in LICENSE_AUDIT_EVENTS}
    assert expected_subjects <= subjects, sorted(expected_subjects - subjects)
    # Every license message on the stream is one line of the log, with the same content.
    streamed = {
        seq: body for seq, subject, body in messages if subject.startswith("audit.license.")
    }
    assert sorted(streamed) == sorted(record["stream_seq"] for record in records)
    for record in records:
        body = streamed[record["stream_seq"]]
        assert record["event"] == body["event"]
        assert body["fields"].items() <= record.items()
        assert record["timestamp"] and record["event_key"]

    def one(event: str, **match: str) -> dict[str, Any]:
        found = [r for r in records if r["event"] == event and match.items() <= r.items()]
        assert len(found) == 1, (event, match, found)
        return found[0]

    redeemed = one("invite_redeemed", invite_id=done.invite_id)
    assert redeemed["orchestrator_id"] == done.orchestrator_id
    assert redeemed["image_ref"] == done.image_ref
    assert redeemed["token_id"] == done.token_id
    assert redeemed["request_ip"] == "127.0.0.1"
    one("token_minted", orchestrator_id=done.orchestrator_id, token_id=done.token_id)
    one("access_granted", orchestrator_id=done.orchestrator_id, image_ref=done.image_ref)
    created = one("invite_created", invite_id=done.invite_id)
    assert created["image_ref"] == done.image_ref and created["expires_at"]
    issued = one("lease_issued", lease_id=made["lease_id"])
    assert issued["orchestrator_id"] == done.orchestrator_id
    assert issued["image_ref"] == done.image_ref
    assert issued["request_ip"] == "127.0.0.1"
    one("lease_heartbeat", lease_id=made["lease_id"], request_ip="127.0.0.1")
    one("token_revoked", orchestrator_id=ORCH_ADMIN_MINTED, token_id=made["minted_token_id"])
    one("access_revoked", orchestrator_id=ORCH_ADMIN_MINTED, image_ref=made["generated_image"])
    one("image_revoked", image_ref=made["generated_image"])
    one("invite_revoked", invite_id=made["spare_invite_id"])
    assert [r for r in records if r["event"] == "image_upserted"]


async def test_database_holds_no_plaintext_secret_token_or_invite_code(
    stack: LicensingStack,
) -> None:
    made = await exercise_everything(stack, ORCH_ADMIN_MINTED)
    done = made["onboarded"]
    await stack.outbox_drained()

    # Stored forms: tokens and codes as sha256 only, secrets sealed under the configured key.
    tokens = {row["token_id"]: row for row in await stack.rows("orchestrator_tokens")}
    assert tokens[done.token_id]["token_hash"] == digest(done.token)
    invites = {row["invite_id"]: row for row in await stack.rows("license_invites")}
    assert invites[done.invite_id]["code_hash"] == digest(normalize_invite(done.code))
    images = {row["image_ref"]: row for row in await stack.rows("license_images")}
    sealed = bytes(images[done.image_ref]["secret_sealed"])
    assert sealed[:8] == key_id(base64.b64decode(stack.secret_key))
    assert done.key.file_bytes not in sealed

    # No table, row or column holds any secret in any form (raw, base64, hex, the age key line).
    tables = await stack.table_names()
    assert {"license_images", "orchestrator_tokens", "license_invites", "outbox"} <= set(tables)
    leaks = await stack.scan_database()
    assert leaks == {}, leaks


async def test_no_secret_in_any_stream_log_file_or_table(stack: LicensingStack) -> None:
    """Runs last: everything the module did (plus one more full pass) is in the scan."""
    await exercise_everything(stack, ORCH_ADMIN_MINTED)
    labels = list(stack.vault.needles)
    minimum = {"secret_b64": 3, "secret_raw": 3, "age_identity": 1, "token": 2, "invite_code": 2}
    for kind, count in minimum.items():
        assert sum(label.startswith(kind) for label in labels) >= count, (kind, labels)
    # The scanner finds what it looks for.
    sample = next(n for label, n in stack.vault.needles.items() if label.startswith("token"))
    assert stack.vault.find_in(b"prefix " + sample + b" suffix")

    leaks = await stack.scan_for_secrets()
    assert leaks == {}, leaks
    stack.assert_scan_covered_everything()
