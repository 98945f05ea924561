"""Money helpers (shared.money) and the ledger's storage rules, on SQLite and PostgreSQL:
exact wei arithmetic, the Wei column beyond 64 bits, unique entry keys and append-only entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Balance, LedgerEntry, Workload
from shared.money import AmountError, eth_to_wei, rate_credit_wei, to_decimal, wei_to_eth
from tests.harness import Database

# -- arithmetic ---------------------------------------------------------------------------------


def test_decimal_strings_convert_exactly() -> None:
    assert eth_to_wei("0.000016060788") == 16_060_788_000_000
    assert eth_to_wei("1") == 10**18
    assert eth_to_wei(Decimal("0.1")) == 10**17
    assert eth_to_wei(3) == 3 * 10**18
    assert eth_to_wei("0.000000000000000001") == 1
    assert eth_to_wei("-2.5") == -25 * 10**17
    # A float's binary error never enters: "0.1" + "0.2" is exactly "0.3".
    assert eth_to_wei("0.1") + eth_to_wei("0.2") == eth_to_wei("0.3")
    # Far beyond 64 bits and beyond a double's 53-bit mantissa.
    big = "115792089237316195423570985008687907853269984665640564039457.584007913129639935"
    assert eth_to_wei(big) == 2**256 - 1


def test_amounts_below_one_wei_truncate_toward_zero() -> None:
    assert eth_to_wei("0.0000000000000000019") == 1
    assert eth_to_wei("0.0000000000000000009") == 0
    assert eth_to_wei("1.9999999999999999999") == 2 * 10**18 - 1
    assert eth_to_wei("-0.0000000000000000019") == -1


def test_time_credit_is_exact_and_truncated() -> None:
    # The original's documented example: 180000 ms at the default rate.
    assert rate_credit_wei(180_000, "0.000005353596") == 16_060_788_000_000
    assert wei_to_eth(rate_credit_wei(180_000, "0.000005353596")) == "0.000016060788"
    # 1 wei per minute for 59,999 ms is less than one wei: nothing, never a rounded-up wei.
    assert rate_credit_wei(59_999, "0.000000000000000001") == 0
    assert rate_credit_wei(119_999, "0.000000000000000001") == 1
    # One third of a wei per millisecond, truncated at the end and not per step.
    assert rate_credit_wei(3, Decimal("0.00000000000002")) == 1
    assert rate_credit_wei(86_400_000, "0") == 0


def test_wei_to_eth_formats_plain_decimals() -> None:
    assert wei_to_eth(0) == "0"
    assert wei_to_eth(1) == "0.000000000000000001"
    assert wei_to_eth(10**18) == "1"
    assert wei_to_eth(15 * 10**17) == "1.5"
    assert wei_to_eth(-(10**17)) == "-0.1"
    assert wei_to_eth(10**30) == "1000000000000"  # no exponent
    assert wei_to_eth(2**256 - 1) == (
        "115792089237316195423570985008687907853269984665640564039457.584007913129639935"
    )


@pytest.mark.parametrize("bad", ["abc", "", "NaN", "Infinity", "-inf", "1e"])
def test_not_an_amount_is_refused(bad: str) -> None:
    with pytest.raises(AmountError):
        eth_to_wei(bad)
    with pytest.raises(AmountError):
        to_decimal(bad)


@given(st.integers(-(2**256), 2**256))
def test_wei_round_trips_through_eth_strings(wei: int) -> None:
    text_form = wei_to_eth(wei)
    assert "e" not in text_form.lower()
    assert eth_to_wei(text_form) == wei
    with localcontext(prec=200):
        assert Decimal(text_form) * 10**18 == wei


@given(st.decimals(min_value=-(10**12), max_value=10**12, allow_nan=False, places=24))
def test_eth_to_wei_is_the_truncated_exact_product(amount: Decimal) -> None:
    wei = eth_to_wei(str(amount))
    with localcontext(prec=200):
        exact = amount * 10**18
        assert abs(Decimal(wei)) <= abs(exact) < abs(Decimal(wei)) + 1
        assert wei == 0 or (wei > 0) == (exact > 0)


# -- storage, on every configured backend -------------------------------------------------------


@pytest.fixture
async def writer(database: Database) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(database.url, writer=True)
    yield make_sessionmaker(engine)
    await engine.dispose()


def entry_row(key: str, amount: int) -> dict:
    return {
        "entry_key": key,
        "orchestrator_id": "orch-money",
        "amount_wei": amount,
        "balance_after_wei": amount,
        "reason": "adjustment",
        "source_stream": "WORKLOADS",
        "source_seq": 1,
        "source_key": key,
        "metadata": {"note": "test"},
        "occurred_at": datetime.now(UTC),
    }


HUGE = [2**63, 2**63 + 1, 2**200 + 12345, 2**256 - 1, -(2**255), -(2**63) - 1]


async def test_wei_column_round_trips_beyond_64_bits(
    writer: async_sessionmaker[AsyncSession],
) -> None:
    async with writer() as session, session.begin():
        await session.execute(
            insert(Balance),
            [
                {"orchestrator_id": f"orch-{i}", "balance_wei": value, "entry_count": 0}
                for i, value in enumerate(HUGE)
            ],
        )
        await session.execute(
            insert(LedgerEntry), [entry_row(f"big:{i}", v) for i, v in enumerate(HUGE)]
        )
        session.add(
            Workload(
                workload_id="wl-big",
                orchestrator_id="orch-0",
                kind="fixed",
                status="pending",
                payout_amount_wei=2**255 + 7,
                body_sha256="0" * 64,
                submitted_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
            )
        )
    async with writer() as session:
        stored = dict(
            (await session.execute(select(Balance.orchestrator_id, Balance.balance_wei))).all()
        )
        amounts = dict(
            (await session.execute(select(LedgerEntry.entry_key, LedgerEntry.amount_wei))).all()
        )
        workload = await session.get(Workload, "wl-big")
    assert stored == {f"orch-{i}": v for i, v in enumerate(HUGE)}
    assert all(type(v) is int for v in stored.values())
    assert amounts == {f"big:{i}": v for i, v in enumerate(HUGE)}
    assert workload is not None and workload.payout_amount_wei == 2**255 + 7
    with pytest.raises(StatementError, match="wei amounts are ints"):
        async with writer() as session, session.begin():
            await session.execute(
                insert(Balance), [{"orchestrator_id": "f", "balance_wei": 1.5, "entry_count": 0}]
            )


async def test_ledger_entries_are_append_only_with_unique_keys(
    writer: async_sessionmaker[AsyncSession],
) -> None:
    async with writer() as session, session.begin():
        await session.execute(insert(LedgerEntry), [entry_row("once", 10**18)])
    # The same key a second time is refused by the database itself.
    with pytest.raises(DBAPIError):
        async with writer() as session, session.begin():
            await session.execute(insert(LedgerEntry), [entry_row("once", 5)])
    # An entry can be neither changed nor removed, by the ORM or by raw SQL.
    statements = [
        update(LedgerEntry).where(LedgerEntry.entry_key == "once").values(reason="edited"),
        update(LedgerEntry).where(LedgerEntry.entry_key == "once").values(amount_wei=1),
        delete(LedgerEntry).where(LedgerEntry.entry_key == "once"),
        text("DELETE FROM ledger_entries"),
    ]
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"):
            async with writer() as session, session.begin():
                await session.execute(statement)
    async with writer() as session:
        rows = list((await session.execute(select(LedgerEntry))).scalars())
    assert [(r.entry_key, r.amount_wei, r.reason) for r in rows] == [("once", 10**18, "adjustment")]


# -- the HTTP edge: only amounts a ledger entry can hold get in ----------------------------------


def test_request_amounts_must_be_whole_wei_within_uint256() -> None:
    from pydantic import ValidationError

    from contracts.http import AdjustmentRequest, WorkloadCreateRequest

    largest = wei_to_eth(2**256 - 1)
    assert eth_to_wei(AdjustmentRequest(orchestrator_id="o", amount_eth=largest).amount_eth) == (
        2**256 - 1
    )
    assert eth_to_wei(
        AdjustmentRequest(orchestrator_id="o", amount_eth="-" + largest).amount_eth
    ) == (-(2**256) + 1)
    fixed = {"workload_id": "w", "orchestrator_id": "o", "artifact_hash": "h"}
    assert (
        eth_to_wei(WorkloadCreateRequest(**fixed, payout_amount_eth="1e-18").payout_amount_eth) == 1
    )
    for amount in (wei_to_eth(2**256), "-" + wei_to_eth(2**256), "1e80", "1e-19", "0"):
        with pytest.raises(ValidationError):
            AdjustmentRequest(orchestrator_id="o", amount_eth=amount)
    for amount in (wei_to_eth(2**256), "1e80", "1e-19", "0.0000000000000000001", "0"):
        with pytest.raises(ValidationError):
            WorkloadCreateRequest(**fixed, payout_amount_eth=amount)


@given(
    st.integers(0, 10**12),
    st.decimals(min_value=0, max_value=1000, places=18, allow_nan=False, allow_infinity=False),
)
def test_rate_credit_equals_the_decimal_formula(duration_ms: int, rate: Decimal) -> None:
    """The integer fast path gives exactly what duration × rate / 60000 truncated gives."""
    with localcontext() as context:
        context.prec = 100
        expected = int(
            (Decimal(duration_ms) * rate / Decimal(60_000) * 10**18).to_integral_value(
                rounding=ROUND_DOWN
            )
        )
    assert rate_credit_wei(duration_ms, rate) == expected
    assert rate_credit_wei(duration_ms, str(rate)) == expected
