"""Payouts worker: pays orchestrators their balances on chain, never twice.

Consumes
  - LEDGER `ledger.entries.>` through durable `payouts-ledger`: a balance that moved to or past
    PAYMENT_PAYOUT_THRESHOLD_ETH wakes the payout cycle at once (the cycle also runs every
    PAYMENT_INTERVAL_SECONDS, so a missed wake-up only delays a payout).
  - PAYOUTS `payouts.state.>` through durable `payouts-debits`: a `paid` or `short_paid` payout
    becomes its ledger debit (reason `payout`, entry key `payout:<payout_key>`), and the
    orchestrator's claim is released in the same transaction.

Produces
  - chain transactions from the payer key: ETH transfers (`eth_transfer`) or TicketBroker
    redemptions of always-winning tickets, single or batched (`livepeer_ticket`), and deposit
    top-ups;
  - PAYOUTS `payouts.state.<orch>` (every payout state) and `payouts.transactions.<sender>`
    (every transaction state), through the outbox;
  - ledger debits, published to LEDGER like every entry.

Guarantee
  A payout is claimed (one open payout per orchestrator, a primary key), then its transaction is
  signed with a nonce allocated in the database and stored before it is broadcast; a crash at
  any step resumes from what was stored (shared.payout_engine). The debit is written exactly
  once (inbox and unique entry key) and only after the receipt, and the balance stays claimed
  until it is, so it is never paid twice. Only the lease holder sends, so nonces are contiguous
  whatever the number of worker copies.

Limits
  PAYMENT_DRY_RUN (the default) or no payer key: payouts are only logged. Eligibility:
  registered, eligible_for_payments, not denylisted, not in a cooldown (docs/payouts.md). A
  receipt not seen within PAYMENTS_PAYOUT_RECEIPT_TIMEOUT_SECONDS leaves the payout broadcast
  for the next cycle; fee bumps stop after MAX_FEE_BUMPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.events import PayoutStateV1
from contracts.streams import PAYOUTS_DEBITS_CONSUMER, PAYOUTS_LEDGER_CONSUMER, ConsumerSpec
from shared.db.repositories import ledger
from shared.db.repositories import payouts as payout_store
from shared.db.repositories.ledger import NewEntry
from shared.event_consumer import Decoded, EventConsumer, Outcome
from shared.money import eth_to_wei
from shared.payout_chain import PayerChain, load_payer
from shared.payout_engine import PayoutEngine
from shared.settings import ConfigurationError, load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)

settings = load_settings()
runtime = WorkerRuntime("payouts", settings)
app = runtime.app
THRESHOLD_WEI = eth_to_wei(settings.payout_threshold_eth)
DEBITED_STATUSES = ("paid", "short_paid")


class PayoutDebitProjector:
    """Writes the debit of each paid payout and releases its orchestrator's claim."""

    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[PayoutStateV1]]
    ) -> list[Outcome]:
        entries = []
        outcomes = []
        for item in items:
            event = item.event
            if event.status not in DEBITED_STATUSES or not event.paid_wei:
                outcomes.append(Outcome.done({"debited": False}))
                continue
            entries.append(debit_entry(item))
            await payout_store.release_claim_of_key(session, event.payout_key)
            outcomes.append(Outcome.done({"debited": True}))
        await ledger.post_entries(session, entries)
        return outcomes


def debit_entry(item: Decoded[PayoutStateV1]) -> NewEntry:
    event = item.event
    assert event.paid_wei is not None
    return NewEntry(
        entry_key=f"payout:{event.payout_key}",
        orchestrator_id=event.orchestrator_id,
        amount_wei=-event.paid_wei,
        reason="payout",
        source_stream=item.delivery.stream,
        source_seq=item.delivery.stream_seq,
        source_key=item.key,
        occurred_at=event.occurred_at,
        metadata={
            "payout_key": event.payout_key,
            "recipient": event.recipient,
            "strategy": event.strategy,
            "tx_hash": event.tx_hash,
            "nonce": event.nonce,
            "ticket_hash": event.ticket_hash,
            "status": event.status,
        },
    )


payout_debits = runtime.event_consumer(
    consumer=PAYOUTS_DEBITS_CONSUMER.durable,
    schemas={PayoutStateV1.SCHEMA: PayoutStateV1},
    projector=PayoutDebitProjector(),
)
ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = [(PAYOUTS_DEBITS_CONSUMER, payout_debits)]


# -- the cycle --------------------------------------------------------------------------------


class PayoutLoop:
    """Runs the payout cycle every PAYMENT_INTERVAL_SECONDS, or sooner when woken."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.engine: PayoutEngine | None = None

    async def start(self) -> None:
        paying_tickets = (
            not settings.payment_dry_run and settings.payout_strategy == "livepeer_ticket"
        )
        if paying_tickets and not settings.livepeer_ticket_broker_address:
            raise ConfigurationError(
                "PAYMENTS_PAYOUT_STRATEGY=livepeer_ticket needs "
                "PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS"
            )
        payer = load_payer(settings)
        chain = PayerChain.connect(settings, payer) if payer is not None else None
        if settings.payment_dry_run or chain is None:
            log.warning("payouts in dry-run mode: nothing is signed or sent")
        assert runtime.relay is not None
        self.engine = PayoutEngine(
            settings,
            runtime.sessionmaker,
            chain,
            holder=f"{socket.gethostname()}:{os.getpid()}",
            publish=runtime.relay.submit,
        )
        self._task = asyncio.create_task(self._run(), name="payouts:cycle")

    async def _run(self) -> None:
        assert self.engine is not None
        while True:  # for the life of the worker; cancelled on shutdown
            try:
                await self.engine.run_cycle()
            except Exception:
                log.exception("payout cycle failed; the next cycle resumes from the database")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), settings.payment_interval_seconds)
            self.wake.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


loop = PayoutLoop()
runtime.startup_hooks.append(loop.start)
runtime.shutdown_hooks.append(loop.stop)


@runtime.consume(PAYOUTS_LEDGER_CONSUMER)
async def on_ledger_entries(messages: list[Msg]) -> None:
    """Wake the cycle when a balance reached the threshold; the cycle itself reads balances."""
    for message in messages:
        try:
            balance = int(json.loads(message.data)["balance_after_wei"])
        except (ValueError, KeyError, TypeError):
            balance = THRESHOLD_WEI  # unreadable: let the cycle look
        if balance >= THRESHOLD_WEI:
            loop.wake.set()
    for message in messages:
        await message.ack()


@runtime.consume(PAYOUTS_DEBITS_CONSUMER)
async def on_payout_states(messages: list[Msg]) -> None:
    await payout_debits.handle(messages)
