"""Livepeer TicketBroker tickets for an always-winning payout: build, hash, sign, encode.

Pure functions and data, no network (reading the rounds goes through the `RoundsReader`
protocol, which `shared.chain.ticket_broker.RoundsManager` implements). The facts behind every
constant are in ticketbroker.md §1–§3:

- the ticket hash is keccak256 of the tight packing of the 7 fields (232 bytes with a 64-byte
  auxData); `getTicketHash` on chain computes the same;
- the signature is EIP-191 personal_sign over the 32-byte hash (`encode_defunct(primitive=h)`,
  never `text=`), 65 bytes r‖s‖v with v ∈ {27, 28} and a low s;
- winProb = 2**256 − 1, so the strict `keccak(sig ‖ recipientRand) < winProb` holds except
  with probability 2**-256;
- auxData = uint256 creationRound ‖ bytes32 blockHashForRound(creationRound).

    aux = await read_aux_data(rounds, validity_period_rounds)
    signed = create_signed_ticket(recipient, face_value_wei, aux, private_key)
    data = redeem_calldata(signed)                  # or batch_redeem_calldata([...])

Sign each ticket once: its winning draw depends on the signature bytes, and a fresh
senderNonce and recipientRand per ticket make every ticket hash unique.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from eth_abi.abi import encode as abi_encode
from eth_abi.packed import encode_packed
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address
from eth_utils.crypto import keccak

UINT256_BITS = 256
UINT256_MAX = 2**UINT256_BITS - 1
# The largest winProb: the ticket loses only if keccak(sig ‖ rand) is exactly 2**256 − 1.
ALWAYS_WIN_PROB = UINT256_MAX

WORD_BYTES = 32
AUX_DATA_BYTES = 2 * WORD_BYTES  # creationRound ‖ creationRoundBlockHash
SIGNATURE_BYTES = 65  # r ‖ s ‖ v
SIGNATURE_V_VALUES = (27, 28)
# secp256k1n / 2: the contract (OpenZeppelin ECDSA 4.4.1) refuses a larger s.
SIGNATURE_MAX_LOW_S = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
ZERO_HASH = b"\x00" * WORD_BYTES

TICKET_TUPLE_TYPE = "(address,address,uint256,uint256,uint256,bytes32,bytes)"
TICKET_PACKED_TYPES = ("address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes")
REDEEM_SIGNATURE = f"redeemWinningTicket({TICKET_TUPLE_TYPE},bytes,uint256)"
BATCH_REDEEM_SIGNATURE = f"batchRedeemWinningTickets({TICKET_TUPLE_TYPE}[],bytes[],uint256[])"
REDEEM_SELECTOR = keccak(text=REDEEM_SIGNATURE)[:4]  # 0xec8b3cb6
BATCH_REDEEM_SELECTOR = keccak(text=BATCH_REDEEM_SIGNATURE)[:4]  # 0xd01b808e

PrivateKey = str | bytes  # 0x-hex or raw 32 bytes


class TicketError(ValueError):
    """A ticket, signature or auxData that the TicketBroker would refuse."""


class RoundsNotReady(RuntimeError):
    """No creation round can be used now: the current round is not initialized, or neither it
    nor the round before has a block hash inside the validity period. Retry later (or call
    RoundsManager.initializeRound); do not pay with such a ticket."""


# -- values -------------------------------------------------------------------------------------


def _require_uint256(name: str, value: int) -> None:
    if not 0 <= value <= UINT256_MAX:
        raise TicketError(f"{name} is not a uint256: {value}")


def _require_word(name: str, value: bytes) -> None:
    if len(value) != WORD_BYTES:
        raise TicketError(f"{name} must be {WORD_BYTES} bytes, got {len(value)}")


def _checksum(name: str, address: str) -> ChecksumAddress:
    if not is_address(address):
        raise TicketError(f"{name} is not an address: {address!r}")
    return to_checksum_address(address)


def random_uint256() -> int:
    """256 bits from the OS's cryptographic random source."""
    return secrets.randbits(UINT256_BITS)


def uint256_bytes(value: int) -> bytes:
    """32 big-endian bytes, as abi.encodePacked(uint256)."""
    _require_uint256("value", value)
    return value.to_bytes(WORD_BYTES, "big")


def recipient_rand_hash(recipient_rand: int) -> bytes:
    """keccak256(abi.encodePacked(uint256 recipientRand))."""
    return keccak(uint256_bytes(recipient_rand))


