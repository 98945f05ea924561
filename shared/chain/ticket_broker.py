"""An async client for the Livepeer TicketBroker (the Arbitrum proxy, or our test double).

It uses only the real contract's ABI fragments (`contracts/abi/*.json`), so the same code runs
against `0xa8bB618B1520E284046F3dFc448851A1Ff26e41B` and against `payments devchain`. The
RoundsManager and BondingManager are found as on the real chain: TicketBroker.controller() →
Controller.getContract(keccak256("RoundsManager" | "BondingManager")). The double answers both
lookups with its own address.

Sending is split so a payout state machine can store each step: build the transaction (with an
explicit nonce and fees if it allocates them itself), sign it locally (`sign_transaction`: the
raw bytes and the hash exist before broadcast), broadcast the stored raw bytes, wait for the
receipt, then verify each ticket from the receipt's events (`redemption_report`). A batch
transaction has status 1 even when tickets inside it failed (ticketbroker.md §5), so only the
report says which tickets were paid, and with how much. A ticket that was not redeemed stays
redeemable by anyone until it expires (its calldata is public): retry that same ticket, and make
a new one only after it has expired unused (RedemptionReport.unredeemed).

    broker = TicketBrokerClient.connect(rpc_url, broker_address)
    aux = await broker.aux_data()
    tickets = [create_signed_ticket(r, wei, aux, key) for r, wei in due]
    tx = await broker.build_batch_redeem_tx(sender, tickets, nonce=n)
    signed = sign_transaction(tx, key)                      # store signed.raw_transaction
    await broker.broadcast(signed.raw_transaction)
    report = broker.redemption_report(await broker.wait_for_receipt(signed.tx_hash), tickets)
    report.paid                                             # {ticket hash: wei transferred}
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, cast

from eth_account import Account
from eth_typing import ABIEvent, ChecksumAddress
from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.providers.async_base import AsyncBaseProvider
from web3.types import LogReceipt, Nonce, TxParams, TxReceipt, Wei

from shared.chain.tickets import (
    AuxData,
    PrivateKey,
    SignedTicket,
    Ticket,
    batch_redeem_calldata,
    is_unexpired,
    read_aux_data,
    recipient_rand_hash,
    redeem_calldata,
)

ABI_PACKAGE = "contracts"
ABI_FOLDER = "abi"

ROUNDS_MANAGER_ID = keccak(text="RoundsManager")
BONDING_MANAGER_ID = keccak(text="BondingManager")
ZERO_ADDRESS = "0x" + "00" * 20

RPC_TIMEOUT_S = 10.0
RECEIPT_TIMEOUT_S = 120.0
RECEIPT_POLL_S = 0.1

# Batches never use eth_estimateGas as their limit: inner failures are swallowed, so the
# estimate leaves the last ticket to run out of gas silently (ticketbroker.md §5). Gas units per
# ticket, well above go-livepeer's single-redemption estimate on L1 (350k); on Arbitrum, where
# gas units include the L1 calldata charge, pass a measured `gas_per_ticket`.
BATCH_GAS_PER_TICKET = 500_000
BATCH_GAS_BASE = 100_000  # the transaction's intrinsic cost, calldata and the loop
# A single redemption reverts when it fails, so its estimate is safe; the margin covers state
# that changes between the estimate and mining (a deposit write going from cold to warm, say).
SINGLE_GAS_MARGIN_PERCENT = 25
FUND_DEPOSIT_GAS = 100_000
# maxFeePerGas = BASE_FEE_HEADROOM × latest base fee + priority fee (web3's own default rule).
BASE_FEE_HEADROOM = 2


@cache
def load_abi(name: str) -> list[dict[str, Any]]:
    """An ABI fragment from contracts/abi/<name>.json (ticket_broker, controller,
    rounds_manager, bonding_manager)."""
    text = resources.files(ABI_PACKAGE).joinpath(ABI_FOLDER, f"{name}.json").read_text()
    return cast(list[dict[str, Any]], json.loads(text))


def _event_abi(name: str) -> ABIEvent:
    found = [e for e in load_abi("ticket_broker") if e["type"] == "event" and e["name"] == name]
    return cast(ABIEvent, found[0])


REDEEMED_TOPIC = event_abi_to_log_topic(_event_abi("WinningTicketRedeemed"))
TRANSFER_TOPIC = event_abi_to_log_topic(_event_abi("WinningTicketTransfer"))


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderInfo:
    """getSenderInfo(sender): the deposit, the unlock's withdraw round (0: none) and the reserve."""

    deposit_wei: int
    withdraw_round: int
    reserve_wei: int
    reserve_claimed_in_current_round_wei: int


