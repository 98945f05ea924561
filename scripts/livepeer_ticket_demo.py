#!/usr/bin/env python3
"""Pay one orchestrator, or a batch, with always-winning Livepeer TicketBroker tickets: a demo,
with the original script's flags.

Logs the sender's deposit and reserve, optionally tops the deposit up (`--fund-deposit-eth`,
always awaited), then redeems the tickets (redeemWinningTicket for `--recipient`/`--amount-eth`,
batchRedeemWinningTickets for `--batch-payouts-json`) and logs the transaction hash. With
`--wait` it also logs the block, the status and, per ticket, whether it was redeemed and what
it paid: a batch has status 1 even when a ticket inside it failed. `--dry-run` builds and signs
everything but broadcasts nothing.

The key comes from --private-key, --private-key-file (raw hex or JSON {"private_key": ...}), or
their environment variables PAYMENT_PRIVATE_KEY / PAYMENT_PRIVATE_KEY_FILE; it is never printed.
Exit codes: 0 done, 1 the chain refused or a ticket was not fully paid, 2 bad input (nothing sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account
from eth_typing import ChecksumAddress
from eth_utils.address import is_checksum_address, to_checksum_address
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.types import TxParams, TxReceipt

from shared.chain.ticket_broker import (
    RedemptionReport,
    SenderInfo,
    SignedTx,
    TicketBrokerClient,
    TicketOutcome,
    batch_gas_limit,
    sign_transaction,
)
from shared.chain.tickets import UINT256_MAX, RoundsNotReady, SignedTicket, create_signed_ticket
from shared.money import AmountError, eth_to_wei, to_decimal, wei_to_eth

PROG = "livepeer_ticket_demo"
ENV_RPC_URL = "ETH_RPC_URL"
ENV_CHAIN_ID = "ETH_CHAIN_ID"
ENV_TICKET_BROKER = "PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS"
ENV_PRIVATE_KEY = "PAYMENT_PRIVATE_KEY"
ENV_PRIVATE_KEY_FILE = "PAYMENT_PRIVATE_KEY_FILE"
DEFAULT_RPC_URL = "http://localhost:8545"
DEFAULT_CHAIN_ID = 42161  # Arbitrum One
DEFAULT_WAIT_TIMEOUT_S = 180.0
MAX_BATCH_TICKETS = 20  # the original's PAYMENTS_LIVEPEER_BATCH_MAX_TICKETS default
MAX_KEY_FILE_BYTES = 4096
MAX_PAYOUTS_FILE_BYTES = 1_000_000
PRIVATE_KEY_HEX_DIGITS = 64
ADDRESS_PATTERN = re.compile(r"0x[0-9a-fA-F]{40}")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad flags, files or configuration: exit 2, nothing sent."""


class DemoFailed(RuntimeError):
    """The node or the contract refused, or a ticket was not paid: exit 1."""


@dataclass(frozen=True)
class Payout:
    recipient: ChecksumAddress
    amount_wei: int


@dataclass(frozen=True)
class Options:
    rpc_url: str
    chain_id: int
    ticket_broker: ChecksumAddress
    private_key: str = field(repr=False)
    payouts: tuple[Payout, ...]
    batch: bool
    fund_wei: int
    dry_run: bool
    wait: bool
    wait_timeout_s: float


# -- flags ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ.get
    parser.add_argument("--rpc-url", default=env(ENV_RPC_URL, DEFAULT_RPC_URL))
    parser.add_argument("--chain-id", type=int, default=env(ENV_CHAIN_ID, str(DEFAULT_CHAIN_ID)))
    parser.add_argument("--ticket-broker", default=env(ENV_TICKET_BROKER))
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--private-key", help=f"visible in `ps`; prefer ${ENV_PRIVATE_KEY}")
    keys.add_argument("--private-key-file", type=Path, help='raw hex or {"private_key": ...}')
    parser.add_argument("--dry-run", action="store_true", help="build and sign, send nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the receipt and report")
    parser.add_argument("--wait-timeout-seconds", type=float, default=DEFAULT_WAIT_TIMEOUT_S)
    parser.add_argument("--recipient", help="single payout: the orchestrator's address")
    parser.add_argument("--amount-eth", help="single payout: the ticket's face value in ETH")
    parser.add_argument(
        "--batch-payouts-json", type=Path, help='a JSON list of {"recipient", "amount_eth"}'
    )
    parser.add_argument("--fund-deposit-eth", help="add this to the deposit before paying")
    return parser


