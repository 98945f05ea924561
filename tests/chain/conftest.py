"""Chain fixtures: the compiled pool double (once per session), Anvil, and a deployed double.

solcjs and anvil come from `.tools/` (`make tools`); when they are missing the fixtures raise
ToolMissing, so the tests error out instead of skipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.chain.devtools import (
    Anvil,
    CompiledContract,
    compile_solidity,
    connect,
    deploy_contract,
    solidity_source,
)
from tests.chain.helpers import PoolDouble

POOL_DOUBLE = "BondingManagerPoolDouble"


@pytest.fixture(scope="session")
def pool_double_artifact() -> CompiledContract:
    # solcjs (emscripten) needs about a second per run: compile once per session.
    return compile_solidity(solidity_source(POOL_DOUBLE))


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Anvil]:
    node = Anvil(log_file=tmp_path / "anvil.log").start()
    yield node
    node.stop()


@pytest.fixture
def pool_double(anvil: Anvil, pool_double_artifact: CompiledContract) -> PoolDouble:
    w3 = connect(anvil.rpc_url)
    owner = anvil.accounts[0]
    return PoolDouble(w3, deploy_contract(w3, pool_double_artifact, owner), owner)
