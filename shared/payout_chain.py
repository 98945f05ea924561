"""The payer account on chain: its key, what it signs, and how a stored transaction is sent.

The payouts engine allocates nonces in the database and stores every signed transaction before
it is broadcast; this module only builds, signs, sends and looks up. Broadcasting the same raw
bytes twice is harmless (same hash): a node answering "already known" or "nonce too low" for a
transaction we stored is not an error, the receipt lookup decides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import TransactionNotFound
from web3.providers.async_base import AsyncBaseProvider
from web3.types import TxReceipt, Wei

from shared.chain.ticket_broker import (
    BASE_FEE_HEADROOM,
    FUND_DEPOSIT_GAS,
    RPC_TIMEOUT_S,
    Fees,
    SignedTx,
    TicketBrokerClient,
    batch_gas_limit,
)
from shared.chain.tickets import SignedTicket, batch_redeem_calldata, redeem_calldata
from shared.settings import Settings

log = logging.getLogger(__name__)

# A plain value transfer's gas, and the fallback when estimating fails (the original's rule).
TRANSFER_GAS = 21_000


class PayerKeyError(ValueError):
    """The payer key is missing or unreadable. The message never contains the key."""


def load_payer(settings: Settings) -> LocalAccount | None:
    """The signing account from PAYMENT_PRIVATE_KEY, _PRIVATE_KEY_FILE or _KEYSTORE_PATH."""
    try:
        if settings.payment_private_key is not None:
            key = settings.payment_private_key.get_secret_value().strip()
            return cast(LocalAccount, Account.from_key(key))
        if settings.payment_private_key_file is not None:
            key = _key_from_file(settings.payment_private_key_file.read_text())
            return cast(LocalAccount, Account.from_key(key))
        if settings.payment_keystore_path is not None:
            password = settings.payment_keystore_password
            keystore = json.loads(settings.payment_keystore_path.read_text())
            decrypted = Account.decrypt(keystore, password.get_secret_value() if password else "")
            return cast(LocalAccount, Account.from_key(decrypted))
    except (OSError, ValueError, TypeError, KeyError) as error:
        # Only the kind of error: its text could quote the key material.
        raise PayerKeyError(f"payer key unreadable ({type(error).__name__})") from None
    return None


def _key_from_file(text: str) -> str:
    text = text.strip()
    if text.startswith("{"):
        return str(json.loads(text)["private_key"]).strip()
    return text


@dataclass(frozen=True)
class TxPlan:
    """What to sign, without nonce and fees: the engine adds those."""

    kind: str
    to: ChecksumAddress
    value_wei: int
    data: bytes
    gas: int

    def params(self, chain_id: int) -> dict[str, Any]:
        return {
            "chainId": chain_id,
            "to": self.to,
            "value": self.value_wei,
            "data": "0x" + self.data.hex(),
            "gas": self.gas,
        }


class PayerChain:
    def __init__(
        self,
        w3: AsyncWeb3[AsyncBaseProvider],
        account: LocalAccount,
        broker: TicketBrokerClient | None,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.broker = broker
        self._chain_id: int | None = None

    @classmethod
    def connect(cls, settings: Settings, account: LocalAccount) -> PayerChain:
        provider = AsyncHTTPProvider(
            settings.eth_rpc_url, request_kwargs={"timeout": RPC_TIMEOUT_S}
        )
        w3: AsyncWeb3[AsyncBaseProvider] = AsyncWeb3(provider)
        broker = None
        if settings.livepeer_ticket_broker_address:
            broker = TicketBrokerClient(w3, settings.livepeer_ticket_broker_address)
        return cls(w3, account, broker)

    @property
    def sender(self) -> ChecksumAddress:
        return self.account.address

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(await self.w3.eth.chain_id)
        return self._chain_id

    async def pending_nonce(self) -> int:
        return int(await self.w3.eth.get_transaction_count(self.sender, "pending"))

    async def mined_nonce(self) -> int:
        return int(await self.w3.eth.get_transaction_count(self.sender, "latest"))

    async def fees(self) -> Fees:
        priority = int(await self.w3.eth.max_priority_fee)
        block = await self.w3.eth.get_block("latest")
        base = int(block.get("baseFeePerGas", 0))
        return Fees(BASE_FEE_HEADROOM * base + priority, priority)

    async def head(self) -> int:
        return int(await self.w3.eth.block_number)

    # -- plans ------------------------------------------------------------------------------

    async def transfer_plan(self, recipient: str, value_wei: int) -> TxPlan:
        to = to_checksum_address(recipient)
        try:
            gas = int(
                await self.w3.eth.estimate_gas(
                    {"from": self.sender, "to": to, "value": Wei(value_wei)}
                )
            )
        except Exception as error:  # a recipient contract that refuses ETH, a node hiccup
            log.info(
                "gas estimate failed; using the transfer minimum", extra={"error": str(error)[:200]}
            )
            gas = TRANSFER_GAS
        return TxPlan("eth_transfer", to, value_wei, b"", max(gas, TRANSFER_GAS))

    def redeem_plan(self, tickets: list[SignedTicket], gas_per_ticket: int) -> TxPlan:
        broker = self.ticket_broker()
        if len(tickets) == 1:
            data = redeem_calldata(tickets[0])
            kind = "redeem"
        else:
            data = batch_redeem_calldata(tickets)
            kind = "batch_redeem"
        return TxPlan(kind, broker.address, 0, data, batch_gas_limit(len(tickets), gas_per_ticket))

    def fund_plan(self, amount_wei: int) -> TxPlan:
        broker = self.ticket_broker()
        data = bytes(HexBytes(broker.contract.encode_abi("fundDeposit", args=[])))
        return TxPlan("fund_deposit", broker.address, amount_wei, data, FUND_DEPOSIT_GAS)

    def ticket_broker(self) -> TicketBrokerClient:
        if self.broker is None:
            raise RuntimeError("PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS is not set")
        return self.broker

    # -- signing and sending ----------------------------------------------------------------

    def sign(self, params: dict[str, Any], nonce: int, fees: Fees) -> SignedTx:
        tx = {
            **params,
            "nonce": nonce,
            "maxFeePerGas": fees.max_fee_per_gas_wei,
            "maxPriorityFeePerGas": fees.max_priority_fee_per_gas_wei,
        }
        signed = self.account.sign_transaction(tx)
        return SignedTx(
            raw_transaction=bytes(signed.raw_transaction),
            tx_hash=bytes(signed.hash),
            nonce=nonce,
            gas=int(params["gas"]),
        )

    async def broadcast(self, raw_transaction: bytes, nonce: int, hashes: list[str]) -> None:
        """Send stored bytes. A refusal is fine when the node knows one of our attempts or the
        nonce is already used; anything else is raised."""
        try:
            await self.w3.eth.send_raw_transaction(raw_transaction)
            return
        except Exception as error:
            if await self.knows_any(hashes) or await self.mined_nonce() > nonce:
                log.info(
                    "broadcast refused, transaction already known",
                    extra={"error": str(error)[:200]},
                )
                return
            raise

    async def knows_any(self, hashes: list[str]) -> bool:
        for tx_hash in hashes:
            try:
                await self.w3.eth.get_transaction(HexBytes(tx_hash))
                return True
            except TransactionNotFound:
                continue
        return False

    async def receipt(self, hashes: list[str]) -> TxReceipt | None:
        """The receipt of whichever attempt was mined (only one of a nonce's can be)."""
        for tx_hash in hashes:
            try:
                return await self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            except TransactionNotFound:
                continue
        return None