def parse_address(value: object, what: str) -> ChecksumAddress:
    """0x and 40 hex digits; mixed case must be a valid EIP-55 checksum (eth-utils' is_address
    no longer checks it), so a typo in a copied address is refused."""
    if not isinstance(value, str) or not ADDRESS_PATTERN.fullmatch(value):
        raise UsageError(f"{what} is not an address (0x and 40 hex digits): {value!r}")
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(value):
        raise UsageError(f"{what} has a bad checksum (a typo?): {value}")
    if int(digits, 16) == 0:
        raise UsageError(f"{what} is the zero address")
    return to_checksum_address(value)


def parse_amount_wei(value: object, what: str) -> int:
    """A positive ETH amount (decimal string, int or Decimal, never a float) in wei."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise UsageError(f"{what} must be a decimal number of ETH, got {value!r}")
    try:
        wei = eth_to_wei(to_decimal(value.strip() if isinstance(value, str) else value))
    except AmountError as error:
        raise UsageError(f"{what}: {error}") from None
    if not 0 < wei <= UINT256_MAX:
        raise UsageError(f"{what} must be a positive amount of at least 1 wei, got {value!r}")
    return wei


def read_limited(path: Path, limit_bytes: int, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit_bytes + 1)
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None
    if len(data) > limit_bytes:
        raise UsageError(f"{what} {path} is larger than {limit_bytes} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def load_payouts(path: Path) -> tuple[Payout, ...]:
    text = read_limited(path, MAX_PAYOUTS_FILE_BYTES, "payouts file")
    try:
        entries = json.loads(text, parse_float=Decimal)  # amounts never pass through a float
    except json.JSONDecodeError as error:
        raise UsageError(f"payouts file {path} is not valid JSON: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"payouts file {path} must hold a non-empty JSON list")
    if len(entries) > MAX_BATCH_TICKETS:
        raise UsageError(
            f"payouts file {path} has {len(entries)} entries; at most {MAX_BATCH_TICKETS}"
        )
    return tuple(parse_payout_entry(entry, f"payout {n}") for n, entry in enumerate(entries, 1))


def parse_payout_entry(entry: Any, what: str) -> Payout:
    if not isinstance(entry, dict) or not {"recipient", "amount_eth"} <= entry.keys():
        raise UsageError(f'{what} must be an object with "recipient" and "amount_eth"')
    return Payout(
        parse_address(entry["recipient"], f"{what} recipient"),
        parse_amount_wei(entry["amount_eth"], f"{what} amount_eth"),
    )


def read_payouts(args: argparse.Namespace) -> tuple[tuple[Payout, ...], bool]:
    """The payouts and whether they go in a batch transaction."""
    single = args.recipient is not None or args.amount_eth is not None
    if single and args.batch_payouts_json is not None:
        raise UsageError("give --recipient/--amount-eth or --batch-payouts-json, not both")
    if args.batch_payouts_json is not None:
        return load_payouts(args.batch_payouts_json), True
    if args.recipient is None or args.amount_eth is None:
        raise UsageError("give --recipient with --amount-eth, or --batch-payouts-json")
    payout = Payout(
        parse_address(args.recipient, "--recipient"),
        parse_amount_wei(args.amount_eth, "--amount-eth"),
    )
    return (payout,), False


def parse_private_key(text: str, source: str) -> str:
    """A 0x-hex key from raw hex or JSON {"private_key": ...}; the errors never quote it."""
    value: object = text.strip()
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value).get("private_key")
        except (json.JSONDecodeError, AttributeError):
            raise UsageError(f"{source} is neither hex nor valid JSON") from None
    if not isinstance(value, str):
        raise UsageError(f'{source} has no "private_key" string')
    digits = value.strip().removeprefix("0x")
    if len(digits) != PRIVATE_KEY_HEX_DIGITS:
        raise UsageError(f"{source} is not a {PRIVATE_KEY_HEX_DIGITS}-digit hex private key")
    try:
        Account.from_key("0x" + digits)
    except Exception:  # any error text could quote the key
        raise UsageError(f"{source} is not a valid private key") from None
    return "0x" + digits


def read_private_key(args: argparse.Namespace) -> str:
    """--private-key, else --private-key-file, else the env var (both set: refused)."""
    if args.private_key is not None:
        return parse_private_key(args.private_key, "--private-key")
    key_file: Path | None = args.private_key_file
    if key_file is None:
        from_env, file_env = os.environ.get(ENV_PRIVATE_KEY), os.environ.get(ENV_PRIVATE_KEY_FILE)
        if from_env and file_env:
            raise UsageError(f"both {ENV_PRIVATE_KEY} and {ENV_PRIVATE_KEY_FILE} are set; keep one")
        if from_env:
            return parse_private_key(from_env, ENV_PRIVATE_KEY)
        if not file_env:
            raise UsageError(
                f"no key: give --private-key-file, or set {ENV_PRIVATE_KEY}/{ENV_PRIVATE_KEY_FILE}"
            )
        key_file = Path(file_env)
    text = read_limited(key_file, MAX_KEY_FILE_BYTES, "private key file")
    return parse_private_key(text, f"private key file {key_file}")


def resolve_options(args: argparse.Namespace) -> Options:
    if not args.ticket_broker:
        raise UsageError(f"--ticket-broker (or {ENV_TICKET_BROKER}) is required")
    if not (math.isfinite(args.wait_timeout_seconds) and args.wait_timeout_seconds > 0):
        raise UsageError("--wait-timeout-seconds must be positive")
    payouts, batch = read_payouts(args)
    fund_wei = 0
    if args.fund_deposit_eth is not None:
        fund_wei = parse_amount_wei(args.fund_deposit_eth, "--fund-deposit-eth")
    return Options(
        rpc_url=args.rpc_url,
        chain_id=args.chain_id,
        ticket_broker=parse_address(args.ticket_broker, "--ticket-broker"),
        private_key=read_private_key(args),
        payouts=payouts,
        batch=batch,
        fund_wei=fund_wei,
        dry_run=args.dry_run,
        wait=args.wait,
        wait_timeout_s=args.wait_timeout_seconds,
    )


# -- output -------------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def eth(wei: int) -> str:
    return f"{wei_to_eth(wei)} ETH"


def node_name(rpc_url: str) -> str:
    """The URL without path, query or credentials (hosted RPC URLs often carry an API key)."""
    parts = urlsplit(rpc_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def describe_funds(label: str, info: SenderInfo) -> str:
    text = f"{label}: deposit {eth(info.deposit_wei)}, reserve {eth(info.reserve_wei)}"
    if info.withdraw_round:
        text += f" (unlock in progress, withdraw round {info.withdraw_round})"
    return text


def describe_outcome(index: int, outcome: TicketOutcome) -> str:
    head = (
        f"ticket {index} 0x{outcome.ticket_hash.hex()} to {outcome.recipient}: "
        f"face value {eth(outcome.face_value_wei)}, "
    )
    if not outcome.redeemed:
        return head + "NOT redeemed (it stays redeemable until it expires)"
    note = "" if outcome.fully_paid else " (SHORT: deposit and reserve ran out)"
    return head + f"redeemed, paid {eth(outcome.paid_wei)}{note}"


def report_redemption(report: RedemptionReport) -> bool:
    """Log the receipt and each ticket; True when every ticket was paid in full."""
    say(f"block {report.block_number}, status {report.status}")
    for index, outcome in enumerate(report.outcomes, 1):
        say(describe_outcome(index, outcome))
    return report.status == 1 and all(o.fully_paid for o in report.outcomes)


# -- the chain ----------------------------------------------------------------------------------


async def check_chain(broker: TicketBrokerClient, options: Options) -> None:
    actual = await broker.chain_id()
    if actual != options.chain_id:
        raise UsageError(
            f"chain id mismatch: --chain-id/{ENV_CHAIN_ID} is {options.chain_id}, but the node "
            f"at {node_name(options.rpc_url)} is on chain {actual}; refusing to sign"
        )
    if not await broker.w3.eth.get_code(broker.address):
        raise DemoFailed(f"no contract at {broker.address} on chain {actual}")


async def send_and_wait(
    broker: TicketBrokerClient, signed: SignedTx, label: str, timeout_s: float
) -> int:
    """Broadcast, log the hash, wait; returns the receipt's status."""
    await broker.broadcast(signed.raw_transaction)
    say(f"{label}: tx 0x{signed.tx_hash.hex()}")
    receipt = await wait_receipt(broker, signed, timeout_s)
    say(f"{label}: block {receipt['blockNumber']}, status {receipt['status']}")
    return int(receipt["status"])


