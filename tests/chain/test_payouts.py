"""The payouts worker against Anvil and the TicketBroker double, end to end through real processes:
api -> WORKLOADS -> ledger worker -> LEDGER -> payouts worker -> chain -> PAYOUTS -> debit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.db.engine import make_engine, make_sessionmaker
from shared.db.payout_models import ChainTransaction, Payout
from shared.faults import FAULT_EXIT_CODE
from tests.conftest import database_backends
from tests.ledger_stack import balances, entries, run_payments, wait_until
from tests.payouts_stack import (
    REFUSING_ORCHESTRATOR,
    PayoutStack,
    payout_stack,
    set_active,
    wei,
)

CREDITS_ETH = ("0.002", "0.003", "0.004")
RECEIPT_TIMEOUT_LOG = "receipt timeout: payouts stay broadcast"


async def credit_all(stack: PayoutStack, prefix: str) -> dict[str, int]:
    expected = {}
    for oid, amount in zip(stack.orchestrator_ids, CREDITS_ETH, strict=True):
        await stack.credit(oid, amount, f"{prefix}-{oid}")
        expected[oid] = wei(amount)
    return expected


def assert_contiguous(nonces: list[int]) -> None:
    """The payer's nonces (it deployed the double first, so they start above 0) with no gap."""
    assert nonces == list(range(nonces[0], nonces[0] + len(nonces))), nonces


async def assert_paid_exactly(stack: PayoutStack, expected: dict[str, int]) -> None:
    """Each recipient got its amount once on chain, and the ledger debited it once."""
    by_recipient: dict[str, int] = {}
    for recipient, amount in stack.transfers():
        by_recipient[recipient] = by_recipient.get(recipient, 0) + amount
    assert by_recipient == {stack.recipient(oid): amount for oid, amount in expected.items()}
    assert await stack.debits() == {oid: -amount for oid, amount in expected.items()}
    for oid in expected:
        assert await stack.balance(oid) == 0


@pytest.mark.parametrize("backend", database_backends())
async def test_three_balances_past_the_threshold_are_paid_in_one_batch(
    backend: str, tmp_path: Path
) -> None:
    async with payout_stack(backend, tmp_path) as stack:
        expected = await credit_all(stack, "batch")
        await stack.start_payouts()
        paid = await stack.wait_paid(3)
        assert {p.orchestrator_id: p.paid_wei for p in paid} == expected
        transactions = await stack.transactions()
        redemptions = [t for t in transactions if t.kind == "batch_redeem"]
        assert len(redemptions) == 1, [(t.kind, t.status) for t in transactions]
        assert {p.tx_id for p in paid} == {redemptions[0].id}
        assert_contiguous([t.nonce for t in transactions])
        await assert_paid_exactly(stack, expected)
        # The deposit was empty: topped up to the target first, then the batch drew on it.
        assert [t.kind for t in transactions] == ["fund_deposit", "batch_redeem"]
        assert stack.deposit_wei() == wei("1") - sum(expected.values())
        # A credit below the threshold stays in the balance: the remainder.
        await stack.credit(stack.orchestrator_ids[0], "0.0004", "remainder")
        await stack.wait_paid(3)
        assert len(await stack.payouts_rows()) == 3
        assert await stack.balance(stack.orchestrator_ids[0]) == wei("0.0004")
        await assert_replay_rebuilds_the_debits(stack, tmp_path)


