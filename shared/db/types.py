"""Column types that keep money exact and time in UTC on both SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# uint256 has 78 decimal digits; a signed balance needs one more character for the sign.
WEI_DIGITS = 78


class Wei(TypeDecorator[int]):
    """An integer amount in wei, of any size.

    PostgreSQL stores NUMERIC(78, 0). SQLite's INTEGER stops at 2**63 (about 9.2 ETH) and silently
    turns larger numbers into floats, so on SQLite the value is stored as decimal text and all
    arithmetic happens in Python.
    """

    impl = String(WEI_DIGITS + 1)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(WEI_DIGITS, 0))
        return dialect.type_descriptor(String(WEI_DIGITS + 1))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"wei amounts are ints, got {type(value).__name__}")
        return value if dialect.name == "postgresql" else str(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, the text straight away (bulk inserts call this for every amount)."""
        if dialect.name == "postgresql":
            return super().bind_processor(dialect)
        return _wei_text

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return int(value)


def _wei_text(value: int | None) -> str | None:
    """A wei amount as SQLite stores it: decimal text (see Wei); the same as process_bind_param."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"wei amounts are ints, got {type(value).__name__}")
    return str(value)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime; stored without zone, always read back as UTC."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(NAIVE_DATETIME_ERROR)
        return value.astimezone(UTC).replace(tzinfo=None)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, one step straight to the text SQLAlchemy's DATETIME stores.

        The generic path (process_bind_param, then DATETIME's `%`-formatting of a dict) was a
        large share of a bulk insert's CPU. The result is the same string; that is checked here
        against SQLAlchemy's own processor, which is used instead if they ever differ.
        """
        typed = super().bind_processor(dialect)
        if dialect.name != "sqlite" or typed is None:
            return typed
        probe = datetime(987, 6, 5, 4, 3, 2, 1, tzinfo=UTC)
        if typed(probe) != _sqlite_utc_text(probe) or typed(None) is not None:
            return typed
        return _sqlite_utc_text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


NAIVE_DATETIME_ERROR = "naive datetimes are not stored; pass a UTC-aware datetime"
# sqlalchemy.dialects.sqlite.DATETIME's default storage format, positionally.
_SQLITE_DATETIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


# A batch's rows repeat a few instants (an event's receive time is its workload's submitted,
# updated and credited time and its entry's time): each is formatted once. Equal instants in
# any zone hash and compare equal and have the same UTC text, so the cache cannot mix them up.
@functools.lru_cache(maxsize=4096)
def _sqlite_utc_text(value: datetime | None) -> str | None:
    """`value` in UTC as SQLite's DATETIME stores it: `YYYY-MM-DD HH:MM:SS.ffffff`."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(NAIVE_DATETIME_ERROR)
    utc = value.astimezone(UTC)
    return _SQLITE_DATETIME % (
        utc.year,
        utc.month,
        utc.day,
        utc.hour,
        utc.minute,
        utc.second,
        utc.microsecond,
    )
