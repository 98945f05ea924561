"""Licensing tables: images, tokens, access grants, invites and leases."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.models import (
    LicenseAccess,
    LicenseImage,
    LicenseInvite,
    LicenseLease,
    OrchestratorToken,
)

# A redemption claim older than this is considered abandoned (a crashed worker).
REDEEM_CLAIM_TTL_S = 120.0


async def image(session: AsyncSession, image_ref: str) -> LicenseImage | None:
    return await session.get(LicenseImage, image_ref)


async def images(session: AsyncSession) -> list[LicenseImage]:
    query = select(LicenseImage).order_by(col(LicenseImage.created_at).desc())
    return list((await session.execute(query)).scalars())


async def token_by_hash(session: AsyncSession, token_hash: str) -> OrchestratorToken | None:
    query = select(OrchestratorToken).where(
        col(OrchestratorToken.token_hash) == token_hash, col(OrchestratorToken.revoked_at).is_(None)
    )
    return (await session.execute(query)).scalars().first()


async def tokens_of(session: AsyncSession, orchestrator_id: str) -> list[OrchestratorToken]:
    query = (
        select(OrchestratorToken)
        .where(col(OrchestratorToken.orchestrator_id) == orchestrator_id)
        .order_by(col(OrchestratorToken.created_at).desc())
    )
    return list((await session.execute(query)).scalars())


async def has_access(session: AsyncSession, orchestrator_id: str, image_ref: str) -> bool:
    return await session.get(LicenseAccess, (orchestrator_id, image_ref)) is not None


async def access_map(session: AsyncSession) -> dict[str, list[str]]:
    rows = await session.execute(select(LicenseAccess.orchestrator_id, LicenseAccess.image_ref))  # type: ignore[call-overload]
    found: dict[str, list[str]] = {}
    for orchestrator_id, image_ref in rows.all():
        found.setdefault(orchestrator_id, []).append(image_ref)
    return {key: sorted(value) for key, value in sorted(found.items())}


async def revoke_access(session: AsyncSession, orchestrator_id: str, image_ref: str) -> None:
    await session.execute(
        delete(LicenseAccess).where(
            col(LicenseAccess.orchestrator_id) == orchestrator_id,
            col(LicenseAccess.image_ref) == image_ref,
        )
    )


async def invite_by_hash(session: AsyncSession, code_hash: str) -> LicenseInvite | None:
    query = select(LicenseInvite).where(col(LicenseInvite.code_hash) == code_hash)
    return (await session.execute(query)).scalars().first()


async def invites(session: AsyncSession) -> list[LicenseInvite]:
    query = select(LicenseInvite).order_by(col(LicenseInvite.created_at).desc())
    return list((await session.execute(query)).scalars())


async def claim_invite(session: AsyncSession, invite_id: str, at: datetime) -> bool:
    """Reserve an invite for one redemption; exactly one concurrent caller gets True."""
    stale = at - timedelta(seconds=REDEEM_CLAIM_TTL_S)
    result = await session.execute(
        update(LicenseInvite)
        .where(
            col(LicenseInvite.invite_id) == invite_id,
            col(LicenseInvite.redeemed_at).is_(None),
            col(LicenseInvite.revoked_at).is_(None),
            (col(LicenseInvite.redeeming_at).is_(None)) | (col(LicenseInvite.redeeming_at) < stale),
        )
        .values(redeeming_at=at)
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


async def release_invite(session: AsyncSession, invite_id: str, claimed_at: datetime) -> None:
    await session.execute(
        update(LicenseInvite)
        .where(
            col(LicenseInvite.invite_id) == invite_id,
            col(LicenseInvite.redeeming_at) == claimed_at,
            col(LicenseInvite.redeemed_at).is_(None),
        )
        .values(redeeming_at=None)
    )


async def lease(session: AsyncSession, lease_id: str) -> LicenseLease | None:
    return await session.get(LicenseLease, lease_id)


async def leases(
    session: AsyncSession,
    *,
    orchestrator_id: str | None,
    image_ref: str | None,
    active_at: datetime | None,
    limit: int,
) -> list[LicenseLease]:
    query = select(LicenseLease).order_by(col(LicenseLease.issued_at).desc()).limit(limit)
    if orchestrator_id is not None:
        query = query.where(col(LicenseLease.orchestrator_id) == orchestrator_id)
    if image_ref is not None:
        query = query.where(col(LicenseLease.image_ref) == image_ref)
    if active_at is not None:
        query = query.where(
            col(LicenseLease.revoked_at).is_(None),
            col(LicenseLease.end_reason).is_(None),
            col(LicenseLease.expires_at) > active_at,
        )
    return list((await session.execute(query)).scalars())


async def end_leases(
    session: AsyncSession,
    at: datetime,
    reason: str,
    *,
    image_ref: str,
    orchestrator_id: str | None = None,
) -> list[str]:
    """End the live leases of an image (or of one orchestrator on it); returns their ids."""
    conditions = [
        col(LicenseLease.image_ref) == image_ref,
        col(LicenseLease.revoked_at).is_(None),
        col(LicenseLease.end_reason).is_(None),
    ]
    if orchestrator_id is not None:
        conditions.append(col(LicenseLease.orchestrator_id) == orchestrator_id)
    rows = await session.execute(select(LicenseLease).where(*conditions))
    ended = []
    for row in rows.scalars():
        row.revoked_at = at
        row.end_reason = reason
        ended.append(row.lease_id)
    return ended


async def expire_leases(session: AsyncSession, at: datetime) -> int:
    result = await session.execute(
        update(LicenseLease)
        .where(
            col(LicenseLease.revoked_at).is_(None),
            col(LicenseLease.end_reason).is_(None),
            col(LicenseLease.expires_at) <= at,
        )
        .values(end_reason="expired")
    )
    return int(getattr(result, "rowcount", 0) or 0)
