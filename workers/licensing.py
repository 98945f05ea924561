"""Licensing worker: the license and key service for public-but-encrypted container images.

Consumes
  - core NATS requests on `licensing.commands.<name>` (queue group `licensing`), sent by the api:
    image.put/revoke, access.grant/revoke, token.mint/revoke, invite.create/revoke/redeem,
    lease.take/heartbeat. Each answer is a CommandReply (status and body) the api relays.
  - SESSIONS `sessions.ticks.0` through durable `licensing-ticks`: a tick ends the leases that
    expired by its time.

Produces
  - the licensing tables (secrets sealed with PAYMENTS_SECRET_KEY, tokens and invite codes as
    sha256 only), and registrations through REGISTRY when an invite is redeemed;
  - AUDIT `audit.license.<event>` through the outbox, with identifiers only (the audit worker
    writes them to data/audit/license.log).

Guarantee
  No secret, token or invite code enters a stream, a log line or an error message: they exist
  in plaintext only in the reply to the caller who created or leased them. An invite is
  redeemed at most once: a conditional claim lets exactly one concurrent redemption through,
  and the grant, the token and the redemption commit together. Decisions use the ingress's
  receive time, never this worker's clock.

Limits
  With PAYMENTS_SECRET_KEY unset every command answers 503. Licensing state is not rebuilt by
  `payments replay` (secrets cannot be in a stream): back up its tables with the database.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from faststream.nats import NatsMessage
from nats.aio.msg import Msg
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from contracts import subjects
from contracts.commands import CommandReply
from contracts.events import AuditEventV1, SessionTickV1
from contracts.http import RegisterRequest
from contracts.licensing import LICENSING_COMMANDS, LICENSING_QUEUE, LicensingCommandV1
from contracts.streams import AUDIT, LICENSING_TICKS_CONSUMER, ConsumerSpec
from shared.db.models import (
    LicenseAccess,
    LicenseImage,
    LicenseInvite,
    LicenseLease,
    OrchestratorToken,
)
from shared.db.repositories import licensing, outbox, registry
from shared.event_consumer import Decoded, EventConsumer, Outcome
from shared.registration import register_and_wait, registered_event
from shared.s3 import BadS3Uri, Presigner, parse_s3_uri
from shared.secrets_box import (
    SecretBox,
    SecretKeyError,
    digest,
    new_invite_code,
    new_token,
    normalize_invite,
    parse_key,
)
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)
GENERATED_SECRET_BYTES = 64
MIN_SECRET_BYTES = 32
NOT_CONFIGURED = "Licensing is not configured: PAYMENTS_SECRET_KEY is unset"

settings = load_settings()
runtime = WorkerRuntime("licensing", settings)
app = runtime.app
presigner = Presigner(
    settings.license_artifact_region, settings.s3_endpoint_url, settings.s3_addressing_style
)


def secret_box() -> SecretBox | None:
    current = parse_key(settings.secret_key.get_secret_value() if settings.secret_key else None)
    if current is None:
        return None
    previous_secret = settings.secret_key_previous
    return SecretBox(
        current, parse_key(previous_secret.get_secret_value() if previous_secret else None)
    )


BOX = secret_box()
Answer = tuple[int, dict[str, Any]]


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def audit(db: AsyncSession, event: str, at: datetime, **fields: Any) -> None:
    record = AuditEventV1(domain="license", event=event, at=at, fields=fields)
    await outbox.add(
        db,
        stream=AUDIT.name,
        subject=subjects.audit("license", event),
        event=record,
        key=f"audit:license:{event}:{uuid.uuid4().hex}",
    )


def image_view(row: LicenseImage, secret_b64: str | None = None) -> dict[str, Any]:
    view = {
        "image_ref": row.image_ref,
        "artifact_s3_uri": row.artifact_s3_uri,
        "created_at": iso(row.created_at),
        "rotated_at": iso(row.rotated_at),
        "revoked_at": iso(row.revoked_at),
    }
    if secret_b64 is not None:
        view["secret_b64"] = secret_b64
    return view


def lease_expired(lease: LicenseLease, at: datetime) -> bool:
    return lease.end_reason == "expired" or (
        lease.expires_at is not None and lease.expires_at <= at
    )


# -- images, access, tokens ---------------------------------------------------------------------


def decode_secret(secret_b64: str) -> bytes:
    try:
        secret = base64.b64decode(secret_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret_b64 must be valid base64") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"secret_b64 must decode to at least {MIN_SECRET_BYTES} bytes")
    return secret


async def image_put(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    args, at = cmd.args, cmd.received_at
    image_ref = str(args["image_ref"])
    existing = await licensing.image(db, image_ref)
    secret: bytes | None = None
    if args.get("secret_b64"):
        try:
            secret = decode_secret(str(args["secret_b64"]))
        except ValueError as error:
            return 400, {"detail": str(error)}
    elif existing is None:
        secret = os.urandom(GENERATED_SECRET_BYTES)
    uri = args.get("artifact_s3_uri")
    if uri is not None and uri != "":
        try:
            uri = parse_s3_uri(str(uri)).uri
        except BadS3Uri as error:
            return 400, {"detail": str(error)}
    row = existing or LicenseImage(
        image_ref=image_ref, secret_sealed=b"", created_at=at, rotated_at=at
    )
    if secret is not None:
        row.secret_sealed = box.seal(secret, image_ref)
        row.rotated_at = at
    if uri is not None:
        row.artifact_s3_uri = uri or None
    row.revoked_at = None
    db.add(row)
    await audit(db, "image_upserted", at, image_ref=image_ref)
    shown = base64.b64encode(box.open(row.secret_sealed, image_ref)).decode("ascii")
    return 200, image_view(row, shown)


async def image_revoke(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    image_ref = str(cmd.args["image_ref"])
    row = await licensing.image(db, image_ref)
    if row is None:
        return 404, {"detail": "Image not found"}
    row.revoked_at = cmd.received_at
    ended = await licensing.end_leases(db, cmd.received_at, "image_revoked", image_ref=image_ref)
    await audit(db, "image_revoked", cmd.received_at, image_ref=image_ref, leases_ended=len(ended))
    return 200, {"ok": True}


async def access_grant(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id, image_ref = str(cmd.args["orchestrator_id"]), str(cmd.args["image_ref"])
    if await registry.get(db, orchestrator_id) is None:
        return 404, {"detail": "Unknown orchestrator"}
    if await licensing.image(db, image_ref) is None:
        return 404, {"detail": "Image not found"}
    if not await licensing.has_access(db, orchestrator_id, image_ref):
        db.add(
            LicenseAccess(
                orchestrator_id=orchestrator_id, image_ref=image_ref, granted_at=cmd.received_at
            )
        )
        await db.flush()
    await audit(
        db, "access_granted", cmd.received_at, orchestrator_id=orchestrator_id, image_ref=image_ref
    )
    return 200, {"access": await licensing.access_map(db)}


async def access_revoke(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id, image_ref = str(cmd.args["orchestrator_id"]), str(cmd.args["image_ref"])
    if await registry.get(db, orchestrator_id) is None:
        return 404, {"detail": "Unknown orchestrator"}
    await licensing.revoke_access(db, orchestrator_id, image_ref)
    await licensing.end_leases(
        db, cmd.received_at, "access_revoked", image_ref=image_ref, orchestrator_id=orchestrator_id
    )
    await audit(
        db, "access_revoked", cmd.received_at, orchestrator_id=orchestrator_id, image_ref=image_ref
    )
    return 200, {"access": await licensing.access_map(db)}


async def mint_token(db: AsyncSession, orchestrator_id: str, at: datetime) -> tuple[str, str]:
    token, token_id = new_token(), uuid.uuid4().hex
    db.add(
        OrchestratorToken(
            token_id=token_id,
            orchestrator_id=orchestrator_id,
            token_hash=digest(token),
            created_at=at,
        )
    )
    await audit(db, "token_minted", at, orchestrator_id=orchestrator_id, token_id=token_id)
    return token_id, token


async def token_mint(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id = str(cmd.args["orchestrator_id"])
    if await registry.get(db, orchestrator_id) is None:
        return 404, {"detail": "Unknown orchestrator"}
    token_id, token = await mint_token(db, orchestrator_id, cmd.received_at)
    return 200, {"token_id": token_id, "token": token}


async def token_revoke(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id, token_id = str(cmd.args["orchestrator_id"]), str(cmd.args["token_id"])
    row = await db.get(OrchestratorToken, token_id)
    # Only through its own orchestrator's path (the original revoked any id on any path).
    if row is None or row.orchestrator_id != orchestrator_id:
        return 404, {"detail": "Token not found"}
    if row.revoked_at is None:
        row.revoked_at = cmd.received_at
    await audit(
        db, "token_revoked", cmd.received_at, orchestrator_id=orchestrator_id, token_id=token_id
    )
    return 200, {"ok": True}


# -- invites ------------------------------------------------------------------------------------


async def invite_create(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    args, at = cmd.args, cmd.received_at
    image_ref = str(args["image_ref"])
    if await licensing.image(db, image_ref) is None:
        return 404, {"detail": "Image not found"}
    if args.get("expires_at"):
        expires_at = datetime.fromisoformat(str(args["expires_at"]))
    else:
        ttl = int(args.get("ttl_seconds") or settings.license_invite_default_ttl_seconds)
        expires_at = at + timedelta(seconds=ttl)
    code, invite_id = new_invite_code(), uuid.uuid4().hex
    invite = LicenseInvite(
        invite_id=invite_id,
        code_hash=digest(normalize_invite(code)),
        image_ref=image_ref,
        bound_address=str(args["bound_address"]).lower(),
        created_at=at,
        expires_at=expires_at,
        note=args.get("note"),
    )
    db.add(invite)
    await audit(
        db,
        "invite_created",
        at,
        invite_id=invite_id,
        image_ref=image_ref,
        expires_at=iso(expires_at),
    )
    return 200, {
        "invite_id": invite_id,
        "code": code,
        "image_ref": image_ref,
        "bound_address": invite.bound_address,
        "created_at": iso(at),
        "expires_at": iso(expires_at),
    }


async def invite_revoke(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    invite = await db.get(LicenseInvite, str(cmd.args["invite_id"]))
    if invite is None:
        return 404, {"detail": "Invite not found"}
    if invite.revoked_at is None:
        invite.revoked_at = cmd.received_at
    await audit(db, "invite_revoked", cmd.received_at, invite_id=invite.invite_id)
    return 200, {"ok": True}


async def check_invite(db: AsyncSession, cmd: LicensingCommandV1) -> LicenseInvite | Answer:
    """The invite a redemption may proceed with, or the original's refusal."""
    at, args = cmd.received_at, cmd.args
    invite = await licensing.invite_by_hash(db, digest(normalize_invite(str(args["code"]))))
    if invite is None:
        return 404, {"detail": "Invite not found"}
    if invite.revoked_at is not None:
        return 403, {"detail": "Invite revoked"}
    if invite.redeemed_at is not None:
        return 409, {"detail": "Invite already redeemed"}
    if invite.expires_at is not None and invite.expires_at <= at:
        return 410, {"detail": "Invite expired"}
    if not invite.bound_address:
        return 409, {"detail": "Invite is not bound to a wallet"}
    if invite.bound_address.lower() != str(args["address"]).lower():
        return 403, {"detail": "Wallet address does not match this invite code"}
    image = await licensing.image(db, invite.image_ref)
    if image is None:
        return 404, {"detail": "Image not found"}
    if image.revoked_at is not None:
        return 403, {"detail": "Image access revoked"}
    if not await licensing.claim_invite(db, invite.invite_id, at):
        return 409, {"detail": "Invite redemption already in progress"}
    return invite


