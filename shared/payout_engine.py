"""The payout cycle: claim due balances, sign, store, broadcast, confirm, and hand the debit on.

Every step that could move money is written to the database before it happens, so a crash at
any point resumes from what was stored and never pays twice:

1. **claim**: a payout row and its orchestrator's claim (primary key: one open payout each);
2. **sign**: the nonce comes from `signer_nonces` and the signed raw transaction is stored with
   it (one row per sender and nonce) before anything is sent;
3. **broadcast** the stored bytes (again after a crash: same hash, harmless);
4. **confirm** from the receipt of whichever of the nonce's attempts was mined, after
   PAYMENTS_PAYOUT_CONFIRMATIONS blocks, ticket by ticket for TicketBroker redemptions (a batch
   succeeds even when a ticket inside it fails);
5. the `paid` state goes to the PAYOUTS stream through the outbox, and the debits consumer writes
   the ledger debit (reason `payout`) and releases the claim in one transaction, so the balance
   is never paid again before it is debited, and `payments replay` rebuilds the debit.

A receipt timeout keeps the payout `broadcast`; a transaction without a receipt for
PAYMENTS_PAYOUT_REPLACE_AFTER_SECONDS is re-signed with the same nonce and higher fees; a revert
releases an ETH transfer's claim with nothing debited. A ticket is public once broadcast, so a
ticket that a mined transaction did not redeem (or whose transaction reverted) is sent again
unchanged, and replaced only when it has expired unused.

Only the holder of the payouts lease drives the payer account, so its transactions form one
ordered queue with contiguous nonces; another worker copy takes over when the lease lapses.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from web3.types import TxReceipt

from shared.chain.ticket_broker import BATCH_GAS_PER_TICKET, Fees, RedemptionReport
from shared.chain.tickets import SignedTicket, Ticket, create_signed_ticket
from shared.db.models import Balance, Orchestrator
from shared.db.payout_models import ChainTransaction, Payout
from shared.db.repositories import outbox
from shared.db.repositories import payouts as store
from shared.faults import fault_point
from shared.money import eth_to_wei
from shared.observability import PAYOUTS
from shared.payout_chain import PayerChain, TxPlan
from shared.settings import Settings

log = logging.getLogger(__name__)

RECEIPT_POLL_S = 0.25
# A replacement must raise both fees by at least 12.5 % for nodes to accept it.
FEE_BUMP_PER_MILLE = 1125
MAX_FEE_BUMPS = 5
MAX_CLAIMS_PER_CYCLE = 500
# The only states a payout is signed from.
SENDABLE_STATUSES = ("claimed", "retry")

Publish = Callable[[Sequence[outbox.PendingOutbox]], Awaitable[None]]


@dataclass(frozen=True)
class Due:
    orchestrator_id: str
    recipient: str
    balance_wei: int


@dataclass(frozen=True)
class Skip:
    orchestrator_id: str
    recipient: str
    balance_wei: int
    cause: str  # names the cause once: a new cooldown is a new skip record
    reason: str


def ineligibility(orchestrator: Orchestrator, denylist: frozenset[str]) -> tuple[str, str] | None:
    """(cause, reason) when the orchestrator may not be paid now, else None."""
    if orchestrator.denylisted or orchestrator.address.lower() in denylist:
        return "denylisted", "denylisted: payments are refused"
    expires = orchestrator.cooldown_expires_at
    if expires is not None:
        # A cooldown lasts until a healthy report after its end clears it (the registry).
        return (
            f"cooldown:{expires.isoformat()}",
            f"in a cooldown after repeated health misses, until a healthy report after "
            f"{expires.isoformat()}; credits keep accruing and are paid after it",
        )
    if not orchestrator.eligible_for_payments:
        detail = "not in the top 100" if not orchestrator.is_top_100 else "marked ineligible"
        return f"ineligible:{detail}", f"not eligible for payments ({detail})"
    return None


def ticket_to_json(signed: SignedTicket) -> dict[str, Any]:
    t = signed.ticket
    return {
        "recipient": t.recipient,
        "sender": t.sender,
        "face_value_wei": str(t.face_value_wei),
        "win_prob": str(t.win_prob),
        "sender_nonce": str(t.sender_nonce),
        "recipient_rand_hash": t.recipient_rand_hash.hex(),
        "aux_data": t.aux_data.hex(),
        "signature": signed.signature.hex(),
        "recipient_rand": str(signed.recipient_rand),
    }


def ticket_from_json(data: dict[str, Any]) -> SignedTicket:
    ticket = Ticket(
        recipient=data["recipient"],
        sender=data["sender"],
        face_value_wei=int(data["face_value_wei"]),
        win_prob=int(data["win_prob"]),
        sender_nonce=int(data["sender_nonce"]),
        recipient_rand_hash=bytes.fromhex(data["recipient_rand_hash"]),
        aux_data=bytes.fromhex(data["aux_data"]),
    )
    return SignedTicket(
        ticket=ticket,
        signature=bytes.fromhex(data["signature"]),
        recipient_rand=int(data["recipient_rand"]),
    )


def chunk_for_batches(
    payouts: Sequence[Payout], max_tickets: int, max_total_wei: int
) -> list[list[Payout]]:
    """Chunks of at most `max_tickets` whose face values sum to at most `max_total_wei` (the
    deposit target, as the original); a payout larger than that goes alone."""
    chunks: list[list[Payout]] = []
    current: list[Payout] = []
    total = 0
    for payout in payouts:
        fits = len(current) < max_tickets and total + payout.amount_wei <= max_total_wei
        if current and not fits:
            chunks.append(current)
            current, total = [], 0
        current.append(payout)
        total += payout.amount_wei
    if current:
        chunks.append(current)
    return chunks


def bumped(fees: Fees, suggested: Fees) -> Fees:
    """Fees a node accepts as a replacement: both at least 12.5 % (+1 wei) above the old."""
    return Fees(
        max(
            fees.max_fee_per_gas_wei * FEE_BUMP_PER_MILLE // 1000 + 1, suggested.max_fee_per_gas_wei
        ),
        max(
            fees.max_priority_fee_per_gas_wei * FEE_BUMP_PER_MILLE // 1000 + 1,
            suggested.max_priority_fee_per_gas_wei,
        ),
    )


class PayoutEngine:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        chain: PayerChain | None,
        holder: str,
        publish: Publish,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.chain = chain
        self.holder = holder
        self.publish = publish
        self.threshold_wei = eth_to_wei(settings.payout_threshold_eth)
        self.strategy = settings.payout_strategy
        self._simulated: dict[str, int] = {}

    @property
    def lease_name(self) -> str:
        return f"payouts:{self.chain.sender if self.chain else 'dry-run'}"

    # -- the cycle --------------------------------------------------------------------------

    async def run_cycle(self) -> None:
        if self.settings.payment_dry_run or self.chain is None:
            await self._simulate()
            return
        if not await self._hold_lease():
            return
        await self._resume()
        if self.strategy == "livepeer_ticket" and self.settings.livepeer_deposit_autofund:
            await self._keep_deposit_above_watermark()
        await self._claim_due()
        await self._send_claimed()
        await self._await_receipts()

    async def _hold_lease(self) -> bool:
        async with self.sessionmaker() as session, session.begin():
            return await store.take_lease(
                session, self.lease_name, self.holder, self.settings.payout_lease_seconds
            )

    async def _commit(self, session: AsyncSession) -> None:
        await session.commit()
        for state in session.info.pop(store.SESSION_PAYOUT_STATES, []):
            PAYOUTS.labels(state).inc()
        await self.publish(outbox.pending_of(session))

    # -- due balances -----------------------------------------------------------------------

    async def due(self, session: AsyncSession) -> list[Due]:
        """Balances at or above the threshold of eligible orchestrators without an open payout
        (or one that reverted or failed within PAYMENTS_PAYOUT_RETRY_AFTER_FAILURE_SECONDS)."""
        due, _skipped = await self.survey(session)
        return due

    async def survey(self, session: AsyncSession) -> tuple[list[Due], list[Skip]]:
        """Balances at or above the threshold: the due ones, and the ineligible ones with why.

        Eligible: registered, not denylisted (record or PAYMENTS_ADDRESS_DENYLIST), not in a
        cooldown, and `eligible_for_payments` (docs/payouts.md).
        """
        rows = await session.execute(select(col(Balance.orchestrator_id), col(Balance.balance_wei)))
        balances = {oid: int(wei) for oid, wei in rows.all() if int(wei) >= self.threshold_wei}
        if not balances:
            return [], []
        waiting = await store.claimed_orchestrators(session) | await store.recently_failed(
            session, self.settings.payout_retry_after_failure_seconds
        )
        found = await session.execute(
            select(Orchestrator).where(col(Orchestrator.orchestrator_id).in_(list(balances)))
        )
        denylist = frozenset(self.settings.address_denylist)
        due, skipped = [], []
        for orchestrator in found.scalars():
            oid = orchestrator.orchestrator_id
            if oid in waiting:
                continue
            why = ineligibility(orchestrator, denylist)
            if why is not None:
                skipped.append(Skip(oid, orchestrator.address, balances[oid], *why))
                continue
            due.append(Due(oid, orchestrator.address, balances[oid]))
        return sorted(due, key=lambda d: d.orchestrator_id), skipped

    async def _record_skips(self, session: AsyncSession, skipped: list[Skip]) -> None:
        """One `skipped` payout per orchestrator and cause, saying why it was not paid."""
        for skip in skipped:
            key = f"skipped:{skip.orchestrator_id}:{skip.cause}"
            exists = await session.execute(
                select(col(Payout.id)).where(col(Payout.payout_key) == key)
            )
            if exists.first() is not None:
                continue
            now = datetime.now(UTC)
            payout = Payout(
                payout_key=key,
                orchestrator_id=skip.orchestrator_id,
                recipient=skip.recipient,
                strategy=self.strategy,
                amount_wei=skip.balance_wei,
                status="skipped",
                reason=skip.reason,
                created_at=now,
                updated_at=now,
            )
            session.add(payout)
            await session.flush()
            await store.announce(session, payout)
            log.info(
                "payout skipped",
                extra={"orchestrator_id": skip.orchestrator_id, "reason": skip.reason},
            )

    async def _simulate(self) -> None:
        """Dry run: say what would be paid, once per balance; sign nothing, change nothing."""
        async with self.sessionmaker() as session:
            due = await self.due(session)
        for item in due:
            if self._simulated.get(item.orchestrator_id) == item.balance_wei:
                continue
            self._simulated[item.orchestrator_id] = item.balance_wei
            log.info(
                "dry run: would pay",
                extra={
                    "orchestrator_id": item.orchestrator_id,
                    "recipient": item.recipient,
                    "amount_wei": str(item.balance_wei),
                    "strategy": self.strategy,
                },
            )

    async def _claim_due(self) -> None:
        async with self.sessionmaker() as session:
            due, skipped = await self.survey(session)
            await self._record_skips(session, skipped)
            for item in due[:MAX_CLAIMS_PER_CYCLE]:
                now = datetime.now(UTC)
                payout = Payout(
                    payout_key=f"payout:{item.orchestrator_id}:{uuid.uuid4().hex}",
                    orchestrator_id=item.orchestrator_id,
                    recipient=item.recipient,
                    strategy=self.strategy,
                    amount_wei=item.balance_wei,
                    status="claimed",
                    created_at=now,
                    updated_at=now,
                )
                if await store.claim(session, payout) is not None:
                    await store.announce(session, payout)
            await self._commit(session)

    # -- sending ----------------------------------------------------------------------------

    async def _send_claimed(self) -> None:
        async with self.sessionmaker() as session:
            ready = await store.with_status(session, SENDABLE_STATUSES)
        # A ticket that failed in its batch goes out again, but not every cycle: whatever made
        # it fail (an inactive recipient, say) would cost a batch's gas each time.
        wait = timedelta(seconds=self.settings.payout_retry_after_failure_seconds)
        now = datetime.now(UTC)
        ready = [
            p
            for p in ready
            if p.status == "claimed" or p.updated_at is None or now - p.updated_at >= wait
        ]
        if not ready:
            return
        if self.strategy == "eth_transfer":
            for payout in ready:
                await self._send_transfer(payout)
            return
        await self._send_tickets(ready)

    async def _send_transfer(self, payout: Payout) -> None:
        chain = self._chain()
        plan = await chain.transfer_plan(payout.recipient, payout.amount_wei)
        tx = await self._sign_and_store(plan, [payout], {})
        if tx is not None:
            await self._broadcast(tx)

    async def _send_tickets(self, ready: list[Payout]) -> None:
        usable = [p for p in ready if await self._ticket_still_open(p)]
        max_tickets = self.settings.livepeer_batch_max_tickets
        if not self.settings.livepeer_batch_payouts:
            max_tickets = 1
        target = eth_to_wei(self.settings.livepeer_deposit_target_eth)
        for chunk in chunk_for_batches(usable, max_tickets, max(target, 1)):
            problem = await self._ensure_deposit(sum(p.amount_wei for p in chunk))
            if problem is not None:
                await self._fail_unsigned(chunk, problem)
                continue
            tickets = await self._tickets_for(chunk)
            plan = self._chain().redeem_plan(list(tickets.values()), BATCH_GAS_PER_TICKET)
            tx = await self._sign_and_store(plan, chunk, tickets)
            if tx is not None:
                await self._broadcast(tx)

    async def _tickets_for(self, chunk: list[Payout]) -> dict[int, SignedTicket]:
        """The payout's stored ticket (a retry), or a fresh always-winning one."""
        chain = self._chain()
        tickets: dict[int, SignedTicket] = {}
        aux = None
        for payout in chunk:
            assert payout.id is not None
            if payout.ticket is not None:
                tickets[payout.id] = ticket_from_json(payout.ticket)
                continue
            if aux is None:
                aux = await chain.ticket_broker().aux_data()
            tickets[payout.id] = create_signed_ticket(
                payout.recipient, payout.amount_wei, aux, chain.account.key
            )
        return tickets

    async def _ticket_still_open(self, payout: Payout) -> bool:
        """A retried ticket that is used or expired does not go out again."""
        if payout.ticket is None:
            return True
        broker = self._chain().ticket_broker()
        signed = ticket_from_json(payout.ticket)
        if await broker.is_ticket_used(signed.hash):
            # Redeemed outside our transactions (its calldata was public): it paid its face
            # value to the recipient, so the balance is debited by that.
            await self._finish(
                payout.id, "paid", signed.face_value_wei, "redeemed by another transaction"
            )
            return False
        if await broker.ticket_expired(signed.ticket):
            await self._finish(
                payout.id, "expired", None, "ticket expired unused; a new payout will follow"
            )
            return False
        return True

    async def _fail_unsigned(self, chunk: list[Payout], problem: str) -> None:
        log.error(
            "payouts not sent", extra={"reason": problem, "payouts": [p.payout_key for p in chunk]}
        )
        for payout in chunk:
            if payout.ticket is None:  # never signed, so never public: safe to drop
                await self._finish(payout.id, "failed", None, problem)

    async def _finish(
        self, payout_id: int | None, status: str, paid_wei: int | None, reason: str | None
    ) -> None:
        async with self.sessionmaker() as session:
            payout = await session.get(Payout, payout_id)
            if payout is None:
                return
            payout.paid_wei = paid_wei
            store.set_status(payout, status, reason)
            if status in ("failed", "expired", "reverted"):
                await store.release_claim(session, payout)
            await store.announce(session, payout)
            await self._commit(session)

    async def _sign_and_store(
        self, plan: TxPlan, payouts: Sequence[Payout], tickets: dict[int, SignedTicket]
    ) -> ChainTransaction | None:
        """Allocate the nonce, sign, and store the raw transaction with its payouts, at once."""
        chain = self._chain()
        fees = await chain.fees()
        pending = await chain.pending_nonce()
        params = plan.params(await chain.chain_id())
        async with self.sessionmaker() as session:
            if not await store.take_lease(
                session, self.lease_name, self.holder, self.settings.payout_lease_seconds
            ):
                await session.rollback()
                return None
            nonce = await store.allocate_nonce(session, chain.sender, pending)
            signed = chain.sign(params, nonce, fees)
            now = datetime.now(UTC)
            tx_hash = "0x" + signed.tx_hash.hex()
            tx = ChainTransaction(
                kind=plan.kind,
                sender=chain.sender,
                nonce=nonce,
                status="signed",
                raw_tx=signed.raw_transaction,
                tx_params=params,
                tx_hash=tx_hash,
                hashes=[tx_hash],
                gas=plan.gas,
                value_wei=plan.value_wei,
                max_fee_per_gas_wei=fees.max_fee_per_gas_wei,
                max_priority_fee_per_gas_wei=fees.max_priority_fee_per_gas_wei,
                created_at=now,
                updated_at=now,
            )
            session.add(tx)
            await session.flush()
            assert tx.id is not None
            for stale in payouts:
                payout = await session.get(Payout, stale.id)
                assert payout is not None and payout.id is not None
                if payout.status not in SENDABLE_STATUSES:
                    # Sent by another copy meanwhile: never a second transaction for it.
                    await session.rollback()
                    return None
                payout.tx_id = tx.id
                if payout.id in tickets and payout.ticket is None:
                    payout.ticket = ticket_to_json(tickets[payout.id])
                    payout.ticket_hash = "0x" + tickets[payout.id].hash.hex()
                store.set_status(payout, "signed")
                await store.announce(session, payout, tx)
            await store.announce_transaction(session, tx, [p.payout_key for p in payouts])
            await self._commit(session)
        fault_point("payouts:after_sign_before_broadcast")
        return tx

    async def _broadcast(self, tx: ChainTransaction) -> None:
        await self._chain().broadcast(tx.raw_tx, tx.nonce, list(tx.hashes or [tx.tx_hash]))
        async with self.sessionmaker() as session:
            stored = await session.get(ChainTransaction, tx.id)
            if stored is None or stored.status != "signed":
                return
            stored.status = "broadcast"
            stored.broadcast_at = stored.updated_at = datetime.now(UTC)
            members = await store.of_transaction(session, stored.id or 0)
            for payout in members:
                store.set_status(payout, "broadcast")
                await store.announce(session, payout, stored)
            await store.announce_transaction(session, stored, [p.payout_key for p in members])
            await self._commit(session)
        fault_point("payouts:after_broadcast_before_receipt")

    # -- confirming -------------------------------------------------------------------------

    async def _resume(self) -> None:
        """Transactions a previous cycle (or a crashed worker) left in flight."""
        async with self.sessionmaker() as session:
            pending = await store.transactions_with_status(session, store.IN_FLIGHT_STATUSES)
        for tx in pending:
            if tx.status == "signed":
                await self._broadcast(tx)
            await self._check(tx)

    async def _await_receipts(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.payout_receipt_timeout_seconds
        while True:
            async with self.sessionmaker() as session:
                pending = await store.transactions_with_status(session, ("broadcast",))
            for tx in pending:
                await self._check(tx)
            if not pending:
                return
            if asyncio.get_running_loop().time() >= deadline:
                log.warning(
                    "receipt timeout: payouts stay broadcast until a later cycle sees them mined",
                    extra={"transactions": [t.tx_hash for t in pending]},
                )
                return
            if not await self._hold_lease():
                return
            await asyncio.sleep(RECEIPT_POLL_S)

    async def _check(self, tx: ChainTransaction) -> bool:
        """Settle `tx` if one of its attempts is mined deep enough; bump it if it is stuck."""
        chain = self._chain()
        receipt = await chain.receipt(list(tx.hashes or [tx.tx_hash]))
        if receipt is None:
            await self._replace_if_stuck(tx)
            return False
        depth = await chain.head() - int(receipt["blockNumber"]) + 1
        if depth < self.settings.payout_confirmations:
            return False
        await self._settle(tx, receipt)
        return True

    async def _replace_if_stuck(self, tx: ChainTransaction) -> None:
        if tx.status != "broadcast" or tx.broadcast_at is None or tx.tx_params is None:
            return
        waited = datetime.now(UTC) - tx.broadcast_at
        if waited < timedelta(seconds=self.settings.payout_replace_after_seconds):
            return
        if tx.fee_bumps >= MAX_FEE_BUMPS:
            log.error("transaction stuck after the last fee bump", extra={"tx_hash": tx.tx_hash})
            return
        chain = self._chain()
        old = Fees(tx.max_fee_per_gas_wei, tx.max_priority_fee_per_gas_wei)
        fees = bumped(old, await chain.fees())
        signed = chain.sign(tx.tx_params, tx.nonce, fees)
        async with self.sessionmaker() as session:
            stored = await session.get(ChainTransaction, tx.id)
            if stored is None or stored.status != "broadcast":
                return
            stored.raw_tx = signed.raw_transaction
            stored.tx_hash = "0x" + signed.tx_hash.hex()
            stored.hashes = [*(stored.hashes or []), stored.tx_hash]
            stored.max_fee_per_gas_wei = fees.max_fee_per_gas_wei
            stored.max_priority_fee_per_gas_wei = fees.max_priority_fee_per_gas_wei
            stored.fee_bumps += 1
            stored.broadcast_at = stored.updated_at = datetime.now(UTC)
            await store.announce_transaction(session, stored, [])
            await self._commit(session)
            replacement = stored
        log.warning(
            "replacing a stuck transaction",
            extra={"nonce": tx.nonce, "tx_hash": replacement.tx_hash},
        )
        await chain.broadcast(replacement.raw_tx, replacement.nonce, list(replacement.hashes or []))

    async def _settle(self, tx: ChainTransaction, receipt: TxReceipt) -> None:
        success = int(receipt["status"]) == 1
        async with self.sessionmaker() as session:
            stored = await session.get(ChainTransaction, tx.id)
            if stored is None or stored.status not in store.IN_FLIGHT_STATUSES:
                return  # settled by an earlier look
            stored.status = "mined" if success else "reverted"
            stored.tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
            stored.block_number = int(receipt["blockNumber"])
            stored.receipt_status = int(receipt["status"])
            stored.updated_at = datetime.now(UTC)
            members = await store.of_transaction(session, stored.id or 0)
            if stored.kind == "eth_transfer":
                await self._settle_transfer(session, members, success)
            elif stored.kind in ("redeem", "batch_redeem"):
                await self._settle_tickets(session, members, receipt, success)
            for payout in members:
                await store.announce(session, payout, stored)
            await store.announce_transaction(session, stored, [p.payout_key for p in members])
            await self._commit(session)
        log.info(
            "transaction settled",
            extra={"tx_hash": stored.tx_hash, "nonce": stored.nonce, "status": stored.status},
        )

    async def _settle_transfer(
        self, session: AsyncSession, members: list[Payout], success: bool
    ) -> None:
        for payout in members:
            if success:
                payout.paid_wei = payout.amount_wei
                store.set_status(payout, "paid")
            else:
                store.set_status(payout, "reverted", "transaction reverted; nothing was paid")
                await store.release_claim(session, payout)

    async def _settle_tickets(
        self, session: AsyncSession, members: list[Payout], receipt: TxReceipt, success: bool
    ) -> None:
        tickets = [ticket_from_json(p.ticket) for p in members if p.ticket is not None]
        report: RedemptionReport | None = None
        if success:
            report = self._chain().ticket_broker().redemption_report(receipt, tickets)
        outcomes = {"0x" + o.ticket_hash.hex(): o for o in (report.outcomes if report else ())}
        for payout in members:
            outcome = outcomes.get(payout.ticket_hash or "")
            if outcome is None or not outcome.redeemed:
                # The ticket is public now: the same one goes out again (never a second ticket).
                payout.tx_id = None
                payout.attempts += 1
                why = "transaction reverted" if not success else "ticket not redeemed in its batch"
                store.set_status(payout, "retry", why)
                continue
            payout.paid_wei = outcome.paid_wei
            store.set_status(
                payout,
                "paid" if outcome.fully_paid else "short_paid",
                None if outcome.fully_paid else "deposit and reserve paid less than the face value",
            )

    # -- the deposit (livepeer_ticket) ------------------------------------------------------

    async def _keep_deposit_above_watermark(self) -> None:
        broker = self._chain().ticket_broker()
        info = await broker.sender_info(self._chain().sender)
        low = eth_to_wei(self.settings.livepeer_deposit_low_watermark_eth)
        if info.deposit_wei >= low:
            return
        target = eth_to_wei(self.settings.livepeer_deposit_target_eth)
        await self._fund(target - info.deposit_wei)

    async def _ensure_deposit(self, required_wei: int) -> str | None:
        """None when the deposit covers `required_wei` (topping it up if allowed), else why not."""
        chain = self._chain()
        info = await chain.ticket_broker().sender_info(chain.sender)
        if info.deposit_wei >= required_wei:
            return None
        if not self.settings.livepeer_deposit_autofund:
            return (
                f"TicketBroker deposit {info.deposit_wei} wei is below the {required_wei} wei "
                "these tickets need, and PAYMENTS_LIVEPEER_DEPOSIT_AUTOFUND is off"
            )
        target = eth_to_wei(self.settings.livepeer_deposit_target_eth)
        if not await self._fund(max(target, required_wei) - info.deposit_wei):
            return "the deposit top-up was not mined in time; the payouts wait for it"
        info = await chain.ticket_broker().sender_info(chain.sender)
        if info.deposit_wei < required_wei:
            return f"TicketBroker deposit {info.deposit_wei} wei still below {required_wei} wei"
        return None

    async def _fund(self, amount_wei: int) -> bool:
        """fundDeposit(amount) through the same stored path as payouts; True once mined."""
        log.info("topping up the TicketBroker deposit", extra={"amount_wei": str(amount_wei)})
        tx = await self._sign_and_store(self._chain().fund_plan(amount_wei), [], {})
        if tx is None:
            return False
        await self._broadcast(tx)
        deadline = asyncio.get_running_loop().time() + self.settings.payout_receipt_timeout_seconds
        while asyncio.get_running_loop().time() < deadline:
            if await self._check(tx):
                return True
            await asyncio.sleep(RECEIPT_POLL_S)
        return False

    def _chain(self) -> PayerChain:
        if self.chain is None:
            raise RuntimeError("no payer key: payouts run in dry-run mode")
        return self.chain
