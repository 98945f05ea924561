"""Ledger reads and writes: append-only entries and the balances they sum to."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import Balance


async def balance_wei(session: AsyncSession, orchestrator_id: str) -> int:
    row = await session.execute(
        select(Balance.balance_wei).where(Balance.orchestrator_id == orchestrator_id)
    )
    value = row.scalar_one_or_none()
    return int(value) if value is not None else 0


async def balances_wei(session: AsyncSession, ids: list[str]) -> dict[str, int]:
    if not ids:
        return {}
    rows = await session.execute(
        select(Balance.orchestrator_id, Balance.balance_wei).where(
            Balance.orchestrator_id.in_(ids)  # type: ignore[attr-defined]
        )
    )
    return {orchestrator_id: int(value) for orchestrator_id, value in rows.all()}
