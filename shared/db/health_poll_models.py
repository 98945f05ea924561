"""The health pollers' claims: which poller copy polls an orchestrator in a round.

Not a projection: coordination between poller copies, so two copies never poll the same
orchestrator in the same round. Old rounds are deleted as the pollers go.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column
from sqlmodel import Field, SQLModel

from shared.db.models import _utc


class HealthPollClaim(SQLModel, table=True):
    __tablename__ = "health_poll_claims"

    orchestrator_id: str = Field(primary_key=True, max_length=128)
    round_number: int = Field(sa_column=Column(BigInteger(), primary_key=True))
    holder: str = Field(max_length=128)
    claimed_at: datetime | None = _utc(nullable=False)
