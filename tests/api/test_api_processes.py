"""Several api processes on one host: with PAYMENTS_API_REUSE_PORT they share the port and every
request is stored; without it a second process on a taken port exits instead of sharing it."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import pytest

from tests.api.conftest import PUBLIC_IP
from tests.e2e import Stack
from tests.harness import Process, free_port, listening_on, start_api

pytestmark = pytest.mark.asyncio(loop_scope="package")

REQUESTS = 60
EXIT_TIMEOUT_S = 20.0


async def stored(stack: Stack, stream: str) -> int:
    return int((await stack.js.stream_info(stream)).state.messages)


async def post_session_start(base: str, number: int) -> int:
    # A connection per request, so the kernel spreads them over the processes.
    body = {
        "session_id": f"reuse-port-{number}",
        "upstream_addr": PUBLIC_IP,
        "upstream_port": 443,
        "event": "start",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/api/sessions/events", json=body) as answer,
    ):
        return answer.status


async def test_api_processes_share_a_port_with_reuse_port(stack: Stack) -> None:
    port = free_port()
    env = {**stack.env, "PAYMENTS_API_REUSE_PORT": "true"}
    first, base = start_api(env, stack.tmp, port=port)
    second, _ = start_api(env, stack.tmp, port=port)
    try:
        before = await stored(stack, "SESSIONS")
        statuses = await asyncio.gather(*(post_session_start(base, n) for n in range(REQUESTS)))
        assert statuses == [202] * REQUESTS
        assert await stored(stack, "SESSIONS") - before == REQUESTS
        assert first.running() and second.running()
        # Both hold a listening socket on the one port (not: the second one waits its turn).
        assert first.process is not None and second.process is not None
        assert listening_on(first.process.pid, port) and listening_on(second.process.pid, port)
        first.wait_log("start-up objects frozen")
    finally:
        first.terminate()
        second.terminate()


async def test_a_second_api_on_a_taken_port_exits_without_reuse_port(stack: Stack) -> None:
    port = free_port()
    first, _ = start_api(stack.env, stack.tmp, port=port)
    # The bare process: start_api would wait for a /healthz that the first process answers.
    second = Process(
        name="api-taken-port",
        argv=[sys.executable, "-m", "api.app"],
        env={**stack.env, "PAYMENTS_API_PORT": str(port), "PAYMENTS_API_HOST": "127.0.0.1"},
        log_path=stack.tmp / f"api-taken-{port}.log",
    ).start()
    try:
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while second.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not second.running()
        assert "address already in use" in second.log_text().lower()
        assert first.running()
    finally:
        second.terminate()
        first.terminate()
