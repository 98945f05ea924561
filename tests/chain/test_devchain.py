"""`payments devchain` as a user runs it: a subprocess that prints what to connect to, serves a
working TicketBroker double, and stops Anvil on SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from shared.chain.devchain import (
    DEV_KEY_WARNING,
    ENV_PRIVATE_KEY,
    ENV_RPC_URL,
    ENV_TICKET_BROKER,
    parse_recipients,
)
from shared.chain.devtools import PROJECT_ROOT, dev_accounts, rpc_request
from shared.chain.ticket_broker import TicketBrokerClient
from shared.chain.tickets import create_signed_ticket
from shared.cli import main as cli_main
from shared.embedded_nats import free_port
from tests.chain.ticket_helpers import ETH

# Python's imports and, without a cached artifact, solcjs; generous for a loaded machine.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
LAST_LINE_PREFIX = "# running"


def child_pids(pid: int) -> set[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def read_banner(process: subprocess.Popen[str]) -> list[str]:
    """stdout lines up to the "# running" line; fails with stderr if the process exits first.
    A thread reads (a buffered readline does not mix with select on the pipe)."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith(LAST_LINE_PREFIX):
            return seen
    process.terminate()
    process.wait(STOP_TIMEOUT_S)
    assert process.stderr is not None
    pytest.fail(f"devchain did not start; stdout {seen!r}, stderr:\n{process.stderr.read()}")


@pytest.fixture
def devchain_port() -> int:
    return free_port()


@pytest.fixture
def devchain(devchain_port: int) -> Iterator[subprocess.Popen[str]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAYMENT")}
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "devchain", "--port", str(devchain_port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:  # SIGTERM first, so Anvil is stopped too
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_devchain_prints_a_working_chain_and_stops_anvil_on_sigterm(
    devchain: subprocess.Popen[str], devchain_port: int
) -> None:
    lines = read_banner(devchain)
    values = dict(line.split("=", 1) for line in lines if "=" in line and line[0] != "#")
    rpc_url = values[ENV_RPC_URL]
    assert rpc_url == f"http://127.0.0.1:{devchain_port}"
    assert any(DEV_KEY_WARNING in line for line in lines)
    payer = dev_accounts()[0]
    assert values[ENV_PRIVATE_KEY] == payer.private_key
    for account in dev_accounts()[1:4]:  # the default recipients
        assert any(line == f"#   {account.address}" for line in lines)
    anvil_pids = child_pids(devchain.pid)
    assert anvil_pids, "anvil is not a child of the devchain process"

    # The printed key funds a deposit and pays a default recipient through the printed broker.
    client = TicketBrokerClient.connect(rpc_url, values[ENV_TICKET_BROKER])
    key = values[ENV_PRIVATE_KEY]
    sender = Account.from_key(key).address
    assert (await client.fund_deposit(key, ETH))["status"] == 1
    assert (await client.sender_info(sender)).deposit_wei == ETH
    recipient = dev_accounts()[1].address
    assert await client.is_active_transcoder(recipient)
    ticket = create_signed_ticket(recipient, ETH // 2, await client.aux_data(), key)
    assert (await client.redeem(key, ticket)).paid == {ticket.hash: ETH // 2}

    devchain.send_signal(signal.SIGTERM)
    assert devchain.wait(STOP_TIMEOUT_S) == 0
    for pid in anvil_pids:
        assert not Path(f"/proc/{pid}").exists(), f"anvil (pid {pid}) outlived the devchain"
    with pytest.raises(OSError):
        rpc_request(rpc_url, "eth_chainId", timeout_s=1.0)


def test_recipients_are_checked_and_deduplicated() -> None:
    first, second = (account.address for account in dev_accounts()[4:6])
    assert parse_recipients([first.lower(), second, first]) == (first, second)
    with pytest.raises(ValueError, match="not an address"):
        parse_recipients(["0x1234"])


def test_a_bad_recipient_flag_exits_2_before_starting_anvil(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["devchain", "--port", "1", "--recipient", "nope"]) == 2
    assert "not an address" in capsys.readouterr().err