@dataclass(frozen=True)
class Fees:
    max_fee_per_gas_wei: int
    max_priority_fee_per_gas_wei: int


@dataclass(frozen=True)
class SignedTx:
    """A locally signed transaction: store it, then broadcast the raw bytes (again, if needed)."""

    raw_transaction: bytes
    tx_hash: bytes
    nonce: int
    gas: int


@dataclass(frozen=True)
class TicketOutcome:
    """One ticket of a mined redemption. `redeemed` is False when the ticket left no
    WinningTicketRedeemed event (it failed inside the batch, or the transaction reverted)."""

    ticket_hash: bytes
    recipient: ChecksumAddress
    face_value_wei: int
    redeemed: bool
    paid_wei: int

    @property
    def fully_paid(self) -> bool:
        return self.redeemed and self.paid_wei == self.face_value_wei


@dataclass(frozen=True)
class RedemptionReport:
    """Per-ticket result of a mined redeemWinningTicket or batchRedeemWinningTickets."""

    tx_hash: bytes
    status: int
    block_number: int
    outcomes: tuple[TicketOutcome, ...]

    @property
    def paid(self) -> dict[bytes, int]:
        """{ticket hash: wei transferred} for every redeemed ticket that moved funds."""
        return {o.ticket_hash: o.paid_wei for o in self.outcomes if o.redeemed and o.paid_wei}

    @property
    def unredeemed(self) -> tuple[TicketOutcome, ...]:
        """Not redeemed, nothing paid. The ticket, signature and recipientRand are now public
        in the calldata and anyone can redeem them until the ticket expires, so retry the SAME
        signed ticket (usedTickets makes that pay at most once); issue a new ticket for the
        payout only once this one is expired and still unused (`ticket_expired`,
        `is_ticket_used`), or the recipient could be paid twice."""
        return tuple(o for o in self.outcomes if not o.redeemed)

    @property
    def short_paid(self) -> tuple[TicketOutcome, ...]:
        """Redeemed for less than the face value (deposit and reserve ran short). The ticket is
        used now and can never pay the rest."""
        return tuple(o for o in self.outcomes if o.redeemed and not o.fully_paid)


def batch_gas_limit(
    ticket_count: int,
    gas_per_ticket: int = BATCH_GAS_PER_TICKET,
    base_gas: int = BATCH_GAS_BASE,
) -> int:
    """The explicit gas limit of a batch: base + per-ticket budget × tickets."""
    if ticket_count <= 0:
        raise ValueError("a batch needs at least one ticket")
    return base_gas + gas_per_ticket * ticket_count


def sign_transaction(tx: TxParams, private_key: PrivateKey) -> SignedTx:
    """Sign a fully built transaction (nonce, gas and fees set) with a local key."""
    signed = Account.sign_transaction(cast(dict[str, Any], tx), private_key)
    return SignedTx(
        raw_transaction=bytes(signed.raw_transaction),
        tx_hash=bytes(signed.hash),
        nonce=int(tx["nonce"]),
        gas=int(tx["gas"]),
    )


def _ticket_hash_from_event(args: dict[str, Any]) -> bytes:
    """Rebuild the ticket hash from WinningTicketRedeemed (recipientRandHash = keccak(rand))."""
    ticket = Ticket(
        recipient=args["recipient"],
        sender=args["sender"],
        face_value_wei=args["faceValue"],
        win_prob=args["winProb"],
        sender_nonce=args["senderNonce"],
        recipient_rand_hash=recipient_rand_hash(args["recipientRand"]),
        aux_data=bytes(args["auxData"]),
    )
    return ticket.hash


def _log_topic0(log: LogReceipt) -> bytes:
    topics = log["topics"]
    return bytes(topics[0]) if topics else b""


