"""The TicketBroker double on Anvil, driven by our client (which knows only the real ABI):
the real selectors and topics, hashing, redemption, replay, bad signatures, partial batches,
deposit and reserve arithmetic, and the rounds and recipient checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from eth_account import Account
from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector, keccak
from web3.exceptions import ContractLogicError, ContractPanicError

from shared.chain.devchain import compile_ticket_broker_double
from shared.chain.devtools import Anvil, dev_accounts, transact
from shared.chain.ticket_broker import load_abi, sign_transaction
from shared.chain.tickets import AuxData, RoundsNotReady, SignedTicket, redeem_calldata, sign_ticket
from tests.chain.ticket_helpers import (
    ETH,
    VECTOR_EMPTY_AUX,
    VECTOR_EMPTY_AUX_HASH,
    VECTOR_ROUND_10,
    VECTOR_ROUND_10_HASH,
    ZERO_ADDRESS,
    BrokerDouble,
    deploy_double,
    text_signed,
    tickets_for,
)

# ticketbroker.md §4 and §7, literally.
REAL_SELECTORS = {
    "redeemWinningTicket": "ec8b3cb6",
    "batchRedeemWinningTickets": "d01b808e",
    "fundDeposit": "6caa736b",
    "fundReserve": "6f9c3c8f",
    "fundDepositAndReserve": "511f4073",
    "fundDepositAndReserveFor": "989f789c",
    "getSenderInfo": "e1a589da",
    "getReserveInfo": "5b6333eb",
    "claimableReserve": "81779f38",
    "claimedReserve": "4ac826da",
    "getTicketHash": "b03fa864",
    "usedTickets": "59a515ba",
    "unlock": "a69df4b5",
    "cancelUnlock": "c2c4c2c8",
    "withdraw": "3ccfd60b",
    "isUnlockInProgress": "121cdcc2",
    "ticketValidityPeriod": "856a2cf8",
    "unlockPeriod": "20d3a0b4",
    "controller": "f77c4791",
    "getContract": "e16c7d98",
    "paused": "5c975abb",
    "currentRound": "8a19c8bc",
    "currentRoundInitialized": "219bc76c",
    "lastInitializedRound": "8807f36e",
    "blockHashForRound": "3aa4add4",
    "initializeRound": "d4807fb2",
    "isRegisteredTranscoder": "68ba170c",
    "isActiveTranscoder": "08802374",
    "getTranscoderPoolSize": "2a4e0d55",
    "pendingFees": "f595f1cc",
    "withdrawFees": "ad3b1b47",
}
REAL_TOPICS = {
    "WinningTicketRedeemed": "c389eb51ed006dbf2528507f010efdf5225ea596e1e1741d74f550dab1925ee7",
    "WinningTicketTransfer": "8b87351a208c06e3ceee59d80725fd77a23b4129e1b51ca231fc89b40712649c",
    "DepositFunded": "5159e237d952190e68d5215430f305831be7c9c8776d1377c76679ae4773413f",
    "ReserveFunded": "b52b99b9e83551fcbd069b559cc3e823e2a1a3bad8ece46561ea77524394c850",
    "ReserveClaimed": "5c2b394723f408a40a60335e24b71829642e35f350cebe2036a96a66e895ea98",
    "Unlock": "f7870c5b224cbc19873599e46ccfc7103934650509b1af0c3ce90138377c2004",
    "UnlockCancelled": "fa044b7b93a40365dc68049797c2eb06918523d694e5d56e406cac3eb35578e5",
    "Withdrawal": "df273cb619d95419a9cd0ec88123a0538c85064229baa6363788f743fff90deb",
    "WithdrawFees": "4f1b51dd7a2fcb861aa2670f668be66835c4ee12b4bbbf037e4d0018f39819e4",
}
ABI_FILES = ("ticket_broker", "controller", "rounds_manager", "bonding_manager")
FACE = ETH // 10


@pytest.fixture
def double(anvil: Anvil) -> BrokerDouble:
    return deploy_double(anvil)


async def funded(double: BrokerDouble, deposit_wei: int = ETH) -> BrokerDouble:
    await double.client().fund_deposit(double.payer_key, deposit_wei)
    return double


def _by_name(abi: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in abi if entry["type"] in ("function", "event")}


def _types(params: list[dict]) -> list[str]:
    return [
        "(" + ",".join(_types(p["components"])) + ")" if p["type"] == "tuple" else p["type"]
        for p in params
    ]


def test_the_double_keeps_the_real_selectors_topics_and_outputs() -> None:
    compiled = _by_name(compile_ticket_broker_double().abi)
    fragments = {name: entry for f in ABI_FILES for name, entry in _by_name(load_abi(f)).items()}
    assert set(REAL_SELECTORS) | set(REAL_TOPICS) == set(fragments)
    for name, selector in REAL_SELECTORS.items():
        assert function_abi_to_4byte_selector(fragments[name]).hex() == selector, name
        assert function_abi_to_4byte_selector(compiled[name]).hex() == selector, name
        assert _types(compiled[name]["outputs"]) == _types(fragments[name]["outputs"]), name
    for name, topic in REAL_TOPICS.items():
        assert event_abi_to_log_topic(fragments[name]).hex() == topic, name
        assert event_abi_to_log_topic(compiled[name]).hex() == topic, name
        indexed = [p["indexed"] for p in compiled[name]["inputs"]]
        assert indexed == [p["indexed"] for p in fragments[name]["inputs"]], name


async def test_python_hash_equals_get_ticket_hash(double: BrokerDouble) -> None:
    client = double.client()
    for vector, expected in (
        (VECTOR_ROUND_10, VECTOR_ROUND_10_HASH),
        (VECTOR_EMPTY_AUX, VECTOR_EMPTY_AUX_HASH),
    ):
        assert (await client.onchain_ticket_hash(vector)).hex() == expected
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])
    assert await client.onchain_ticket_hash(signed.ticket) == signed.hash


async def test_discovery_goes_through_the_controller(double: BrokerDouble) -> None:
    client = double.client()
    rounds = await client.rounds_manager()
    assert rounds.contract.address == double.address
    assert await rounds.current_round() == 1
    assert await client.is_active_transcoder(double.recipients[0])
    assert not await client.is_active_transcoder(double.owner.address)
    assert not await client.is_paused()
    unknown = double.contract.functions.getContract(keccak(text="Minter")).call()
    assert int(unknown, 16) == 0


async def test_an_always_winning_ticket_pays_its_face_value(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])

    report = await client.redeem(double.payer_key, signed)

    assert report.status == 1
    assert report.paid == {signed.hash: FACE}
    assert report.outcomes[0].fully_paid
    assert double.credited(signed.ticket.recipient) == FACE
    assert (await client.sender_info(double.owner.address)).deposit_wei == ETH - FACE
    assert await client.is_ticket_used(signed.hash)


async def test_a_replayed_ticket_reverts_ticket_is_used(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])
    await client.redeem(double.payer_key, signed)

    with pytest.raises(ContractLogicError, match="ticket is used"):
        await client.build_redeem_tx(double.owner.address, signed)
    assert double.credited(signed.ticket.recipient) == FACE


async def test_a_text_signed_ticket_reverts_invalid_signature(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])

    with pytest.raises(ContractLogicError, match="invalid signature over ticket hash"):
        await client.build_redeem_tx(double.owner.address, text_signed(signed, double.payer_key))
    assert not await client.is_ticket_used(signed.hash)


async def test_a_batch_with_one_bad_ticket_succeeds_and_pays_the_other_two(
    double: BrokerDouble,
) -> None:
    await funded(double)
    client = double.client()
    good_first, bad, good_last = tickets_for(double, await client.aux_data(), [FACE, FACE, FACE])
    batch = [good_first, text_signed(bad, double.payer_key), good_last]

    report = await client.redeem_batch(double.payer_key, batch)

    assert report.status == 1
    assert report.paid == {good_first.hash: FACE, good_last.hash: FACE}
    assert [o.redeemed for o in report.outcomes] == [True, False, True]
    assert [o.ticket_hash for o in report.unredeemed] == [bad.hash]
    assert double.deposit() == ETH - 2 * FACE
    assert not await client.is_ticket_used(bad.hash)


async def test_a_ticket_that_failed_in_a_batch_stays_redeemable_by_anyone(
    double: BrokerDouble,
) -> None:
    """Why an unredeemed ticket is retried as is, never replaced while unexpired: its calldata
    is public, and the recipient (or anyone) can redeem it once the failure cause is gone."""
    await funded(double)
    client = double.client()
    recipient = double.recipients[0]
    double.admin(double.contract.functions.setTranscoders([recipient], True, False))
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])
    report = await client.redeem_batch(double.payer_key, [signed])
    assert [o.ticket_hash for o in report.unredeemed] == [signed.hash]

    double.admin(double.contract.functions.setTranscoders([recipient], True, True))
    recipient_key = dev_accounts()[1].private_key
    assert Account.from_key(recipient_key).address == recipient
    later = await client.redeem(recipient_key, signed)  # the recipient pays the gas itself

    assert later.paid == {signed.hash: FACE}
    with pytest.raises(ContractLogicError, match="ticket is used"):
        await client.build_redeem_tx(double.owner.address, signed)


async def test_the_gas_estimate_as_batch_limit_silently_drops_the_last_ticket(
    double: BrokerDouble,
) -> None:
    """Why batches get an explicit per-ticket budget (ticketbroker.md §5)."""
    await funded(double)
    client = double.client()
    batch = tickets_for(double, await client.aux_data(), [FACE, FACE, FACE])
    tx = await client.build_batch_redeem_tx(double.owner.address, batch)
    tx["gas"] = await client.w3.eth.estimate_gas(
        {"from": tx["from"], "to": tx["to"], "data": tx["data"]}
    )

    report = client.redemption_report(await client.send(tx, double.payer_key), batch)

    assert report.status == 1
    assert [o.redeemed for o in report.outcomes] == [True, True, False]


async def test_face_value_above_the_deposit_pays_only_the_deposit(double: BrokerDouble) -> None:
    deposit = ETH // 4
    await funded(double, deposit)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [ETH])

    report = await client.redeem(double.payer_key, signed)

    assert report.paid == {signed.hash: deposit}
    assert report.short_paid == report.outcomes
    assert double.credited(signed.ticket.recipient) == deposit
    assert double.deposit() == 0
    assert await client.is_ticket_used(signed.hash)  # used, though only partly paid


async def test_the_reserve_covers_the_rest_up_to_the_recipient_share(
    double: BrokerDouble,
) -> None:
    deposit, reserve = ETH // 10, ETH * 3 // 10
    fund = double.contract.functions.fundDepositAndReserve(deposit, reserve)
    transact(double.w3, double.owner, fund, value_wei=deposit + reserve)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [ETH])

    report = await client.redeem(double.payer_key, signed)

    share = reserve // len(double.recipients)  # three active recipients
    assert report.paid == {signed.hash: deposit + share}
    info = await client.sender_info(double.owner.address)
    assert (info.deposit_wei, info.reserve_wei) == (0, reserve - share)
    assert info.reserve_claimed_in_current_round_wei == share


async def test_a_signed_transaction_is_stored_then_broadcast(double: BrokerDouble) -> None:
    """The worker's path: build with its own nonce, sign, store, broadcast the raw bytes."""
    await funded(double)
    client = double.client()
    tickets = tickets_for(double, await client.aux_data(), [FACE, FACE])
    nonce = await client.w3.eth.get_transaction_count(double.owner.address)
    tx = await client.build_batch_redeem_tx(double.owner.address, tickets, nonce=nonce)
    signed = sign_transaction(tx, double.payer_key)

    assert await client.broadcast(signed.raw_transaction) == signed.tx_hash
    receipt = await client.wait_for_receipt(signed.tx_hash)

    assert receipt["gasUsed"] < signed.gas
    assert client.redemption_report(receipt, tickets).paid == {t.hash: FACE for t in tickets}