# -- auxData --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuxData:
    """The ticket's creation round and that round's block hash (RoundsManager.blockHashForRound)."""

    creation_round: int
    block_hash: bytes

    def __post_init__(self) -> None:
        _require_uint256("creation_round", self.creation_round)
        _require_word("block_hash", self.block_hash)

    def encode(self) -> bytes:
        """The 64 bytes the contract expects: uint256 creationRound ‖ bytes32 blockHash."""
        return uint256_bytes(self.creation_round) + self.block_hash

    @classmethod
    def decode(cls, aux_data: bytes) -> AuxData:
        if len(aux_data) != AUX_DATA_BYTES:
            raise TicketError(f"auxData must be {AUX_DATA_BYTES} bytes, got {len(aux_data)}")
        return cls(int.from_bytes(aux_data[:WORD_BYTES], "big"), aux_data[WORD_BYTES:])


class RoundsReader(Protocol):
    """The three RoundsManager views a payer needs (see ticket_broker.RoundsManager)."""

    async def current_round(self) -> int: ...

    async def current_round_initialized(self) -> bool: ...

    async def block_hash_for_round(self, round_number: int) -> bytes: ...


def is_unexpired(creation_round: int, current_round: int, validity_period_rounds: int) -> bool:
    """The contract's expiry rule: creationRound + ticketValidityPeriod > currentRound."""
    return creation_round + validity_period_rounds > current_round


async def read_aux_data(rounds: RoundsReader, validity_period_rounds: int) -> AuxData:
    """auxData for a ticket made now: the current round and its block hash; if that hash is zero
    (seen on Arbitrum), the round before, as go-livepeer does, while it is still unexpired.
    Raises RoundsNotReady when the current round is not initialized or no hash qualifies."""
    current = await rounds.current_round()
    if not await rounds.current_round_initialized():
        raise RoundsNotReady(f"current round {current} is not initialized")
    block_hash = await rounds.block_hash_for_round(current)
    if block_hash != ZERO_HASH:
        return AuxData(current, block_hash)
    previous = current - 1
    if previous < 0 or not is_unexpired(previous, current, validity_period_rounds):
        raise RoundsNotReady(f"round {current} has no block hash and round {previous} is expired")
    block_hash = await rounds.block_hash_for_round(previous)
    if block_hash == ZERO_HASH:
        raise RoundsNotReady(f"neither round {current} nor round {previous} has a block hash")
    return AuxData(previous, block_hash)


# -- the ticket -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ticket:
    """The TicketBroker's Ticket struct, fields in the contract's order."""

    recipient: ChecksumAddress
    sender: ChecksumAddress
    face_value_wei: int
    win_prob: int
    sender_nonce: int
    recipient_rand_hash: bytes
    aux_data: bytes  # 64 bytes on chain (AuxData.encode()); any length hashes off-chain

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipient", _checksum("recipient", self.recipient))
        object.__setattr__(self, "sender", _checksum("sender", self.sender))
        _require_uint256("face_value_wei", self.face_value_wei)
        _require_uint256("win_prob", self.win_prob)
        _require_uint256("sender_nonce", self.sender_nonce)
        _require_word("recipient_rand_hash", self.recipient_rand_hash)

    def abi_tuple(self) -> tuple[str, str, int, int, int, bytes, bytes]:
        """The struct as web3/eth-abi take it for the tuple type TICKET_TUPLE_TYPE."""
        return (
            self.recipient,
            self.sender,
            self.face_value_wei,
            self.win_prob,
            self.sender_nonce,
            self.recipient_rand_hash,
            self.aux_data,
        )

    @property
    def hash(self) -> bytes:
        return ticket_hash(self)


def ticket_hash(ticket: Ticket) -> bytes:
    """keccak256(abi.encodePacked(recipient, sender, faceValue, winProb, senderNonce,
    recipientRandHash, auxData)): the contract's getTicketHash."""
    return keccak(encode_packed(TICKET_PACKED_TYPES, ticket.abi_tuple()))


def draft_ticket(
    recipient: str,
    sender: str,
    face_value_wei: int,
    aux_data: AuxData,
    *,
    sender_nonce: int | None = None,
    recipient_rand: int | None = None,
) -> tuple[Ticket, int]:
    """An always-winning ticket and its recipientRand; nonce and rand are fresh random 256-bit
    values unless given."""
    if face_value_wei <= 0:
        raise TicketError(f"face value must be positive, got {face_value_wei} wei")
    rand = random_uint256() if recipient_rand is None else recipient_rand
    ticket = Ticket(
        recipient=_checksum("recipient", recipient),
        sender=_checksum("sender", sender),
        face_value_wei=face_value_wei,
        win_prob=ALWAYS_WIN_PROB,
        sender_nonce=random_uint256() if sender_nonce is None else sender_nonce,
        recipient_rand_hash=recipient_rand_hash(rand),
        aux_data=aux_data.encode(),
    )
    return ticket, rand


# -- signatures -----------------------------------------------------------------------------------


def sign_ticket_hash(ticket_hash_bytes: bytes, private_key: PrivateKey) -> bytes:
    """EIP-191 personal_sign over the 32 hash bytes: 65 bytes, v = 27 or 28, low s."""
    _require_word("ticket hash", ticket_hash_bytes)
    message = encode_defunct(primitive=ticket_hash_bytes)
    return bytes(Account.sign_message(message, private_key).signature)


