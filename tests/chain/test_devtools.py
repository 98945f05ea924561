"""The toolchain itself: loud failures when tools are missing, compile errors, Anvil's accounts
and start-up."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.chain import devtools
from shared.chain.devtools import (
    Anvil,
    AnvilError,
    CompileError,
    ToolMissing,
    compile_solidity,
    connect,
)

# Anvil's well-known first account for the default mnemonic.
FIRST_ACCOUNT = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
FIRST_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def test_the_project_tools_are_installed() -> None:
    assert devtools.solcjs_path().is_file()
    assert devtools.anvil_path().is_file()


def test_missing_tools_fail_loudly_naming_make_tools(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing, match="make tools"):
        devtools.solcjs_path(tmp_path)
    with pytest.raises(ToolMissing, match="make tools"):
        devtools.anvil_path(tmp_path)
    with pytest.raises(ToolMissing, match="anvil not found"):
        Anvil(project_root=tmp_path).start()
    source = tmp_path / "Empty.sol"
    source.write_text("pragma solidity ^0.8.0;\ncontract Empty {}\n")
    with pytest.raises(ToolMissing, match="solcjs"):
        compile_solidity(source, project_root=tmp_path)


def test_compile_errors_carry_the_compiler_message(tmp_path: Path) -> None:
    source = tmp_path / "Broken.sol"
    source.write_text("pragma solidity ^0.8.0;\ncontract Broken { function f() public { y = 1; } }")
    with pytest.raises(CompileError, match="Undeclared identifier"):
        compile_solidity(source)


def test_compiling_picks_the_named_contract(tmp_path: Path) -> None:
    source = tmp_path / "Two.sol"
    source.write_text(
        "// SPDX-License-Identifier: MIT\npragma solidity ^0.8.0;\n"
        "contract Two { function two() external pure returns (uint256) { return 2; } }\n"
        "contract Other { function other() external {} }\n"
    )
    abi, bytecode = compile_solidity(source)
    assert [entry["name"] for entry in abi] == ["two"]
    assert bytecode.startswith("0x") and len(bytecode) > 2
    assert [entry["name"] for entry in compile_solidity(source, "Other").abi] == ["other"]
    with pytest.raises(CompileError, match="no 'Missing'"):
        compile_solidity(source, "Missing")


def test_anvil_accounts_are_deterministic_and_funded(anvil: Anvil) -> None:
    assert anvil.rpc_url.startswith("http://127.0.0.1:")
    assert anvil.accounts[0].address == FIRST_ACCOUNT
    assert anvil.accounts[0].private_key == FIRST_KEY
    w3 = connect(anvil.rpc_url)
    assert w3.eth.chain_id == devtools.DEFAULT_CHAIN_ID
    assert w3.eth.accounts == [a.address for a in anvil.accounts]
    assert w3.eth.get_balance(FIRST_ACCOUNT) == w3.to_wei(devtools.DEFAULT_BALANCE_ETH, "ether")


def test_anvil_on_a_taken_port_fails_with_its_output(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        node = Anvil(port, log_file=tmp_path / "anvil.log")
        with pytest.raises(AnvilError, match="exited during start-up"):
            node.start()
        assert not node.running()


def test_anvil_pause_freezes_and_resume_thaws(anvil: Anvil) -> None:
    anvil.pause()
    with pytest.raises(OSError):  # connected, but nothing answers
        devtools.rpc_request(anvil.rpc_url, "eth_chainId", timeout_s=0.5)
    anvil.resume()
    assert int(anvil.rpc("eth_chainId"), 16) == devtools.DEFAULT_CHAIN_ID
    anvil.pause()
    anvil.stop()  # stops a paused node too
    assert not anvil.running()