Spoil = Callable[[SignedTicket, AuxData, str], SignedTicket]


def _with(signed: SignedTicket, **changes: Any) -> SignedTicket:
    """The ticket with `changes`, keeping the old signature (so it no longer matches)."""
    return SignedTicket(replace(signed.ticket, **changes), signed.signature, signed.recipient_rand)


def _resigned(signed: SignedTicket, key: str, **changes: Any) -> SignedTicket:
    return sign_ticket(replace(signed.ticket, **changes), signed.recipient_rand, key)


SPOILED: list[tuple[Spoil, str]] = [
    (lambda s, aux, key: _with(s, aux_data=aux.encode()[:63]), "must be 64 bytes"),
    (
        lambda s, aux, key: _with(s, aux_data=AuxData(1, b"\x01" * 32).encode()),
        "ticket creationRoundBlockHash invalid for creationRound",
    ),
    (
        lambda s, aux, key: _with(s, aux_data=AuxData(9, b"\x01" * 32).encode()),
        "ticket creationRound does not have a block hash",
    ),
    (
        lambda s, aux, key: SignedTicket(s.ticket, s.signature, s.recipient_rand + 1),
        "recipientRand does not match recipientRandHash",
    ),
    (lambda s, aux, key: _with(s, face_value_wei=FACE + 1), "invalid signature over ticket hash"),
    (
        lambda s, aux, key: SignedTicket(s.ticket, s.signature[:64], s.recipient_rand),
        "INVALID_SIGNATURE_LENGTH",
    ),
    (lambda s, aux, key: _resigned(s, key, win_prob=0), "ticket did not win"),
    (lambda s, aux, key: _resigned(s, key, recipient=ZERO_ADDRESS), "recipient is null address"),
]