async def invite_redeem(cmd: LicensingCommandV1) -> Answer:
    """Claim, register (through REGISTRY), then grant + token + redeemed in one commit."""
    async with runtime.sessionmaker() as db, db.begin():
        checked = await check_invite(db, cmd)
    if not isinstance(checked, LicenseInvite):
        return checked
    invite, at, args = checked, cmd.received_at, cmd.args
    request = RegisterRequest(
        orchestrator_id=str(args["orchestrator_id"]),
        address=str(args["address"]),
        capability=args.get("capability"),
        contact_email=args.get("contact_email"),
    )
    event = registered_event(
        request, origin="invite", is_top_100=True, request_ip=cmd.request_ip, at=at
    )
    key = f"register:invite:{invite.invite_id}:{request.orchestrator_id}:{at.isoformat()}"
    outcome = await register_and_wait(runtime.js, runtime.sessionmaker, event, key)
    if outcome is None or int(outcome["status"]) != 200:
        async with runtime.sessionmaker() as db, db.begin():
            await licensing.release_invite(db, invite.invite_id, at)
        if outcome is None:
            return 503, {"detail": "Registration not applied in time; retry shortly"}
        return int(outcome["status"]), dict(outcome["body"])
    return await complete_redemption(invite.invite_id, request.orchestrator_id, cmd)