async def wait_receipt(broker: TicketBrokerClient, signed: SignedTx, timeout_s: float) -> TxReceipt:
    try:
        return await broker.wait_for_receipt(signed.tx_hash, timeout_s)
    except TimeExhausted:
        raise DemoFailed(
            f"no receipt for 0x{signed.tx_hash.hex()} within {timeout_s:g}s; it may still be mined"
        ) from None


async def fund_deposit(
    broker: TicketBrokerClient, options: Options, sender: str, nonce: int
) -> None:
    """Top the deposit up (awaited: the redemption's gas estimate needs the new deposit)."""
    tx = await broker.build_fund_deposit_tx(sender, options.fund_wei, nonce=nonce)
    signed = sign_transaction(tx, options.private_key)
    label = f"deposit top-up of {eth(options.fund_wei)}"
    if options.dry_run:
        say(f"dry run: {label} signed, not broadcast (tx 0x{signed.tx_hash.hex()})")
        return
    if await send_and_wait(broker, signed, label, options.wait_timeout_s) != 1:
        raise DemoFailed("the deposit top-up reverted; nothing was paid")
    say(describe_funds("after the top-up", await broker.sender_info(sender)))


def require_funds(info: SenderInfo, options: Options) -> None:
    total_wei = sum(p.amount_wei for p in options.payouts)
    available_wei = info.deposit_wei + options.fund_wei
    if available_wei < total_wei:
        deposit = eth(available_wei) + (" with the top-up" if options.fund_wei else "")
        raise DemoFailed(
            f"the deposit ({deposit}) does not cover the tickets ({eth(total_wei)}); "
            "add or raise --fund-deposit-eth"
        )


