"""The api's NATS connection keeps the same subscriptions however many events it stores.

An event stored on its own (a group commit's lot of one: one request at a time, or a gap in the
load) goes through the one-by-one publisher. That publisher once made a JetStreamContext per
call, and each context subscribed its own reply inbox and never unsubscribed it: a subscription,
its task and its queue left in the api process (and a subscription in nats-server) per lot of
one, about 95 B of the api's RSS per accepted request under wrk. Counted here from the server's
side (the monitoring port's /connz), against the real api process.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import PUBLIC_IP
from tests.e2e import Stack

pytestmark = pytest.mark.asyncio(loop_scope="package")

EVENTS = 40


async def api_subscriptions(stack: Stack) -> int:
    """Subscriptions the server holds for the api processes' connections (all named alike)."""
    url = f"http://127.0.0.1:{stack.nats.monitor_port}/connz?limit=1024"
    async with stack.http.get(url) as answer:
        connz = await answer.json()
    return sum(
        int(c["subscriptions"]) for c in connz["connections"] if c.get("name") == "payments-api"
    )


async def test_events_stored_one_at_a_time_leave_no_subscription_behind(stack: Stack) -> None:
    before = await api_subscriptions(stack)
    for number in range(EVENTS):  # one at a time: every event is a lot of one
        body = {
            "session_id": f"subscriptions-{number}",
            "upstream_addr": PUBLIC_IP,
            "upstream_port": 443,
            "event": "heartbeat",
            "event_id": f"subscriptions-{number}",
        }
        async with stack.http.post(f"{stack.base}/api/sessions/events", json=body) as answer:
            assert answer.status == 202, await answer.text()
    # At most the one-by-one publisher's reply inbox, once for the connection's lifetime.
    assert await api_subscriptions(stack) - before <= 1