def redeemed_amounts(contract: AsyncContract, receipt: TxReceipt) -> dict[bytes, deque[int]]:
    """{ticket hash: amounts paid, in log order} from the receipt's TicketBroker logs.

    Within one redemption the logs run [ReserveClaimed] [WinningTicketTransfer]
    WinningTicketRedeemed, and a failed ticket leaves none, so a transfer belongs to the
    redemption event right after it; a redemption with no transfer before it paid nothing."""
    amounts: dict[bytes, deque[int]] = defaultdict(deque)
    transfer: tuple[str, str, int] | None = None
    for log in receipt["logs"]:
        if to_checksum_address(log["address"]) != contract.address:
            continue
        topic0 = _log_topic0(log)
        if topic0 == TRANSFER_TOPIC:
            args = contract.events.WinningTicketTransfer().process_log(log)["args"]
            transfer = (args["sender"], args["recipient"], args["amount"])
        elif topic0 == REDEEMED_TOPIC:
            args = dict(contract.events.WinningTicketRedeemed().process_log(log)["args"])
            paid = 0
            if transfer is not None and transfer[:2] == (args["sender"], args["recipient"]):
                paid = transfer[2]
            amounts[_ticket_hash_from_event(args)].append(paid)
            transfer = None
    return amounts


def build_report(
    contract: AsyncContract, receipt: TxReceipt, tickets: Sequence[SignedTicket]
) -> RedemptionReport:
    """Match each ticket sent (in order; a duplicate takes the next event for its hash) with
    the redemption events in `receipt`."""
    amounts = redeemed_amounts(contract, receipt)
    outcomes = []
    for signed in tickets:
        found = amounts.get(signed.hash)
        redeemed = bool(found)
        outcomes.append(
            TicketOutcome(
                ticket_hash=signed.hash,
                recipient=signed.ticket.recipient,
                face_value_wei=signed.face_value_wei,
                redeemed=redeemed,
                paid_wei=found.popleft() if found else 0,
            )
        )
    return RedemptionReport(
        tx_hash=bytes(receipt["transactionHash"]),
        status=int(receipt["status"]),
        block_number=int(receipt["blockNumber"]),
        outcomes=tuple(outcomes),
    )


# -- companion contracts --------------------------------------------------------------------------


class RoundsManager:
    """The RoundsManager views a payer reads (implements tickets.RoundsReader)."""

    def __init__(self, w3: AsyncWeb3[AsyncBaseProvider], address: str) -> None:
        self.contract = w3.eth.contract(
            address=to_checksum_address(address), abi=load_abi("rounds_manager")
        )

    async def current_round(self) -> int:
        return int(await self.contract.functions.currentRound().call())

    async def current_round_initialized(self) -> bool:
        return bool(await self.contract.functions.currentRoundInitialized().call())

    async def block_hash_for_round(self, round_number: int) -> bytes:
        return bytes(await self.contract.functions.blockHashForRound(round_number).call())


# -- the client -----------------------------------------------------------------------------------