async def complete_redemption(
    invite_id: str, orchestrator_id: str, cmd: LicensingCommandV1
) -> Answer:
    at = cmd.received_at
    async with runtime.sessionmaker() as db:
        invite = await db.get(LicenseInvite, invite_id)
        if invite is None or invite.redeeming_at != at or invite.redeemed_at is not None:
            return 409, {"detail": "Invite redemption already in progress"}
        if not await licensing.has_access(db, orchestrator_id, invite.image_ref):
            db.add(
                LicenseAccess(
                    orchestrator_id=orchestrator_id, image_ref=invite.image_ref, granted_at=at
                )
            )
            await audit(
                db,
                "access_granted",
                at,
                orchestrator_id=orchestrator_id,
                image_ref=invite.image_ref,
            )
        token_id, token = await mint_token(db, orchestrator_id, at)
        invite.redeemed_at, invite.redeemed_by, invite.redeemed_ip = (
            at,
            orchestrator_id,
            cmd.request_ip,
        )
        invite.redeemed_address, invite.redeemed_token_id = (
            str(cmd.args["address"]).lower(),
            token_id,
        )
        invite.redeeming_at = None
        image_ref = invite.image_ref
        await audit(
            db,
            "invite_redeemed",
            at,
            invite_id=invite_id,
            orchestrator_id=orchestrator_id,
            image_ref=invite.image_ref,
            token_id=token_id,
            request_ip=cmd.request_ip,
        )
        await runtime.commit_and_publish(db)
    edge_token = (
        settings.edge_config_token.get_secret_value() if settings.edge_config_token else None
    )
    return 200, {
        "orchestrator_id": orchestrator_id,
        "image_ref": image_ref,
        "token_id": token_id,
        "token": token,
        "edge_config_url": settings.edge_config_url,
        "edge_config_token": edge_token,
    }


