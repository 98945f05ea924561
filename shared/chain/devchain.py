"""`payments devchain`: Anvil on 127.0.0.1 with our TicketBroker double deployed and ready.

The double (contracts/solidity/TicketBrokerDouble.sol) gets an initialized current round with a
block hash and a set of registered, active recipients, so always-winning tickets from the
printed key redeem at once. The printed key is Anvil's well-known deterministic account 0: a
development key, public to everyone, never for a real chain.

For tests, demos and users; the api and workers never import it. Tests deploy the same way:

    with Anvil() as anvil:
        w3 = connect(anvil.rpc_url)
        broker = deploy_ticket_broker_double(w3, anvil.accounts[0], recipients)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import FrameType
from typing import TextIO

from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address
from web3 import Web3
from web3.contract import Contract

from shared.chain.devtools import (
    DEFAULT_CHAIN_ID,
    Anvil,
    AnvilError,
    CompiledContract,
    DevAccount,
    ToolMissing,
    compile_solidity,
    connect,
    deploy_contract,
    solcjs_path,
    solidity_source,
    tools_dir,
    transact,
)

TICKET_BROKER_DOUBLE = "TicketBrokerDouble"
OPTIMIZE = True
ARTIFACT_DIRNAME = "artifacts"  # under .tools/, which `make tools` owns and git ignores
ARTIFACT_KEY_HEX_DIGITS = 16
DEFAULT_PORT = 8545
DEV_ROUND = 1
# Anvil's accounts 1..3 are the default recipients; account 0 deploys and is the payer.
DEFAULT_RECIPIENT_INDEXES = (1, 2, 3)
PAYER_INDEX = 0
ALIVE_POLL_S = 0.5

# The printed names are the settings' environment variables, so the output can be sourced.
ENV_RPC_URL = "ETH_RPC_URL"
ENV_CHAIN_ID = "ETH_CHAIN_ID"
ENV_TICKET_BROKER = "PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS"
ENV_PRIVATE_KEY = "PAYMENT_PRIVATE_KEY"
DEV_KEY_WARNING = (
    "DEVELOPMENT KEY: Anvil's public, deterministic account 0. Anyone can spend from it on "
    "any chain; never use it outside this devchain."
)


@cache
def compile_ticket_broker_double() -> CompiledContract:
    """The double's ABI and bytecode, compiled by solcjs from .tools/. The result is kept in
    .tools/artifacts/ under a key of the source, the solc version and the optimizer flag, so
    later starts skip solcjs (seconds); a missing solc still fails at once."""
    source = solidity_source(TICKET_BROKER_DOUBLE)
    cached = _artifact_path(source)
    if cached.is_file():
        data = json.loads(cached.read_text())
        return CompiledContract(abi=data["abi"], bytecode=data["bytecode"])
    compiled = compile_solidity(source, optimize=OPTIMIZE)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"abi": compiled.abi, "bytecode": compiled.bytecode}))
    os.replace(partial, cached)  # atomic: concurrent starts never read half a file
    return compiled


def _artifact_path(source: Path) -> Path:
    solc_package = solcjs_path().parent / "package.json"  # ToolMissing if solc is not installed
    solc_version = json.loads(solc_package.read_text())["version"]
    key = hashlib.sha256(source.read_bytes())
    key.update(f"solc {solc_version} optimize {OPTIMIZE}".encode())
    name = f"{source.stem}-{key.hexdigest()[:ARTIFACT_KEY_HEX_DIGITS]}.json"
    return tools_dir() / ARTIFACT_DIRNAME / name


def deploy_ticket_broker_double(
    w3: Web3,
    owner: DevAccount,
    recipients: Sequence[str],
    *,
    current_round: int = DEV_ROUND,
) -> Contract:
    """Deploy the double from `owner`, set `current_round` and initialize it (its block hash is
    the previous block's, as on the real RoundsManager), and make `recipients` registered and
    active. Returns the double bound to its full ABI (owner controls included)."""
    broker = deploy_contract(w3, compile_ticket_broker_double(), owner)
    transact(w3, owner, broker.functions.setRound(current_round, False))
    transact(w3, owner, broker.functions.initializeRound())
    if recipients:
        members = [to_checksum_address(r) for r in recipients]
        transact(w3, owner, broker.functions.setTranscoders(members, True, True))
    return broker


@dataclass(frozen=True)
class DevChain:
    """A running devchain: its node, the deployed double, the payer and the recipients."""

    anvil: Anvil
    broker_address: ChecksumAddress
    payer: DevAccount
    recipients: tuple[ChecksumAddress, ...]

    @property
    def rpc_url(self) -> str:
        return self.anvil.rpc_url


def default_recipients(anvil: Anvil) -> tuple[ChecksumAddress, ...]:
    return tuple(anvil.accounts[index].address for index in DEFAULT_RECIPIENT_INDEXES)


def parse_recipients(values: Sequence[str]) -> tuple[ChecksumAddress, ...]:
    """Checksummed, de-duplicated recipients in the given order; ValueError on a bad address."""
    found: list[ChecksumAddress] = []
    for value in values:
        if not is_address(value):
            raise ValueError(f"not an address: {value!r}")
        address = to_checksum_address(value)
        if address not in found:
            found.append(address)
    return tuple(found)


def start_devchain(port: int | None = DEFAULT_PORT, recipients: Sequence[str] = ()) -> DevChain:
    """Start Anvil (a free port if `port` is None) and deploy the double; the caller stops
    `devchain.anvil`. With no recipients, Anvil's accounts 1–3 are used."""
    chosen = parse_recipients(recipients)
    anvil = Anvil(port).start()
    try:
        w3 = connect(anvil.rpc_url)
        payer = anvil.accounts[PAYER_INDEX]
        members = chosen or default_recipients(anvil)
        broker = deploy_ticket_broker_double(w3, payer, members)
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, broker_address=broker.address, payer=payer, recipients=members)


