"""Tickets without a chain: the reference hash vectors, signatures, auxData and calldata."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from shared.chain.ticket_broker import BATCH_GAS_BASE, BATCH_GAS_PER_TICKET, batch_gas_limit
from shared.chain.tickets import (
    ALWAYS_WIN_PROB,
    TICKET_TUPLE_TYPE,
    AuxData,
    RoundsNotReady,
    SignedTicket,
    Ticket,
    TicketError,
    attach_signature,
    batch_redeem_calldata,
    create_signed_ticket,
    draft_ticket,
    is_winning,
    read_aux_data,
    recipient_rand_hash,
    recover_ticket_signer,
    redeem_calldata,
    ticket_hash,
)
from tests.chain.ticket_helpers import (
    VECTOR_EMPTY_AUX,
    VECTOR_EMPTY_AUX_HASH,
    VECTOR_ROUND_10,
    VECTOR_ROUND_10_HASH,
    ZERO_ADDRESS,
    text_signed,
    zero_ticket,
)

KEY = "0x" + "11" * 32
RECIPIENT = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
AUX = AuxData(7, keccak(text="round 7"))


def test_ticket_hash_matches_the_reference_vectors() -> None:
    assert ticket_hash(VECTOR_ROUND_10).hex() == VECTOR_ROUND_10_HASH
    assert ticket_hash(VECTOR_EMPTY_AUX).hex() == VECTOR_EMPTY_AUX_HASH


def test_drafted_tickets_always_win_and_carry_fresh_randomness() -> None:
    sender = Account.from_key(KEY).address
    first, first_rand = draft_ticket(RECIPIENT, sender, 5, AUX)
    second, second_rand = draft_ticket(RECIPIENT, sender, 5, AUX)
    assert first.win_prob == ALWAYS_WIN_PROB == 2**256 - 1
    assert first.recipient_rand_hash == keccak(first_rand.to_bytes(32, "big"))
    assert first.aux_data == (7).to_bytes(32, "big") + keccak(text="round 7")
    assert len(first.aux_data) == 64
    assert first_rand != second_rand
    assert first.sender_nonce != second.sender_nonce
    assert first.hash != second.hash


def test_signature_is_eip191_over_the_hash_bytes_and_wins() -> None:
    signed = create_signed_ticket(RECIPIENT, 10**15, AUX, KEY)
    sender = Account.from_key(KEY).address
    assert signed.ticket.sender == sender
    assert len(signed.signature) == 65
    assert signed.signature[-1] in (27, 28)
    assert recover_ticket_signer(signed.hash, signed.signature) == sender
    assert is_winning(signed.signature, signed.recipient_rand, signed.ticket.win_prob)
    # The strict `<`: a winProb of 0 never wins.
    assert not is_winning(signed.signature, signed.recipient_rand, 0)


def test_text_signature_and_a_wrong_rand_are_refused_before_broadcast() -> None:
    signed = create_signed_ticket(RECIPIENT, 10**15, AUX, KEY)
    wrong = text_signed(signed, KEY)
    assert recover_ticket_signer(signed.hash, wrong.signature) != signed.ticket.sender
    with pytest.raises(TicketError, match="not the ticket sender"):
        attach_signature(signed.ticket, signed.recipient_rand, wrong.signature)
    with pytest.raises(TicketError, match="recipientRand does not match"):
        attach_signature(signed.ticket, signed.recipient_rand + 1, signed.signature)
    with pytest.raises(TicketError, match="65 bytes"):
        attach_signature(signed.ticket, signed.recipient_rand, signed.signature[:64])


def test_ticket_fields_are_validated() -> None:
    with pytest.raises(TicketError, match="uint256"):
        zero_ticket(2**256, b"")
    with pytest.raises(TicketError, match="not an address"):
        Ticket("0x1234", ZERO_ADDRESS, 0, 0, 0, b"\x00" * 32, b"")
    with pytest.raises(TicketError, match="positive"):
        draft_ticket(RECIPIENT, RECIPIENT, 0, AUX)
    with pytest.raises(TicketError, match="64 bytes"):
        AuxData.decode(b"\x00" * 63)
    assert AuxData.decode(AUX.encode()) == AUX


def test_redeem_calldata_has_the_real_selectors_and_decodes_back() -> None:
    tickets = [create_signed_ticket(RECIPIENT, wei, AUX, KEY) for wei in (1, 2, 3)]
    single = redeem_calldata(tickets[0])
    assert single[:4].hex() == "ec8b3cb6"
    decoded_ticket, sig, rand = abi_decode([TICKET_TUPLE_TYPE, "bytes", "uint256"], single[4:])
    recipient, sender, *rest = decoded_ticket  # eth-abi decodes addresses in lower case
    assert (to_checksum_address(recipient), to_checksum_address(sender), *rest) == (
        tickets[0].ticket.abi_tuple()
    )
    assert (sig, rand) == (tickets[0].signature, tickets[0].recipient_rand)

    batch = batch_redeem_calldata(tickets)
    assert batch[:4].hex() == "d01b808e"
    structs, sigs, rands = abi_decode([f"{TICKET_TUPLE_TYPE}[]", "bytes[]", "uint256[]"], batch[4:])
    assert [s[2] for s in structs] == [1, 2, 3]
    assert list(sigs) == [t.signature for t in tickets]
    assert list(rands) == [t.recipient_rand for t in tickets]
    with pytest.raises(TicketError):
        batch_redeem_calldata([])


def test_batch_gas_is_an_explicit_per_ticket_budget() -> None:
    assert batch_gas_limit(3) == BATCH_GAS_BASE + 3 * BATCH_GAS_PER_TICKET
    assert batch_gas_limit(2, gas_per_ticket=10, base_gas=1) == 21
    with pytest.raises(ValueError):
        batch_gas_limit(0)


@dataclass
class FakeRounds:
    current: int
    initialized: bool = True
    hashes: dict[int, bytes] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)

    async def current_round(self) -> int:
        return self.current

    async def current_round_initialized(self) -> bool:
        return self.initialized

    async def block_hash_for_round(self, round_number: int) -> bytes:
        self.asked.append(round_number)
        return self.hashes.get(round_number, b"\x00" * 32)


async def test_aux_data_uses_the_current_round_and_its_hash() -> None:
    rounds = FakeRounds(5, hashes={5: b"\x05" * 32, 4: b"\x04" * 32})
    assert await read_aux_data(rounds, 2) == AuxData(5, b"\x05" * 32)
    assert rounds.asked == [5]


async def test_aux_data_falls_back_one_round_when_the_hash_is_zero() -> None:
    rounds = FakeRounds(5, hashes={4: b"\x04" * 32})
    assert await read_aux_data(rounds, 2) == AuxData(4, b"\x04" * 32)


@pytest.mark.parametrize(
    ("rounds", "validity", "reason"),
    [
        (FakeRounds(5, initialized=False, hashes={5: b"\x05" * 32}), 2, "not initialized"),
        (FakeRounds(5), 2, "neither round 5 nor round 4"),
        (FakeRounds(5, hashes={4: b"\x04" * 32}), 1, "round 4 is expired"),
    ],
)
async def test_aux_data_refuses_when_no_round_qualifies(
    rounds: FakeRounds, validity: int, reason: str
) -> None:
    with pytest.raises(RoundsNotReady, match=reason):
        await read_aux_data(rounds, validity)


def test_recipient_rand_hash_is_keccak_of_32_big_endian_bytes() -> None:
    assert recipient_rand_hash(1) == keccak(b"\x00" * 31 + b"\x01")
    signed = create_signed_ticket(RECIPIENT, 1, AUX, KEY, sender_nonce=9, recipient_rand=3)
    assert isinstance(signed, SignedTicket)
    assert signed.ticket.sender_nonce == 9
    assert signed.ticket.recipient_rand_hash == recipient_rand_hash(3)