# -- leases -------------------------------------------------------------------------------------


async def lease_take(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id, at = cmd.actor["orchestrator_id"], cmd.received_at
    image_ref = str(cmd.args["image_ref"])
    if await registry.get(db, orchestrator_id) is None:
        return 404, {"detail": "Unknown orchestrator"}
    image = await licensing.image(db, image_ref)
    if image is None:
        return 404, {"detail": "Image not found"}
    if image.revoked_at is not None:
        return 403, {"detail": "Image access revoked"}
    if not await licensing.has_access(db, orchestrator_id, image_ref):
        return 403, {"detail": "Image access denied"}
    seconds = settings.license_lease_seconds
    lease = LicenseLease(
        lease_id=uuid.uuid4().hex,
        orchestrator_id=orchestrator_id,
        image_ref=image_ref,
        token_id=cmd.actor.get("token_id"),
        lease_seconds=seconds,
        issued_at=at,
        last_seen_at=at,
        last_seen_ip=cmd.request_ip,
        expires_at=at + timedelta(seconds=seconds),
    )
    db.add(lease)
    await touch_token(db, cmd)
    await audit(
        db,
        "lease_issued",
        at,
        orchestrator_id=orchestrator_id,
        image_ref=image_ref,
        lease_id=lease.lease_id,
        request_ip=cmd.request_ip,
    )
    secret_b64 = base64.b64encode(box.open(image.secret_sealed, image_ref)).decode("ascii")
    artifact_url = await presigner.presign_get_or_none(
        image.artifact_s3_uri, settings.license_artifact_presign_seconds
    )
    return 200, {
        "lease_id": lease.lease_id,
        "orchestrator_id": orchestrator_id,
        "image_ref": image_ref,
        "expires_at": iso(lease.expires_at),
        "lease_seconds": seconds,
        "secret_b64": secret_b64,
        "artifact_url": artifact_url,
    }


async def touch_token(db: AsyncSession, cmd: LicensingCommandV1) -> None:
    token_id = cmd.actor.get("token_id")
    row = await db.get(OrchestratorToken, token_id) if token_id else None
    if row is not None and (row.last_seen_at is None or row.last_seen_at < cmd.received_at):
        row.last_seen_at = cmd.received_at


async def lease_heartbeat(db: AsyncSession, box: SecretBox, cmd: LicensingCommandV1) -> Answer:
    orchestrator_id, at = cmd.actor["orchestrator_id"], cmd.received_at
    lease = await licensing.lease(db, str(cmd.args["lease_id"]))
    if lease is None:
        return 404, {"detail": "Lease not found"}
    if lease.orchestrator_id != orchestrator_id:
        return 403, {"detail": "Lease not found"}
    if lease.revoked_at is not None:
        return 403, {"detail": "Lease revoked"}
    if lease_expired(lease, at):
        return 410, {"detail": "Lease expired"}
    image = await licensing.image(db, lease.image_ref)
    if image is None or image.revoked_at is not None:
        lease.revoked_at, lease.end_reason = at, "image_revoked"
        return 403, {"detail": "Image access revoked"}
    if not await licensing.has_access(db, orchestrator_id, lease.image_ref):
        lease.revoked_at, lease.end_reason = at, "access_revoked"
        return 403, {"detail": "Image access denied"}
    lease.expires_at = at + timedelta(seconds=lease.lease_seconds)
    lease.last_seen_at, lease.last_seen_ip = at, cmd.request_ip
    await touch_token(db, cmd)
    await audit(
        db,
        "lease_heartbeat",
        at,
        orchestrator_id=orchestrator_id,
        image_ref=lease.image_ref,
        lease_id=lease.lease_id,
        request_ip=cmd.request_ip,
    )
    return 200, {
        "lease_id": lease.lease_id,
        "expires_at": iso(lease.expires_at),
        "lease_seconds": lease.lease_seconds,
    }


Handler = Callable[[AsyncSession, SecretBox, LicensingCommandV1], Awaitable[Answer]]
HANDLERS: dict[str, Handler] = {
    "image.put": image_put,
    "image.revoke": image_revoke,
    "access.grant": access_grant,
    "access.revoke": access_revoke,
    "token.mint": token_mint,
    "token.revoke": token_revoke,
    "invite.create": invite_create,
    "invite.revoke": invite_revoke,
    "lease.take": lease_take,
    "lease.heartbeat": lease_heartbeat,
}


def reply(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return CommandReply(status=status, body=body).model_dump()


async def answer(cmd: LicensingCommandV1) -> Answer:
    if BOX is None:
        return 503, {"detail": NOT_CONFIGURED}
    if cmd.name == "invite.redeem":
        return await invite_redeem(cmd)
    handler = HANDLERS.get(cmd.name)
    if handler is None:
        return 400, {"detail": f"Unknown licensing command {cmd.name!r}"}
    async with runtime.sessionmaker() as db:
        status, body = await handler(db, BOX, cmd)
        # A refused heartbeat still ends the lease it refused (403), so that one commits.
        if status < 400 or status == 403:
            await runtime.commit_and_publish(db)
        else:
            await db.rollback()
    return status, body


@runtime.broker.subscriber(f"{LICENSING_COMMANDS}.>", queue=LICENSING_QUEUE)
async def on_licensing_command(body: Any, message: NatsMessage) -> dict[str, Any]:
    try:
        cmd = LicensingCommandV1.model_validate_json(message.body)
    except ValidationError:
        return reply(400, {"detail": "Malformed licensing command"})
    try:
        status, answer_body = await answer(cmd)
    except SecretKeyError as error:
        log.error("secret could not be opened", extra={"command": cmd.name})
        return reply(503, {"detail": str(error)})
    except (KeyError, ValueError) as error:
        log.warning(
            "licensing command refused", extra={"command": cmd.name, "error": type(error).__name__}
        )
        return reply(400, {"detail": f"Malformed licensing command {cmd.name!r}"})
    return reply(status, answer_body)


# -- lease expiry by tick -------------------------------------------------------------------


class LeaseExpiry:
    async def apply(
        self, db: AsyncSession, items: Sequence[Decoded[SessionTickV1]]
    ) -> list[Outcome]:
        outcomes = []
        for item in items:
            outcomes.append(
                Outcome.done({"expired": await licensing.expire_leases(db, item.event.at)})
            )
        return outcomes


lease_ticks = runtime.event_consumer(
    consumer=LICENSING_TICKS_CONSUMER.durable,
    schemas={SessionTickV1.SCHEMA: SessionTickV1},
    projector=LeaseExpiry(),
)
ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = []  # licensing is not rebuilt by replay


@runtime.consume(LICENSING_TICKS_CONSUMER)
async def on_ticks(messages: list[Msg]) -> None:
    await lease_ticks.handle(messages)


async def start_presigner() -> None:
    await presigner.start()


runtime.startup_hooks.append(start_presigner)
runtime.shutdown_hooks.append(presigner.close)
if BOX is None:
    log.warning(NOT_CONFIGURED)