class TicketBrokerClient:
    """Reads and transactions against one TicketBroker address (proxy or double)."""

    def __init__(self, w3: AsyncWeb3[AsyncBaseProvider], address: str) -> None:
        self.w3 = w3
        self.contract = w3.eth.contract(
            address=to_checksum_address(address), abi=load_abi("ticket_broker")
        )
        self._registry: dict[bytes, ChecksumAddress] = {}
        self._chain_id: int | None = None

    @classmethod
    def connect(
        cls, rpc_url: str, address: str, timeout_s: float = RPC_TIMEOUT_S
    ) -> TicketBrokerClient:
        provider = AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s})
        return cls(AsyncWeb3(provider), address)

    @property
    def address(self) -> ChecksumAddress:
        return self.contract.address

    # -- discovery and reads --------------------------------------------------------------------

    async def registered_contract(self, contract_id: bytes) -> ChecksumAddress:
        """Controller.getContract(id), through TicketBroker.controller(); cached."""
        if contract_id not in self._registry:
            controller_address = await self.contract.functions.controller().call()
            controller = self.w3.eth.contract(
                address=controller_address, abi=load_abi("controller")
            )
            found = await controller.functions.getContract(contract_id).call()
            if int(found, 16) == 0:
                raise LookupError(f"the Controller has no contract 0x{contract_id.hex()}")
            self._registry[contract_id] = to_checksum_address(found)
        return self._registry[contract_id]

    async def rounds_manager(self) -> RoundsManager:
        return RoundsManager(self.w3, await self.registered_contract(ROUNDS_MANAGER_ID))

    async def is_paused(self) -> bool:
        """Controller.paused(): every redemption and funding reverts with "system is paused"."""
        controller_address = await self.contract.functions.controller().call()
        controller = self.w3.eth.contract(address=controller_address, abi=load_abi("controller"))
        return bool(await controller.functions.paused().call())

    async def is_active_transcoder(self, recipient: str) -> bool:
        """BondingManager.isActiveTranscoder: only active recipients can be paid."""
        bonding = self.w3.eth.contract(
            address=await self.registered_contract(BONDING_MANAGER_ID),
            abi=load_abi("bonding_manager"),
        )
        call = bonding.functions.isActiveTranscoder(to_checksum_address(recipient))
        return bool(await call.call())

    async def sender_info(self, sender: str) -> SenderInfo:
        call = self.contract.functions.getSenderInfo(to_checksum_address(sender))
        (deposit, withdraw_round), (reserve, claimed) = await call.call()
        return SenderInfo(
            deposit_wei=int(deposit),
            withdraw_round=int(withdraw_round),
            reserve_wei=int(reserve),
            reserve_claimed_in_current_round_wei=int(claimed),
        )

    async def ticket_validity_period(self) -> int:
        return int(await self.contract.functions.ticketValidityPeriod().call())

    async def aux_data(self) -> AuxData:
        """auxData for tickets made now (tickets.read_aux_data); raises RoundsNotReady."""
        rounds = await self.rounds_manager()
        return await read_aux_data(rounds, await self.ticket_validity_period())

    async def is_ticket_used(self, ticket_hash: bytes) -> bool:
        return bool(await self.contract.functions.usedTickets(ticket_hash).call())

    async def ticket_expired(self, ticket: Ticket) -> bool:
        """Whether the contract now refuses `ticket` as expired: an unused, expired ticket can
        never be redeemed by anyone, so the payout may be retried with a new ticket."""
        creation_round = AuxData.decode(ticket.aux_data).creation_round
        rounds = await self.rounds_manager()
        current = await rounds.current_round()
        return not is_unexpired(creation_round, current, await self.ticket_validity_period())

    async def onchain_ticket_hash(self, ticket: Ticket) -> bytes:
        """The contract's getTicketHash (a free call), to cross-check tickets.ticket_hash."""
        return bytes(await self.contract.functions.getTicketHash(ticket.abi_tuple()).call())

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(await self.w3.eth.chain_id)
        return self._chain_id

    async def suggest_fees(self) -> Fees:
        """EIP-1559 fees: BASE_FEE_HEADROOM × the latest base fee plus the node's priority fee."""
        priority = int(await self.w3.eth.max_priority_fee)
        block = await self.w3.eth.get_block("latest")
        base = int(block.get("baseFeePerGas", 0))
        return Fees(BASE_FEE_HEADROOM * base + priority, priority)

    # -- building transactions ------------------------------------------------------------------

    async def _transaction(
        self,
        sender: str,
        data: bytes,
        gas: int,
        *,
        value_wei: int = 0,
        nonce: int | None = None,
        fees: Fees | None = None,
    ) -> TxParams:
        sender = to_checksum_address(sender)
        if nonce is None:
            nonce = await self.w3.eth.get_transaction_count(sender, "pending")
        fees = fees or await self.suggest_fees()
        return {
            "chainId": await self.chain_id(),
            "from": sender,
            "to": self.address,
            "data": HexBytes(data),
            "value": Wei(value_wei),
            "gas": gas,
            "nonce": Nonce(nonce),
            "maxFeePerGas": Wei(fees.max_fee_per_gas_wei),
            "maxPriorityFeePerGas": Wei(fees.max_priority_fee_per_gas_wei),
        }

    async def build_fund_deposit_tx(
        self,
        sender: str,
        amount_wei: int,
        *,
        nonce: int | None = None,
        fees: Fees | None = None,
    ) -> TxParams:
        """fundDeposit() with `amount_wei` attached, from `sender`."""
        if amount_wei <= 0:
            raise ValueError(f"deposit amount must be positive, got {amount_wei} wei")
        data = bytes(HexBytes(self.contract.encode_abi("fundDeposit", args=[])))
        return await self._transaction(
            sender, data, FUND_DEPOSIT_GAS, value_wei=amount_wei, nonce=nonce, fees=fees
        )

    async def build_redeem_tx(
        self,
        sender: str,
        ticket: SignedTicket,
        *,
        nonce: int | None = None,
        fees: Fees | None = None,
        gas: int | None = None,
    ) -> TxParams:
        """redeemWinningTicket from `sender` (who pays the gas). Without `gas`, the estimate plus
        SINGLE_GAS_MARGIN_PERCENT; estimating raises web3's ContractLogicError with the revert
        string when the ticket would fail."""
        data = redeem_calldata(ticket)
        if gas is None:
            gas = await self._estimate_with_margin(sender, data)
        return await self._transaction(sender, data, gas, nonce=nonce, fees=fees)

    async def build_batch_redeem_tx(
        self,
        sender: str,
        tickets: Sequence[SignedTicket],
        *,
        nonce: int | None = None,
        fees: Fees | None = None,
        gas_per_ticket: int = BATCH_GAS_PER_TICKET,
    ) -> TxParams:
        """batchRedeemWinningTickets with the explicit gas limit batch_gas_limit(len(tickets))."""
        data = batch_redeem_calldata(tickets)
        gas = batch_gas_limit(len(tickets), gas_per_ticket)
        return await self._transaction(sender, data, gas, nonce=nonce, fees=fees)

    async def _estimate_with_margin(self, sender: str, data: bytes) -> int:
        estimate = await self.w3.eth.estimate_gas(
            {"from": to_checksum_address(sender), "to": self.address, "data": HexBytes(data)}
        )
        return estimate * (100 + SINGLE_GAS_MARGIN_PERCENT) // 100

    # -- sending and verifying ------------------------------------------------------------------

    async def broadcast(self, raw_transaction: bytes) -> bytes:
        """eth_sendRawTransaction; returns the transaction hash."""
        return bytes(await self.w3.eth.send_raw_transaction(raw_transaction))

    async def wait_for_receipt(
        self, tx_hash: bytes, timeout_s: float = RECEIPT_TIMEOUT_S
    ) -> TxReceipt:
        """The mined receipt; raises web3's TimeExhausted after `timeout_s` (not a failure: the
        transaction may still be mined)."""
        return await self.w3.eth.wait_for_transaction_receipt(
            HexBytes(tx_hash), timeout=timeout_s, poll_latency=RECEIPT_POLL_S
        )

    def redemption_report(
        self, receipt: TxReceipt, tickets: Sequence[SignedTicket]
    ) -> RedemptionReport:
        """Which of `tickets` the mined transaction redeemed, and how much each paid."""
        return build_report(self.contract, receipt, tickets)

    async def send(self, tx: TxParams, private_key: PrivateKey) -> TxReceipt:
        """Sign, broadcast and wait: for scripts and tests; a payout worker stores each step."""
        signed = sign_transaction(tx, private_key)
        await self.broadcast(signed.raw_transaction)
        return await self.wait_for_receipt(signed.tx_hash)

    async def fund_deposit(self, private_key: PrivateKey, amount_wei: int) -> TxReceipt:
        """Add `amount_wei` to the key's deposit and wait for the receipt."""
        sender = Account.from_key(private_key).address
        return await self.send(await self.build_fund_deposit_tx(sender, amount_wei), private_key)

    async def redeem(self, private_key: PrivateKey, ticket: SignedTicket) -> RedemptionReport:
        """Redeem one ticket, paying gas from the key, and report it."""
        sender = Account.from_key(private_key).address
        receipt = await self.send(await self.build_redeem_tx(sender, ticket), private_key)
        return self.redemption_report(receipt, [ticket])

    async def redeem_batch(
        self, private_key: PrivateKey, tickets: Sequence[SignedTicket]
    ) -> RedemptionReport:
        """Redeem `tickets` in one batch transaction and report each ticket."""
        sender = Account.from_key(private_key).address
        receipt = await self.send(await self.build_batch_redeem_tx(sender, tickets), private_key)
        return self.redemption_report(receipt, tickets)
