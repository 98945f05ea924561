"""shared.db.json_text: JSON columns hold the same values as with `json.dumps`.

The encoder is compared with the standard library's over random JSON values (the decoded
values must be equal), and values orjson refuses are shown to take the fallback: directly and
through a ledger entry's metadata stored and read back on each configured backend.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from shared.db import json_text
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import LedgerEntry
from shared.db.repositories.ledger import NewEntry, post_entries
from tests.harness import Database

# Integers past 64 bits (wei amounts) are what orjson refuses and json.dumps writes.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_the_text_decodes_to_what_json_dumps_would_store(value: Any) -> None:
    assert json.loads(json_text.dumps(value)) == json.loads(json.dumps(value))


def test_values_orjson_refuses_take_the_standard_encoder() -> None:
    assert json_text.dumps({"wei": 2**70}) == json.dumps({"wei": 2**70})
    assert json_text.dumps({7: "seven"}) == json.dumps({7: "seven"})


def test_a_non_finite_float_is_stored_as_null_not_as_the_non_json_token() -> None:
    assert json.loads(json_text.dumps({"x": float("nan")})) == {"x": None}


async def test_metadata_beyond_64_bits_round_trips_through_the_database(
    database: Database,
) -> None:
    metadata = {"wei": 2**70, "note": "préavis ✓", "nested": {"list": [1, 2.5, None, True]}}
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            await post_entries(
                session,
                [
                    NewEntry(
                        entry_key="json-text-1",
                        orchestrator_id="orch-json",
                        amount_wei=1,
                        reason="adjustment",
                        source_stream="TEST",
                        source_seq=1,
                        source_key="json-text-1",
                        occurred_at=datetime(2026, 12, 2, tzinfo=UTC),
                        metadata=metadata,
                    )
                ],
            )
        async with sessions() as session:
            stored = await session.scalar(
                select(LedgerEntry.entry_metadata).where(LedgerEntry.entry_key == "json-text-1")
            )
        assert stored == metadata
    finally:
        await engine.dispose()
