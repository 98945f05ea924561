"""scripts/livepeer_ticket_demo.py as a user runs it: a subprocess against Anvil with the
TicketBroker double, the key passed through the environment (or a key file). Every run is
checked for the key in its output."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from eth_typing import HexStr
from web3.logs import DISCARD
from web3.types import TxReceipt

from shared.chain.devtools import DEFAULT_CHAIN_ID, PROJECT_ROOT, Anvil, transact
from tests.chain.ticket_helpers import ETH, BrokerDouble, deploy_double

SCRIPT = PROJECT_ROOT / "scripts" / "livepeer_ticket_demo.py"
DEMO_MODULE = "livepeer_ticket_demo"
RUN_TIMEOUT_S = 60.0
ARBITRUM_CHAIN_ID = 42161
ENV_PREFIXES = ("PAYMENT", "ETH_")
REDEMPTION_TX = re.compile(r"^redemption \(.*\): tx (0x[0-9a-f]{64})$", re.MULTILINE)
BATCH_SELECTOR = bytes.fromhex("d01b808e")


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def double(anvil: Anvil) -> BrokerDouble:
    return deploy_double(anvil)


def demo_env(double: BrokerDouble, **overrides: str | None) -> dict[str, str]:
    """The process environment without the caller's chain settings, plus the double's; an
    override of None removes the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env.update(
        ETH_RPC_URL=double.rpc_url,
        ETH_CHAIN_ID=str(DEFAULT_CHAIN_ID),
        PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS=double.address,
        PAYMENT_PRIVATE_KEY=double.payer_key,
    )
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Make os.environ equal to `env` for the test (an in-process run)."""
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def start(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(double: BrokerDouble, process: subprocess.Popen[str]) -> Run:
    stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    run = Run(process.returncode, stdout, stderr)
    key_hex = double.payer_key.removeprefix("0x").lower()
    assert key_hex not in run.output.lower(), "the private key was printed"
    return run


def run_demo(double: BrokerDouble, *args: str, **env: str | None) -> Run:
    return finish(double, start(args, demo_env(double, **env)))


def redemption_receipt(double: BrokerDouble, run: Run) -> TxReceipt:
    found = REDEMPTION_TX.search(run.stdout)
    assert found, run.output
    return double.w3.eth.get_transaction_receipt(HexStr(found.group(1)))


def transfers(double: BrokerDouble, receipt: TxReceipt) -> list[tuple[str, int]]:
    """(recipient, amount) of each WinningTicketTransfer in the receipt."""
    events = double.contract.events.WinningTicketTransfer().process_receipt(receipt, DISCARD)
    return [(e["args"]["recipient"], e["args"]["amount"]) for e in events]


def fund(double: BrokerDouble, wei: int) -> None:
    transact(double.w3, double.owner, double.contract.functions.fundDeposit(), value_wei=wei)


def sent_so_far(double: BrokerDouble) -> tuple[int, int]:
    """The payer's nonce and the block number: both unchanged means nothing was sent."""
    return double.w3.eth.get_transaction_count(double.owner.address), double.w3.eth.block_number


# -- paying ---------------------------------------------------------------------------------------


