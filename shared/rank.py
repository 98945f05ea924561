"""Is an address among the top orchestrators? Read from the Livepeer BondingManager pool.

The pool is walked with `getFirstTranscoderInPool` / `getNextTranscoderInPool` (up to
TOP_POOL_SIZE_MAX entries) and cached for TOP_CACHE_TTL_SECONDS. A failed refresh, or one
still running after TOP_REFRESH_WAIT_S, falls back to the stale cache; with nothing cached, the
answer is unknown and registration answers 503.
The original's hosted-subgraph and explorer fallbacks are gone: they were unordered and
arbitrarily truncated (original-behaviour §12 item 11).
"""

from __future__ import annotations

import asyncio
import logging
import time

from web3 import AsyncHTTPProvider, AsyncWeb3

from contracts.commands import COMMAND_TIMEOUT_S

TOP_POOL_SIZE_MAX = 100
RPC_TIMEOUT_S = 10.0
# A caller waits at most this long for a refresh, so a registration can still be published and
# applied within the api's COMMAND_TIMEOUT_S. The web3 provider retries a failed call and each
# call may take RPC_TIMEOUT_S, so a hung node would otherwise hold the caller for about a minute.
# A refresh that takes longer keeps running and fills the cache when it finishes.
TOP_REFRESH_WAIT_S = COMMAND_TIMEOUT_S / 2
ZERO_ADDRESS = "0x" + "00" * 20

POOL_ABI = [
    {
        "inputs": [],
        "name": "getFirstTranscoderInPool",
        "outputs": [{"name": "", "type": "address"}],
        "stateMutability": "view",
        "type": "function",
    },
    {
        "inputs": [{"name": "_transcoder", "type": "address"}],
        "name": "getNextTranscoderInPool",
        "outputs": [{"name": "", "type": "address"}],
        "stateMutability": "view",
        "type": "function",
    },
]

log = logging.getLogger(__name__)


class RankUnknown(Exception):
    """The top set cannot be obtained and nothing is cached."""


class TopOrchestrators:
    def __init__(self, rpc_url: str, contract_address: str | None, ttl_s: float) -> None:
        self.contract_address = contract_address
        self.ttl_s = ttl_s
        self._web3 = AsyncWeb3(
            AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": RPC_TIMEOUT_S})
        )
        self._cached: frozenset[str] | None = None
        self._cached_at = 0.0
        # The one refresh in flight; concurrent callers wait on it together.
        self._refresh: asyncio.Task[frozenset[str]] | None = None

    async def contains(self, address: str) -> bool:
        return address.lower() in await self.top_set()

    async def top_set(self) -> frozenset[str]:
        if self._cached is not None and time.monotonic() - self._cached_at < self.ttl_s:
            return self._cached
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_cache())
        try:
            # shield: a caller giving up does not cancel the refresh.
            return await asyncio.wait_for(asyncio.shield(self._refresh), TOP_REFRESH_WAIT_S)
        except Exception as error:
            reason = str(error) or type(error).__name__
            if self._cached is None:
                raise RankUnknown(reason) from None
            log.warning("rank refresh failed; using the stale top set", extra={"error": reason})
            return self._cached

    async def _refresh_cache(self) -> frozenset[str]:
        members = await self._walk_pool()
        self._cached, self._cached_at = members, time.monotonic()
        return members

    async def _walk_pool(self) -> frozenset[str]:
        if not self.contract_address:
            raise RankUnknown("TOP_CONTRACT_ADDRESS is not set")
        contract = self._web3.eth.contract(
            address=AsyncWeb3.to_checksum_address(self.contract_address), abi=POOL_ABI
        )
        members: list[str] = []
        current = await contract.functions.getFirstTranscoderInPool().call()
        while current and current.lower() != ZERO_ADDRESS and len(members) < TOP_POOL_SIZE_MAX:
            members.append(current.lower())
            current = await contract.functions.getNextTranscoderInPool(current).call()
        return frozenset(members)