async def make_tickets(broker: TicketBrokerClient, options: Options) -> list[SignedTicket]:
    try:
        aux = await broker.aux_data()
    except RoundsNotReady as error:
        raise DemoFailed(f"cannot make tickets now: {error}") from None
    for recipient in sorted({p.recipient for p in options.payouts}):
        if not await broker.is_active_transcoder(recipient):
            say(f"warning: {recipient} is not an active transcoder; its ticket will fail")
    key = options.private_key
    return [create_signed_ticket(p.recipient, p.amount_wei, aux, key) for p in options.payouts]


async def build_payment(
    broker: TicketBrokerClient,
    options: Options,
    sender: str,
    tickets: list[SignedTicket],
    nonce: int,
) -> TxParams:
    if options.batch:
        return await broker.build_batch_redeem_tx(sender, tickets, nonce=nonce)
    # A dry run's top-up was not sent, so an estimate would see the old deposit.
    gas = batch_gas_limit(1) if options.dry_run and options.fund_wei else None
    try:
        return await broker.build_redeem_tx(sender, tickets[0], nonce=nonce, gas=gas)
    except ContractLogicError as error:
        raise DemoFailed(f"the redemption would revert: {error}") from None


async def pay(broker: TicketBrokerClient, options: Options) -> int:
    await check_chain(broker, options)
    sender = Account.from_key(options.private_key).address
    info = await broker.sender_info(sender)
    say(f"sender {sender}, TicketBroker {broker.address}, chain {options.chain_id}")
    say(describe_funds("sender", info))
    require_funds(info, options)
    nonce = int(await broker.w3.eth.get_transaction_count(sender, "pending"))
    if options.fund_wei:
        await fund_deposit(broker, options, sender, nonce)
        nonce += 1
    tickets = await make_tickets(broker, options)
    tx = await build_payment(broker, options, sender, tickets, nonce)
    signed = sign_transaction(tx, options.private_key)
    kind = f"batch of {len(tickets)} tickets" if options.batch else "1 ticket"
    label = f"redemption ({kind}, {eth(sum(t.face_value_wei for t in tickets))})"
    if options.dry_run:
        say(f"dry run: {label} signed, not broadcast (tx 0x{signed.tx_hash.hex()})")
        say("dry run: nothing was sent")
        return EXIT_OK
    await broker.broadcast(signed.raw_transaction)
    say(f"{label}: tx 0x{signed.tx_hash.hex()}")
    if not options.wait:
        return EXIT_OK
    receipt = await wait_receipt(broker, signed, options.wait_timeout_s)
    paid_in_full = report_redemption(broker.redemption_report(receipt, tickets))
    return EXIT_OK if paid_in_full else EXIT_FAILED


async def run(options: Options) -> int:
    broker = TicketBrokerClient.connect(options.rpc_url, options.ticket_broker)
    try:
        return await pay(broker, options)
    except (TimeoutError, aiohttp.ClientError, OSError) as error:
        where = node_name(options.rpc_url)
        raise DemoFailed(f"cannot talk to the node at {where}: {type(error).__name__}") from None
    except Web3Exception as error:
        raise DemoFailed(f"the node refused: {error}") from None
    finally:
        await broker.w3.provider.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(resolve_options(args)))
    except UsageError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DemoFailed as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