def describe(devchain: DevChain) -> str:
    """What `payments devchain` prints: comments, then VAR=value lines a shell can source."""
    lines = [
        f"# payments devchain: Anvil on {devchain.rpc_url}, TicketBroker double deployed,",
        f"# round {DEV_ROUND} initialized; registered, active recipients:",
        *(f"#   {recipient}" for recipient in devchain.recipients),
        f"# {ENV_PRIVATE_KEY} below pays gas and funds the deposit ({devchain.payer.address}).",
        f"# {DEV_KEY_WARNING}",
        f"{ENV_RPC_URL}={devchain.rpc_url}",
        f"{ENV_CHAIN_ID}={DEFAULT_CHAIN_ID}",
        f"{ENV_TICKET_BROKER}={devchain.broker_address}",
        f"{ENV_PRIVATE_KEY}={devchain.payer.private_key}",
        "# running; Ctrl-C or SIGTERM stops Anvil",
    ]
    return "\n".join(lines)


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs; the old handlers come back after."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, request_stop) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_devchain(
    port: int = DEFAULT_PORT, recipients: Sequence[str] = (), out: TextIO = sys.stdout
) -> int:
    """`payments devchain`: start, print, run until Ctrl-C/SIGTERM, stop Anvil. Exit code 0 on
    a requested stop, 1 if Anvil could not start or died, 2 for a bad recipient."""
    try:
        chosen = parse_recipients(recipients)
    except ValueError as error:
        print(f"devchain: {error}", file=sys.stderr)
        return 2
    with stop_requests() as stop:
        try:
            devchain = start_devchain(port, chosen)
        except (AnvilError, ToolMissing) as error:
            print(f"devchain: {error}", file=sys.stderr)
            return 1
        try:
            print(describe(devchain), file=out, flush=True)
            return _wait(devchain.anvil, stop)
        finally:
            devchain.anvil.stop()


def _wait(anvil: Anvil, stop: threading.Event) -> int:
    while not stop.wait(ALIVE_POLL_S):
        # Ctrl-C in a terminal reaches Anvil too (same process group): a stop request that
        # arrives with its exit is still a clean stop.
        if not anvil.running() and not stop.wait(ALIVE_POLL_S):
            print("devchain: anvil exited", file=sys.stderr)
            return 1
    return 0
