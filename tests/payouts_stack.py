"""A payouts stack: Anvil with the TicketBroker double (as `payments devchain` deploys it), a
real nats-server, a database, and the registry, ledger, api and payouts processes.

Orchestrators are bootstrapped with the double's registered, active recipients as addresses,
credited through `POST /api/ledger/adjustments`, and paid by payouts worker processes that sign
with the devchain's payer key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import col
from web3 import Web3
from web3.contract import Contract

from shared.chain.devchain import DevChain, start_devchain
from shared.chain.devtools import connect, transact
from shared.chain.ticket_broker import load_abi
from shared.db.payout_models import ChainTransaction, Payout, PayoutClaim
from shared.db.repositories import ledger as ledger_repo
from shared.money import eth_to_wei
from tests.harness import Process, worker_process
from tests.ledger_stack import (
    ADMIN,
    LedgerStack,
    call,
    entries,
    ledger_stack,
    wait_until,
)

PAYOUT_ORCHESTRATORS = 3
THRESHOLD_ETH = "0.001"
REFUSING_ORCHESTRATOR = "orch-refuses"


@dataclass
class PayoutStack:
    stack: LedgerStack
    chain: DevChain
    w3: Web3
    broker: Contract
    orchestrator_ids: list[str]
    payouts: list[Process] = field(default_factory=list)

    def payouts_worker(self, copy: int = 0, **extra_env: str) -> Process:
        worker = worker_process("payouts", self.stack.env, self.stack.tmp, copy)
        worker.extra_env = extra_env
        return worker

    async def start_payouts(self, copy: int = 0, **extra_env: str) -> Process:
        worker = self.payouts_worker(copy, **extra_env)
        worker.start(**extra_env)
        await asyncio.to_thread(worker.wait_log, "worker started")
        self.payouts.append(worker)
        return worker

    def recipient(self, orchestrator_id: str) -> str:
        return self.chain.recipients[self.orchestrator_ids.index(orchestrator_id)]

    async def credit(self, orchestrator_id: str, amount_eth: str, key: str) -> None:
        answer = await call(
            self.stack.http,
            "POST",
            f"{self.stack.base}/api/ledger/adjustments",
            json={"orchestrator_id": orchestrator_id, "amount_eth": amount_eth},
            headers={**ADMIN, "Idempotency-Key": key},
        )
        assert answer.status in (200, 201, 202), answer.body

    def transfers(self) -> list[tuple[str, int]]:
        """(recipient, amount) of every WinningTicketTransfer, in chain order."""
        logs = self.broker.events.WinningTicketTransfer().get_logs(from_block=0)
        return [(log["args"]["recipient"], int(log["args"]["amount"])) for log in logs]

    def deposit_wei(self) -> int:
        info = self.broker.functions.getSenderInfo(self.chain.payer.address).call()
        return int(info[0][0])

    async def payouts_rows(self) -> list[Payout]:
        async with self.stack.sessions() as session:
            rows = await session.execute(select(Payout).order_by(col(Payout.id)))
            return list(rows.scalars())

    async def transactions(self) -> list[ChainTransaction]:
        async with self.stack.sessions() as session:
            rows = await session.execute(
                select(ChainTransaction).order_by(col(ChainTransaction.nonce))
            )
            return list(rows.scalars())

    async def claims(self) -> list[str]:
        async with self.stack.sessions() as session:
            rows = await session.execute(select(col(PayoutClaim.orchestrator_id)))
            return list(rows.scalars())

    async def balance(self, orchestrator_id: str) -> int:
        async with self.stack.sessions() as session:
            return await ledger_repo.balance_wei(session, orchestrator_id)

    async def debits(self) -> dict[str, int]:
        rows = await entries(self.stack.sessions)
        found: dict[str, int] = {}
        for row in rows:
            if row.reason == "payout":
                found[row.orchestrator_id] = found.get(row.orchestrator_id, 0) + row.amount_wei
        return found

    async def wait_paid(self, count: int, timeout_s: float = 60.0) -> list[Payout]:
        """Until `count` payouts are paid and debited (their claims released)."""

        async def done() -> list[Payout] | None:
            rows = [p for p in await self.payouts_rows() if p.status in ("paid", "short_paid")]
            debits = await self.debits()
            if len(rows) >= count and len(debits) >= len({p.orchestrator_id for p in rows}):
                return rows
            return None

        result: list[Payout] = await wait_until(done, timeout_s, self.stack)
        return result

    def logs(self) -> str:
        return self.stack.logs() + "\n".join(
            f"--- {p.name}\n{p.log_text()[-4000:]}" for p in self.payouts
        )


def payout_env(chain: DevChain, strategy: str, **extra: str) -> dict[str, str]:
    env = {
        "PAYMENT_DRY_RUN": "false",
        "PAYMENT_PRIVATE_KEY": chain.payer.private_key,
        "ETH_RPC_URL": chain.rpc_url,
        "ETH_CHAIN_ID": str(connect(chain.rpc_url).eth.chain_id),
        "PAYMENTS_PAYOUT_STRATEGY": strategy,
        "PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS": chain.broker_address,
        "PAYMENT_PAYOUT_THRESHOLD_ETH": THRESHOLD_ETH,
        "PAYMENT_INTERVAL_SECONDS": "0.5",
        "PAYMENTS_PAYOUT_RECEIPT_TIMEOUT_SECONDS": "5",
        "PAYMENTS_LIVEPEER_DEPOSIT_TARGET_ETH": "1",
        "PAYMENTS_LIVEPEER_DEPOSIT_LOW_WATERMARK_ETH": "0.5",
        # A crashed worker's hold on the payer lapses in seconds, so its successor resumes.
        "PAYMENTS_PAYOUT_LEASE_SECONDS": "2",
    }
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def payout_stack(
    backend: str,
    tmp: Path,
    strategy: str = "livepeer_ticket",
    *,
    with_refusing: bool = False,
    metadata: dict[str, dict[str, Any]] | None = None,
    **env_extra: str,
) -> AsyncIterator[PayoutStack]:
    """`metadata` adds registration fields per orchestrator id. `with_refusing` adds
    REFUSING_ORCHESTRATOR, whose address is the double itself: a
    contract without a receive function, so an ETH transfer to it reverts."""
    chain = start_devchain(port=None)
    try:
        ids = [f"orch-pay{i}" for i in range(PAYOUT_ORCHESTRATORS)]
        bootstrap: list[dict[str, Any]] = [
            {"orchestrator_id": oid, "address": address, **(metadata or {}).get(oid, {})}
            for oid, address in zip(ids, chain.recipients, strict=True)
        ]
        if with_refusing:
            bootstrap.append(
                {"orchestrator_id": REFUSING_ORCHESTRATOR, "address": chain.broker_address}
            )
        env = payout_env(chain, strategy, **env_extra)
        async with ledger_stack(backend, tmp, bootstrap, **env) as stack:
            w3 = connect(chain.rpc_url)
            broker = w3.eth.contract(address=chain.broker_address, abi=load_abi("ticket_broker"))
            built = PayoutStack(stack, chain, w3, broker, ids)
            try:
                yield built
            finally:
                for worker in built.payouts:
                    worker.terminate()
    finally:
        chain.anvil.stop()


def set_active(stack: PayoutStack, recipient: str, active: bool) -> None:
    """Make a recipient (in)active in the double: its tickets then fail inside a batch."""
    owner = stack.chain.payer
    full = stack.w3.eth.contract(address=stack.chain.broker_address, abi=_double_abi())
    transact(stack.w3, owner, full.functions.setTranscoders([recipient], True, active))


def _double_abi() -> list[dict[str, Any]]:
    from shared.chain.devchain import compile_ticket_broker_double

    return list(compile_ticket_broker_double().abi)


def wei(amount_eth: str) -> int:
    return eth_to_wei(Decimal(amount_eth))