def check_signature_shape(signature: bytes) -> None:
    """The contract's checks before recovery: 65 bytes, low s, v ∈ {27, 28}."""
    if len(signature) != SIGNATURE_BYTES:
        raise TicketError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    s_value = int.from_bytes(signature[WORD_BYTES : 2 * WORD_BYTES], "big")
    if s_value > SIGNATURE_MAX_LOW_S:
        raise TicketError("signature has a high s value")
    if signature[-1] not in SIGNATURE_V_VALUES:
        raise TicketError(f"signature v must be 27 or 28, got {signature[-1]}")


def recover_ticket_signer(ticket_hash_bytes: bytes, signature: bytes) -> ChecksumAddress:
    """Who signed `ticket_hash_bytes` (EIP-191), as the contract recovers it."""
    check_signature_shape(signature)
    message = encode_defunct(primitive=ticket_hash_bytes)
    return to_checksum_address(Account.recover_message(message, signature=signature))


def is_winning(signature: bytes, recipient_rand: int, win_prob: int) -> bool:
    """The contract's draw: uint256(keccak256(sig ‖ recipientRand)) < winProb (strict)."""
    draw = int.from_bytes(keccak(signature + uint256_bytes(recipient_rand)), "big")
    return draw < win_prob


@dataclass(frozen=True)
class SignedTicket:
    """A ticket ready to redeem: the struct, the sender's signature and the recipientRand."""

    ticket: Ticket
    signature: bytes
    recipient_rand: int

    @property
    def hash(self) -> bytes:
        return self.ticket.hash

    @property
    def face_value_wei(self) -> int:
        return self.ticket.face_value_wei

    def redeem_args(self) -> tuple[tuple[str, str, int, int, int, bytes, bytes], bytes, int]:
        """(ticket tuple, sig, recipientRand): redeemWinningTicket's arguments."""
        return self.ticket.abi_tuple(), self.signature, self.recipient_rand


def attach_signature(ticket: Ticket, recipient_rand: int, signature: bytes) -> SignedTicket:
    """Pair a ticket with a signature made elsewhere (a remote signer), after checking what the
    contract checks: the rand matches, the signature is well formed and by ticket.sender."""
    if recipient_rand_hash(recipient_rand) != ticket.recipient_rand_hash:
        raise TicketError("recipientRand does not match recipientRandHash")
    signer = recover_ticket_signer(ticket.hash, signature)
    if signer != ticket.sender:
        raise TicketError(f"signature is by {signer}, not the ticket sender {ticket.sender}")
    return SignedTicket(ticket=ticket, signature=bytes(signature), recipient_rand=recipient_rand)


def sign_ticket(ticket: Ticket, recipient_rand: int, private_key: PrivateKey) -> SignedTicket:
    """Sign with a local key, which must be the ticket sender's."""
    return attach_signature(ticket, recipient_rand, sign_ticket_hash(ticket.hash, private_key))


def create_signed_ticket(
    recipient: str,
    face_value_wei: int,
    aux_data: AuxData,
    private_key: PrivateKey,
    *,
    sender_nonce: int | None = None,
    recipient_rand: int | None = None,
) -> SignedTicket:
    """Draft an always-winning ticket from the key's address to `recipient` and sign it."""
    sender = Account.from_key(private_key).address
    ticket, rand = draft_ticket(
        recipient,
        sender,
        face_value_wei,
        aux_data,
        sender_nonce=sender_nonce,
        recipient_rand=recipient_rand,
    )
    return sign_ticket(ticket, rand, private_key)


# -- calldata -------------------------------------------------------------------------------------


def redeem_calldata(signed: SignedTicket) -> bytes:
    """Calldata of redeemWinningTicket(ticket, sig, recipientRand) (selector 0xec8b3cb6)."""
    encoded = abi_encode([TICKET_TUPLE_TYPE, "bytes", "uint256"], list(signed.redeem_args()))
    return REDEEM_SELECTOR + encoded


def batch_redeem_calldata(tickets: Sequence[SignedTicket]) -> bytes:
    """Calldata of batchRedeemWinningTickets(tickets[], sigs[], recipientRands[]) (0xd01b808e),
    arrays of equal length in the given order."""
    if not tickets:
        raise TicketError("a batch needs at least one ticket")
    encoded = abi_encode(
        [f"{TICKET_TUPLE_TYPE}[]", "bytes[]", "uint256[]"],
        [
            [signed.ticket.abi_tuple() for signed in tickets],
            [signed.signature for signed in tickets],
            [signed.recipient_rand for signed in tickets],
        ],
    )
    return BATCH_REDEEM_SELECTOR + encoded
