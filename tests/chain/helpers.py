"""Helpers for the chain tests: deterministic orchestrator addresses and the pool double."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract

from shared.chain.devtools import DevAccount, transact


def addresses(label: str, count: int) -> list[ChecksumAddress]:
    """`count` distinct, reproducible addresses (the last 20 bytes of keccak(label-i))."""
    return [
        Web3.to_checksum_address(Web3.keccak(text=f"{label}-{index}")[-20:])
        for index in range(count)
    ]


@dataclass
class PoolDouble:
    """The deployed BondingManagerPoolDouble and its owner."""

    w3: Web3
    contract: Contract
    owner: DevAccount

    @property
    def address(self) -> ChecksumAddress:
        return self.contract.address

    def set_pool(self, members: Sequence[str]) -> None:
        transact(self.w3, self.owner, self.contract.functions.setPool(list(members)))

    def members(self) -> list[str]:
        """The pool as the real BondingManager exposes it: first, then next until address(0)."""
        functions = self.contract.functions
        found: list[str] = []
        current = functions.getFirstTranscoderInPool().call()
        while int(current, 16) != 0:
            found.append(current)
            current = functions.getNextTranscoderInPool(current).call()
        return found
