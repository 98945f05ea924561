"""Helpers for the TicketBroker tests: the deployed double, its owner controls and our client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import TxReceipt

from shared.chain.devchain import deploy_ticket_broker_double
from shared.chain.devtools import Anvil, DevAccount, connect, transact
from shared.chain.ticket_broker import TicketBrokerClient
from shared.chain.tickets import AuxData, SignedTicket, Ticket, create_signed_ticket

ETH = 10**18
RECIPIENT_INDEXES = (1, 2, 3)
ZERO_ADDRESS = "0x" + "00" * 20


def zero_ticket(sender_nonce: int, aux_data: bytes) -> Ticket:
    return Ticket(ZERO_ADDRESS, ZERO_ADDRESS, 0, 0, sender_nonce, b"\x00" * 32, aux_data)


# The reference vectors (ticketbroker.md §2, from go-livepeer pm/ticket_test.go), literally.
VECTOR_ROUND_10 = zero_ticket(
    0,
    (10).to_bytes(32, "big")
    + bytes.fromhex("41b1a0649752af1b28b3dc29a1556eee781e4a4c3a1f7f53f90fa834de098c4d"),
)
VECTOR_ROUND_10_HASH = "e502907c16036ab3d11b78c5a2e93c20f3d6415c67f91de4ed01348182b3b2e2"
VECTOR_EMPTY_AUX = zero_ticket(2**32 - 1, b"")
VECTOR_EMPTY_AUX_HASH = "e1393fc7f6de093780674022f96cb8e3872235167d037c04d554e58c0e63d280"


@dataclass
class BrokerDouble:
    """The deployed TicketBrokerDouble (full ABI, owner controls) and the accounts around it.
    The owner is also the payer: the ticket sender whose key pays the gas."""

    rpc_url: str
    w3: Web3
    contract: Contract
    owner: DevAccount
    recipients: tuple[ChecksumAddress, ...]

    @property
    def address(self) -> ChecksumAddress:
        return self.contract.address

    @property
    def payer_key(self) -> str:
        return self.owner.private_key

    def client(self) -> TicketBrokerClient:
        """Our client, which knows only the real contract's ABI fragments."""
        return TicketBrokerClient.connect(self.rpc_url, self.address)

    def admin(self, call: ContractFunction) -> TxReceipt:
        return transact(self.w3, self.owner, call)

    def credited(self, recipient: str) -> int:
        return int(self.contract.functions.credited(recipient).call())

    def deposit(self) -> int:
        (deposit, _), _ = self.contract.functions.getSenderInfo(self.owner.address).call()
        return int(deposit)


def deploy_double(anvil: Anvil) -> BrokerDouble:
    w3 = connect(anvil.rpc_url)
    recipients = tuple(anvil.accounts[i].address for i in RECIPIENT_INDEXES)
    owner = anvil.accounts[0]
    contract = deploy_ticket_broker_double(w3, owner, recipients)
    return BrokerDouble(anvil.rpc_url, w3, contract, owner, recipients)


def tickets_for(
    double: BrokerDouble, aux: AuxData, face_values_wei: Sequence[int]
) -> list[SignedTicket]:
    """One always-winning ticket per face value, to the recipients in turn."""
    recipients = double.recipients
    return [
        create_signed_ticket(recipients[i % len(recipients)], wei, aux, double.payer_key)
        for i, wei in enumerate(face_values_wei)
    ]


def text_signed(signed: SignedTicket, private_key: str) -> SignedTicket:
    """The same ticket signed the wrong way: encode_defunct(text="0x…") signs the 66-character
    string, not the 32 hash bytes (ticketbroker.md §2 pitfall)."""
    message = encode_defunct(text="0x" + signed.hash.hex())
    signature = bytes(Account.sign_message(message, private_key).signature)
    return SignedTicket(signed.ticket, signature, signed.recipient_rand)