def test_a_single_payout_funds_the_deposit_and_pays_the_face_value(double: BrokerDouble) -> None:
    recipient = double.recipients[0]
    assert double.deposit() == 0

    run = run_demo(
        double,
        *("--recipient", recipient.lower(), "--amount-eth", "0.1"),
        *("--fund-deposit-eth", "0.25", "--wait"),
    )

    assert run.returncode == 0, run.output
    assert "deposit 0 ETH, reserve 0 ETH" in run.stdout
    assert "deposit 0.25 ETH, reserve 0 ETH" in run.stdout
    receipt = redemption_receipt(double, run)
    assert receipt["status"] == 1
    assert f"block {receipt['blockNumber']}, status 1" in run.stdout
    assert transfers(double, receipt) == [(recipient, ETH // 10)]
    assert double.credited(recipient) == ETH // 10
    assert double.deposit() == ETH * 15 // 100
    assert f"to {recipient}: face value 0.1 ETH, redeemed, paid 0.1 ETH" in run.stdout


def test_a_batch_of_two_pays_both(double: BrokerDouble, tmp_path: Path) -> None:
    fund(double, ETH)
    first, second = double.recipients[:2]
    payouts = tmp_path / "payouts.json"
    # A JSON number and a string: neither goes through a float.
    payouts.write_text(
        f'[{{"recipient": "{first}", "amount_eth": 0.1}},'
        f' {{"recipient": "{second}", "amount_eth": "0.05"}}]'
    )
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps({"private_key": double.payer_key}))

    run = run_demo(
        double,
        *("--batch-payouts-json", str(payouts), "--private-key-file", str(key_file), "--wait"),
        PAYMENT_PRIVATE_KEY=None,
    )

    assert run.returncode == 0, run.output
    receipt = redemption_receipt(double, run)
    assert receipt["status"] == 1
    sent = double.w3.eth.get_transaction(receipt["transactionHash"])
    assert bytes(sent["input"])[:4] == BATCH_SELECTOR
    assert transfers(double, receipt) == [(first, ETH // 10), (second, ETH // 20)]
    assert (double.credited(first), double.credited(second)) == (ETH // 10, ETH // 20)
    assert double.deposit() == ETH - ETH // 10 - ETH // 20
    assert run.stdout.count("redeemed, paid") == 2


def test_a_failed_ticket_in_a_batch_is_reported_and_exits_1(
    double: BrokerDouble,
    tmp_path: Path,
    demo_module: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The batch transaction has status 1; only the events show the second ticket failed.
    In-process, to save a subprocess's start-up."""
    fund(double, ETH)
    paid, inactive = double.recipients[0], double.owner.address  # the owner is no transcoder
    payouts = tmp_path / "payouts.json"
    entries = [{"recipient": r, "amount_eth": "0.1"} for r in (paid, inactive)]
    payouts.write_text(json.dumps(entries))
    use_env(monkeypatch, demo_env(double))

    code = demo_module.main(["--batch-payouts-json", str(payouts), "--wait"])

    run = Run(code, *capsys.readouterr())
    assert run.returncode == 1, run.output
    assert redemption_receipt(double, run)["status"] == 1
    assert f"warning: {inactive} is not an active transcoder" in run.stdout
    assert f"to {inactive}: face value 0.1 ETH, NOT redeemed" in run.stdout
    assert f"to {paid}: face value 0.1 ETH, redeemed, paid 0.1 ETH" in run.stdout
    assert double.deposit() == ETH - ETH // 10
    assert double.payer_key[2:] not in run.output


def test_a_dry_run_signs_but_sends_nothing(double: BrokerDouble) -> None:
    before = sent_so_far(double)

    run = run_demo(
        double,
        *("--recipient", double.recipients[0], "--amount-eth", "0.1"),
        *("--fund-deposit-eth", "1", "--dry-run", "--wait"),
    )

    assert run.returncode == 0, run.output
    assert "dry run: nothing was sent" in run.stdout
    assert run.stdout.count("not broadcast (tx 0x") == 2  # the top-up and the redemption
    assert sent_so_far(double) == before
    assert double.deposit() == 0
    assert double.credited(double.recipients[0]) == 0


# -- refusing -------------------------------------------------------------------------------------

BAD_RUNS: list[tuple[list[str], str]] = [
    (["--recipient", "0x1234", "--amount-eth", "0.1"], "not an address"),
    (["--amount-eth", "0"], "must be a positive amount"),
    (["--batch-payouts-json", "{unreadable}"], "not valid JSON"),
    (["--amount-eth", "0.1", "--chain-id", str(ARBITRUM_CHAIN_ID)], "chain id mismatch"),
]


def test_bad_input_exits_2_with_a_message_and_sends_nothing(
    double: BrokerDouble, tmp_path: Path
) -> None:
    fund(double, ETH)
    unreadable = tmp_path / "unreadable.json"
    unreadable.write_text('[{"recipient": ')
    files = {"{unreadable}": str(unreadable)}
    before = sent_so_far(double)

    processes = []
    for args, _ in BAD_RUNS:
        if args[0] == "--amount-eth":
            args = ["--recipient", double.recipients[0], *args]
        argv = [files.get(arg, arg) for arg in args]
        processes.append(start(argv, demo_env(double)))  # all at once: ~1 s of imports each
    runs = [finish(double, process) for process in processes]

    for (args, message), run in zip(BAD_RUNS, runs, strict=True):
        assert run.returncode == 2, (args, run.output)
        assert message in run.stderr, (args, run.stderr)
        assert "tx 0x" not in run.stdout, args
    assert sent_so_far(double) == before
    assert double.deposit() == ETH


# In-process, for the cases refused before any connection (each subprocess costs ~1 s).
SOME_ADDRESS = "0x" + "11" * 20
SOME_KEY = "0x" + "ab" * 32
ONE = ["--recipient", SOME_ADDRESS]
MORE_BAD_ARGS: list[tuple[list[str], dict[str, str], str]] = [
    (["--amount-eth", "0.1"], {}, "give --recipient with --amount-eth"),
    ([], {}, "give --recipient with --amount-eth"),
    (["--recipient", SOME_ADDRESS], {}, "give --recipient with --amount-eth"),
    (
        ["--recipient", "0x70997970c51812dc3a010c7d01b50e0d17dc79C8", "--amount-eth", "1"],
        {},
        "bad checksum",
    ),
    (["--recipient", "0x" + "00" * 20, "--amount-eth", "1"], {}, "zero address"),
    ([*ONE, "--amount-eth", "-1"], {}, "must be a positive amount"),
    ([*ONE, "--amount-eth", "1e-19"], {}, "must be a positive amount"),  # below 1 wei
    ([*ONE, "--amount-eth", "NaN"], {}, "must be finite"),
    ([*ONE, "--amount-eth", "0.1.2"], {}, "not a decimal amount"),
    ([*ONE, "--amount-eth", "1"], {"PAYMENT_PRIVATE_KEY": "0x1234"}, "not a 64-digit hex"),
    (["--batch-payouts-json", "/nonexistent/payouts.json"], {}, "cannot read payouts file"),
    (["--batch-payouts-json", "{empty}"], {}, "non-empty JSON list"),
    (["--batch-payouts-json", "{empty}", *ONE, "--amount-eth", "1"], {}, "not both"),
    (["--batch-payouts-json", "{no_amount}"], {}, '"recipient" and "amount_eth"'),
    (["--batch-payouts-json", "{float_zero}"], {}, "must be a positive amount"),
    ([*ONE, "--amount-eth", "1", "--fund-deposit-eth", "0"], {}, "--fund-deposit-eth must be"),
    ([*ONE, "--amount-eth", "1", "--wait-timeout-seconds", "0"], {}, "must be positive"),
    (
        [*ONE, "--amount-eth", "1", "--private-key", SOME_KEY, "--private-key-file", "k"],
        {},
        "not allowed",
    ),
    ([*ONE, "--amount-eth", "1", "--private-key-file", "{no_key}"], {}, 'no "private_key"'),
    ([*ONE, "--amount-eth", "1"], {"PAYMENT_PRIVATE_KEY_FILE": "{no_key}"}, "keep one"),
    ([*ONE, "--amount-eth", "1"], {"PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS": ""}, "required"),
]


@pytest.fixture(scope="module")
def demo_module() -> Iterator[ModuleType]:
    """The script imported as a module (registered while loading: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(DEMO_MODULE, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[DEMO_MODULE] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(DEMO_MODULE, None)


def exit_code(module: ModuleType, argv: list[str]) -> int:
    try:
        return int(module.main(argv))
    except SystemExit as exit_:  # argparse's own refusals
        return int(exit_.code or 0)


@pytest.mark.parametrize(("args", "env", "message"), MORE_BAD_ARGS)
def test_more_bad_input_exits_2_before_connecting(
    demo_module: ModuleType,
    args: list[str],
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    contents = {
        "{empty}": "[]",
        "{no_amount}": json.dumps([{"recipient": SOME_ADDRESS}]),
        "{float_zero}": json.dumps([{"recipient": SOME_ADDRESS, "amount_eth": 0.0}]),
        "{no_key}": json.dumps({"key": SOME_KEY}),
    }
    files = {name: tmp_path / f"{index}.json" for index, name in enumerate(contents)}
    for name, text in contents.items():
        files[name].write_text(text)
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    base |= {
        "PAYMENT_PRIVATE_KEY": SOME_KEY,
        "PAYMENTS_LIVEPEER_TICKET_BROKER_ADDRESS": "0x" + "22" * 20,
        "ETH_RPC_URL": "http://127.0.0.1:1",  # never reached
    }
    use_env(monkeypatch, base | {name: str(files.get(v, v)) for name, v in env.items()})

    assert exit_code(demo_module, [str(files.get(arg, arg)) for arg in args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert SOME_KEY[2:] not in err