@pytest.mark.parametrize(("spoil", "reason"), SPOILED)
async def test_each_bad_field_reverts_with_the_real_reason(
    double: BrokerDouble, spoil: Spoil, reason: str
) -> None:
    await funded(double)
    client = double.client()
    aux = await client.aux_data()
    (signed,) = tickets_for(double, aux, [FACE])
    with pytest.raises(ContractLogicError, match=reason):
        await client.build_redeem_tx(double.owner.address, spoil(signed, aux, double.payer_key))


async def test_rounds_checks(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    aux = await client.aux_data()
    (signed,) = tickets_for(double, aux, [FACE])
    set_round = double.contract.functions.setRound

    double.admin(set_round(2, False))
    with pytest.raises(RoundsNotReady, match="not initialized"):
        await client.aux_data()
    with pytest.raises(ContractLogicError, match="current round is not initialized"):
        await client.build_redeem_tx(double.owner.address, signed)
    tx = await client.build_batch_redeem_tx(double.owner.address, [signed])
    assert (await client.send(tx, double.payer_key))["status"] == 0  # the whole batch reverts

    # Round 2 initialized without a block hash: tickets backdate to round 1, still valid.
    double.admin(set_round(2, True))
    assert await client.aux_data() == aux
    report = await client.redeem(double.payer_key, signed)
    assert report.paid == {signed.hash: FACE}

    # A round-1 ticket expires in round 3 (validity period 2).
    (late,) = tickets_for(double, aux, [FACE])
    assert not await client.ticket_expired(late.ticket)
    double.admin(set_round(3, True))
    assert await client.ticket_expired(late.ticket)
    with pytest.raises(ContractLogicError, match="ticket is expired"):
        await client.build_redeem_tx(double.owner.address, late)


async def test_recipient_must_be_registered_and_active(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    unregistered, inactive = double.recipients[:2]
    double.admin(double.contract.functions.setTranscoders([unregistered], False, False))
    double.admin(double.contract.functions.setTranscoders([inactive], True, False))
    first, second = tickets_for(double, await client.aux_data(), [FACE, FACE])

    with pytest.raises(ContractLogicError, match="transcoder must be registered"):
        await client.build_redeem_tx(double.owner.address, first)
    with pytest.raises(ContractPanicError, match="0x12"):
        await client.build_redeem_tx(double.owner.address, second)
    assert not await client.is_active_transcoder(inactive)


async def test_paused_system_refuses_redemption(double: BrokerDouble) -> None:
    await funded(double)
    client = double.client()
    (signed,) = tickets_for(double, await client.aux_data(), [FACE])
    double.admin(double.contract.functions.setPaused(True))
    assert await client.is_paused()
    with pytest.raises(ContractLogicError, match="system is paused"):
        await client.build_redeem_tx(double.owner.address, signed)


def test_redeem_calldata_is_what_web3_encodes(double: BrokerDouble) -> None:
    (signed,) = tickets_for(double, AuxData(1, b"\x01" * 32), [FACE])
    encoded = double.contract.encode_abi("redeemWinningTicket", args=list(signed.redeem_args()))
    assert redeem_calldata(signed) == bytes.fromhex(encoded[2:])
