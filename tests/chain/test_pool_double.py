"""The BondingManager pool double: the real contract's selectors, and its pool semantics."""

from __future__ import annotations

import pytest
from eth_utils import function_abi_to_4byte_selector
from web3.exceptions import ContractLogicError

from shared.chain.devtools import CompiledContract, dev_accounts, transact
from shared.rank import POOL_ABI
from tests.chain.helpers import PoolDouble, addresses

ZERO = "0x" + "00" * 20

# Selectors of the real Livepeer BondingManager (from its published ABI).
REAL_SELECTORS = {
    "getFirstTranscoderInPool": "88a6c749",
    "getNextTranscoderInPool": "235c9603",
    "getTranscoderPoolSize": "2a4e0d55",
    "isRegisteredTranscoder": "68ba170c",
    "isActiveTranscoder": "08802374",
}


def selectors(abi: list[dict]) -> dict[str, str]:
    return {
        entry["name"]: function_abi_to_4byte_selector(entry).hex()
        for entry in abi
        if entry["type"] == "function"
    }


def test_double_keeps_the_real_selectors_and_the_abi_rank_uses(
    pool_double_artifact: CompiledContract,
) -> None:
    compiled = selectors(pool_double_artifact.abi)
    assert {name: compiled[name] for name in REAL_SELECTORS} == REAL_SELECTORS
    for entry in POOL_ABI:
        assert selectors([entry])[entry["name"]] == compiled[entry["name"]]
        declared = next(e for e in pool_double_artifact.abi if e.get("name") == entry["name"])
        assert [o["type"] for o in declared["outputs"]] == [o["type"] for o in entry["outputs"]]
        assert declared["stateMutability"] == "view"


def test_pool_views_follow_the_order_set(pool_double: PoolDouble) -> None:
    first, second, third, outsider = addresses("pool", 4)
    functions = pool_double.contract.functions
    assert functions.getFirstTranscoderInPool().call() == ZERO
    assert functions.getTranscoderPoolSize().call() == 0

    pool_double.set_pool([first, second, third])

    assert pool_double.members() == [first, second, third]
    assert functions.getTranscoderPoolSize().call() == 3
    assert functions.getNextTranscoderInPool(third).call() == ZERO
    assert functions.getNextTranscoderInPool(outsider).call() == ZERO
    assert functions.isRegisteredTranscoder(second).call() is True
    assert functions.isActiveTranscoder(second).call() is True
    assert functions.isRegisteredTranscoder(outsider).call() is False
    assert functions.isActiveTranscoder(outsider).call() is False


def test_set_pool_replaces_the_previous_pool(pool_double: PoolDouble) -> None:
    old = addresses("old", 3)
    new = addresses("new", 2)
    pool_double.set_pool(old)
    pool_double.set_pool([new[1], old[0], new[0]])

    functions = pool_double.contract.functions
    assert pool_double.members() == [new[1], old[0], new[0]]
    assert functions.getTranscoderPoolSize().call() == 3
    assert functions.isActiveTranscoder(old[1]).call() is False
    assert functions.getNextTranscoderInPool(old[1]).call() == ZERO

    pool_double.set_pool([])
    assert pool_double.members() == []
    assert functions.isActiveTranscoder(old[0]).call() is False


@pytest.mark.parametrize(
    ("pool", "reason"),
    [
        (["dup", "dup"], "transcoder listed twice"),
        (["zero"], "transcoder is null address"),
    ],
)
def test_set_pool_rejects_entries_that_would_break_the_list(
    pool_double: PoolDouble, pool: list[str], reason: str
) -> None:
    (member,) = addresses("member", 1)
    named = {"dup": member, "zero": ZERO}
    with pytest.raises(ContractLogicError, match=reason):
        pool_double.set_pool([named[name] for name in pool])


def test_only_the_owner_sets_the_pool(pool_double: PoolDouble) -> None:
    stranger = dev_accounts()[1]
    assert stranger != pool_double.owner
    call = pool_double.contract.functions.setPool(addresses("x", 1))
    with pytest.raises(ContractLogicError, match="caller is not the owner"):
        transact(pool_double.w3, stranger, call)
    assert pool_double.members() == []