async def assert_replay_rebuilds_the_debits(stack: PayoutStack, tmp_path: Path) -> None:
    """The debits are ledger entries rebuilt from PAYOUTS: replay gives the live ledger."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'replayed.db'}"
    replayed = await run_payments(stack.stack.env, "replay", "--into", url)
    assert replayed.code == 0, replayed.stderr[-3000:]
    live = {(e.entry_key, e.amount_wei, e.reason) for e in await entries(stack.stack.sessions)}
    engine = make_engine(url, writer=False)
    try:
        rebuilt = {
            (e.entry_key, e.amount_wei, e.reason) for e in await entries(make_sessionmaker(engine))
        }
        assert rebuilt == live
        assert {r for r in rebuilt if r[2] == "payout"}, "the replay holds the payout debits"
        assert await balances(make_sessionmaker(engine)) == await balances(stack.stack.sessions)
    finally:
        await engine.dispose()


async def crash_then_resume(stack: PayoutStack, point: str) -> None:
    worker = await stack.start_payouts(PAYMENTS_FAULT_POINTS=point)
    code = await asyncio.to_thread(worker.wait_exit, 60.0)
    assert code == FAULT_EXIT_CODE, stack.logs()
    assert f"fault point {point} reached" in worker.log_text()
    await stack.start_payouts(copy=1)


@pytest.mark.parametrize(
    "point", ["payouts:after_sign_before_broadcast", "payouts:after_broadcast_before_receipt"]
)
async def test_a_crash_between_the_steps_resumes_and_pays_once(point: str, tmp_path: Path) -> None:
    async with payout_stack("sqlite", tmp_path) as stack:
        expected = await credit_all(stack, "crash")
        await crash_then_resume(stack, point)
        await stack.wait_paid(3)
        await assert_paid_exactly(stack, expected)
        redemptions = [t for t in await stack.transactions() if t.kind == "batch_redeem"]
        # The stored transaction was (re)broadcast: no second nonce for the same payouts.
        assert len(redemptions) == 1
        assert_contiguous([t.nonce for t in await stack.transactions()])


@pytest.mark.parametrize("backend", database_backends())
async def test_two_payouts_workers_pay_every_payout_once_with_contiguous_nonces(
    backend: str, tmp_path: Path
) -> None:
    async with payout_stack(backend, tmp_path, PAYMENTS_LIVEPEER_BATCH_PAYOUTS="false") as stack:
        await asyncio.gather(stack.start_payouts(), stack.start_payouts(copy=1))
        expected = await credit_all(stack, "two")
        await stack.wait_paid(3)
        await assert_paid_exactly(stack, expected)
        transactions = await stack.transactions()
        assert sorted(t.kind for t in transactions if t.kind != "fund_deposit") == ["redeem"] * 3
        assert_contiguous([t.nonce for t in transactions])


async def test_a_ticket_that_fails_in_its_batch_is_retried_unchanged(tmp_path: Path) -> None:
    async with payout_stack(
        "sqlite", tmp_path, PAYMENTS_PAYOUT_RETRY_AFTER_FAILURE_SECONDS="2"
    ) as stack:
        failing = stack.orchestrator_ids[1]
        set_active(stack, stack.recipient(failing), False)
        expected = await credit_all(stack, "fails")
        await stack.start_payouts()
        first = await stack.wait_paid(2)
        assert failing not in {p.orchestrator_id for p in first}

        async def retried() -> Payout | None:
            rows = [p for p in await stack.payouts_rows() if p.orchestrator_id == failing]
            return rows[0] if rows and rows[0].status == "retry" else None

        waiting = await wait_until(retried, 30.0, stack.stack)
        assert waiting.reason == "ticket not redeemed in its batch"
        assert failing not in await stack.debits()
        set_active(stack, stack.recipient(failing), True)
        paid = await stack.wait_paid(3)
        again = next(p for p in paid if p.orchestrator_id == failing)
        assert again.ticket_hash == waiting.ticket_hash  # the same signed ticket, not a new one
        await assert_paid_exactly(stack, expected)


async def test_receipt_timeout_keeps_the_payout_until_it_is_mined(tmp_path: Path) -> None:
    async with payout_stack(
        "sqlite", tmp_path, PAYMENTS_PAYOUT_RECEIPT_TIMEOUT_SECONDS="1"
    ) as stack:
        expected = await credit_all(stack, "timeout")
        stack.chain.anvil.rpc("evm_setAutomine", [False])
        worker = await stack.start_payouts()

        async def broadcast() -> bool:
            rows = await stack.payouts_rows()
            return len(rows) == 3 and all(p.status == "broadcast" for p in rows)

        # The deposit top-up is pending too: mine it alone, then the batch waits unmined.
        await wait_until(lambda: fund_pending(stack), 30.0, stack.stack)
        stack.chain.anvil.rpc("evm_mine")
        await wait_until(broadcast, 30.0, stack.stack)
        timeouts = worker.log_text().count(RECEIPT_TIMEOUT_LOG)

        async def timed_out_again() -> bool:
            return worker.log_text().count(RECEIPT_TIMEOUT_LOG) > timeouts

        # A whole receipt wait ran out after the batch was sent: still broadcast, no debit.
        await wait_until(timed_out_again, 30.0, stack.stack)
        assert await broadcast()
        assert await stack.debits() == {}
        stack.chain.anvil.rpc("evm_mine")
        await stack.wait_paid(3)
        await assert_paid_exactly(stack, expected)


async def fund_pending(stack: PayoutStack) -> bool:
    return any(
        t.kind == "fund_deposit" and t.status == "broadcast" for t in await stack.transactions()
    )


async def test_a_reverted_transfer_releases_the_claim_and_debits_nothing(tmp_path: Path) -> None:
    async with payout_stack(
        "sqlite", tmp_path, strategy="eth_transfer", with_refusing=True
    ) as stack:
        expected = await credit_all(stack, "revert")
        await stack.start_payouts()
        await stack.wait_paid(3)
        # Its address is a contract that refuses ETH: the transfer is mined and reverts.
        refusing = REFUSING_ORCHESTRATOR
        await stack.credit(refusing, "0.002", "revert-refusing")

        async def reverted() -> Payout | None:
            rows = [p for p in await stack.payouts_rows() if p.orchestrator_id == refusing]
            return rows[0] if rows and rows[0].status == "reverted" else None

        payout = await wait_until(reverted, 30.0, stack.stack)
        assert payout.paid_wei is None
        assert await stack.balance(refusing) == wei("0.002")
        assert refusing not in await stack.debits()
        assert await stack.claims() == []
        tx = next(t for t in await stack.transactions() if t.id == payout.tx_id)
        assert (tx.status, tx.receipt_status) == ("reverted", 0)
        paid_to = {p.orchestrator_id: p.paid_wei for p in await stack.payouts_rows()}
        assert {oid: paid_to[oid] for oid in expected} == expected


async def test_an_empty_deposit_without_autofund_fails_clearly_and_debits_nothing(
    tmp_path: Path,
) -> None:
    async with payout_stack(
        "sqlite", tmp_path, PAYMENTS_LIVEPEER_DEPOSIT_AUTOFUND="false"
    ) as stack:
        await credit_all(stack, "nofund")
        worker = await stack.start_payouts()

        async def failed() -> list[Payout] | None:
            rows = await stack.payouts_rows()
            return rows if len(rows) == 3 and all(p.status == "failed" for p in rows) else None

        rows = await wait_until(failed, 30.0, stack.stack)
        assert all("PAYMENTS_LIVEPEER_DEPOSIT_AUTOFUND is off" in (p.reason or "") for p in rows)
        assert "payouts not sent" in worker.log_text()
        assert await stack.debits() == {}
        assert stack.transfers() == []
        assert stack.deposit_wei() == 0
        assert await stack.claims() == []


async def test_a_stuck_transfer_is_replaced_with_the_same_nonce_and_paid_once(
    tmp_path: Path,
) -> None:
    async with payout_stack(
        "sqlite",
        tmp_path,
        strategy="eth_transfer",
        PAYMENTS_PAYOUT_RECEIPT_TIMEOUT_SECONDS="1",
        PAYMENTS_PAYOUT_REPLACE_AFTER_SECONDS="1",
    ) as stack:
        oid = stack.orchestrator_ids[0]
        recipient = stack.recipient(oid)
        before = stack.w3.eth.get_balance(recipient)
        stack.chain.anvil.rpc("evm_setAutomine", [False])
        await stack.credit(oid, "0.002", "stuck")
        await stack.start_payouts()

        async def bumped() -> ChainTransaction | None:
            rows = await stack.transactions()
            return rows[0] if rows and rows[0].fee_bumps >= 1 else None

        tx = await wait_until(bumped, 30.0, stack.stack)
        assert len(tx.hashes or []) == tx.fee_bumps + 1
        stack.chain.anvil.rpc("evm_mine")
        await stack.wait_paid(1)
        mined = (await stack.transactions())[0]
        assert mined.nonce == tx.nonce and mined.status == "mined"
        assert mined.tx_hash in (mined.hashes or [])
        assert len(await stack.transactions()) == 1  # replacements share the row and the nonce
        assert stack.w3.eth.get_balance(recipient) - before == wei("0.002")
        assert await stack.debits() == {oid: -wei("0.002")}
