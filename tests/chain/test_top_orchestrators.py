"""TopOrchestrators against the BondingManager pool double on Anvil: membership, the 100-entry
cap, the cache, the stale fallback and RankUnknown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest

from shared.chain.devtools import Anvil
from shared.rank import TOP_POOL_SIZE_MAX, TOP_REFRESH_WAIT_S, RankUnknown, TopOrchestrators
from tests.chain.helpers import PoolDouble, addresses

LONG_TTL_S = 300.0
SHORT_TTL_S = 0.2
STALE_LOG = "rank refresh failed; using the stale top set"
WAIT_SLACK_S = 1.0

MakeTop = Callable[..., TopOrchestrators]


@pytest.fixture
async def make_top() -> AsyncIterator[MakeTop]:
    made: list[TopOrchestrators] = []

    def make(rpc_url: str, contract: str | None, ttl_s: float = LONG_TTL_S) -> TopOrchestrators:
        top = TopOrchestrators(rpc_url, contract, ttl_s)
        made.append(top)
        return top

    yield make
    for top in made:
        await top._web3.provider.disconnect()  # close its aiohttp session


async def test_members_are_top_and_others_are_not(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    members = addresses("top", 3)
    (outsider,) = addresses("outsider", 1)
    pool_double.set_pool(members)
    top = make_top(anvil.rpc_url, pool_double.address)

    assert await top.top_set() == frozenset(m.lower() for m in members)
    for member in members:
        assert await top.contains(member) is True
        assert await top.contains(member.lower()) is True
        assert await top.contains("0x" + member[2:].upper()) is True
    assert await top.contains(outsider) is False


async def test_an_empty_pool_is_an_empty_top_set_not_unknown(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    top = make_top(anvil.rpc_url, pool_double.address)
    assert await top.top_set() == frozenset()
    assert await top.contains(addresses("any", 1)[0]) is False


async def test_a_pool_longer_than_the_maximum_stops_at_the_maximum(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    pool = addresses("big", TOP_POOL_SIZE_MAX + 30)
    pool_double.set_pool(pool)
    assert pool_double.contract.functions.getTranscoderPoolSize().call() == len(pool)
    top = make_top(anvil.rpc_url, pool_double.address)

    found = await top.top_set()

    assert len(found) == TOP_POOL_SIZE_MAX == 100
    assert found == frozenset(a.lower() for a in pool[:TOP_POOL_SIZE_MAX])
    assert await top.contains(pool[TOP_POOL_SIZE_MAX - 1]) is True
    assert await top.contains(pool[TOP_POOL_SIZE_MAX]) is False
    assert await top.contains(pool[-1]) is False


async def test_the_set_is_cached_for_the_ttl_then_refreshed(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    before, after = addresses("before", 2), addresses("after", 2)
    pool_double.set_pool(before)
    top = make_top(anvil.rpc_url, pool_double.address, ttl_s=SHORT_TTL_S)
    assert await top.contains(before[0]) is True

    pool_double.set_pool(after)
    assert await top.contains(after[0]) is False  # still the cached set
    await asyncio.sleep(SHORT_TTL_S * 1.5)
    assert await top.contains(after[0]) is True
    assert await top.contains(before[0]) is False


async def test_a_fresh_cache_answers_without_the_node(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    members = addresses("top", 2)
    pool_double.set_pool(members)
    top = make_top(anvil.rpc_url, pool_double.address)
    await top.top_set()

    anvil.stop()

    assert await top.contains(members[1]) is True
    assert await top.contains(addresses("outsider", 1)[0]) is False


async def test_a_stale_cache_answers_when_the_refresh_fails(
    pool_double: PoolDouble,
    anvil: Anvil,
    make_top: MakeTop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    members = addresses("top", 2)
    pool_double.set_pool(members)
    top = make_top(anvil.rpc_url, pool_double.address, ttl_s=SHORT_TTL_S)
    warm = await top.top_set()

    anvil.stop()
    await asyncio.sleep(SHORT_TTL_S * 1.5)
    with caplog.at_level(logging.WARNING, logger="shared.rank"):
        stale = await top.top_set()  # each call past the TTL retries the node (~2 s here)
    assert STALE_LOG in caplog.messages  # a refresh really was attempted, and failed
    assert stale == warm
    assert members[0].lower() in stale
    assert addresses("outsider", 1)[0].lower() not in stale


async def test_rank_is_unknown_with_the_node_down_and_nothing_cached(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    pool_double.set_pool(addresses("top", 2))
    top = make_top(anvil.rpc_url, pool_double.address)
    anvil.stop()

    with pytest.raises(RankUnknown):
        await top.contains(addresses("top", 1)[0])
    with pytest.raises(RankUnknown):  # still unknown: a failure is never cached
        await top.top_set()


async def test_rank_is_unknown_without_a_contract_or_with_no_code_there(
    anvil: Anvil, make_top: MakeTop
) -> None:
    with pytest.raises(RankUnknown, match="TOP_CONTRACT_ADDRESS is not set"):
        await make_top(anvil.rpc_url, None).top_set()
    # A misconfigured address (no contract there) is unknown, never an empty top set.
    with pytest.raises(RankUnknown):
        await make_top(anvil.rpc_url, addresses("no-code", 1)[0]).top_set()


async def test_a_hung_node_falls_back_to_the_stale_cache_within_the_refresh_wait(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    before, after = addresses("before", 2), addresses("after", 2)
    pool_double.set_pool(before)
    top = make_top(anvil.rpc_url, pool_double.address, ttl_s=SHORT_TTL_S)
    warm = await top.top_set()
    pool_double.set_pool(after)

    anvil.pause()  # accepts connections, never answers
    await asyncio.sleep(SHORT_TTL_S * 1.5)
    started = time.monotonic()
    stale = await top.top_set()
    assert time.monotonic() - started < TOP_REFRESH_WAIT_S + WAIT_SLACK_S
    assert stale == warm

    # The refresh was not abandoned: once the node answers, it lands in the cache.
    anvil.resume()
    deadline = time.monotonic() + TOP_REFRESH_WAIT_S
    while await top.contains(after[0]) is False and time.monotonic() < deadline:
        await asyncio.sleep(SHORT_TTL_S)
    assert await top.contains(after[0]) is True


async def test_a_hung_node_with_nothing_cached_is_unknown_within_the_refresh_wait(
    pool_double: PoolDouble, anvil: Anvil, make_top: MakeTop
) -> None:
    pool_double.set_pool(addresses("top", 2))
    top = make_top(anvil.rpc_url, pool_double.address)
    anvil.pause()

    started = time.monotonic()
    with pytest.raises(RankUnknown):
        await top.top_set()
    assert time.monotonic() - started < TOP_REFRESH_WAIT_S + WAIT_SLACK_S
    anvil.resume()
