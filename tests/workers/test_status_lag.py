"""`payments status` and the workers' /metrics while a worker role is stopped under load.

Real processes: nats-server, the registry and ledger workers and the api. The ledger worker is
stopped while workloads keep arriving over HTTP: `payments status` shows the `ledger-workloads`
consumer lagging (exactly the workloads sent once they are all stored), and so does the
registry worker's /metrics, polled from the server. The ledger worker started again catches up:
the lag is back to zero, and its event-delay histogram saw messages older than the time it was
down. A poison message then shows that a worker's log line about an event carries the event's
key and stream sequence.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
from prometheus_client.parser import text_string_to_metric_families

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, WORKLOADS
from shared.embedded_nats import free_port
from shared.status import gather
from tests.ledger_stack import (
    LedgerStack,
    call,
    ledger_stack,
    orchestrator,
    processed_count,
    run_payments,
    wait_until,
)

ORCHESTRATORS = [orchestrator("orch-s0", "d"), orchestrator("orch-s1", "e")]
DURABLE = LEDGER_WORKLOADS_CONSUMER.durable
MIN_SENT_WHILE_STOPPED = 100
SENDERS = 6
POLL_S = "0.5"


def samples(port: int, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def gauge(port: int, name: str, **labels: str) -> float | None:
    found = samples(port, name, **labels)
    return found[0][1] if found else None


async def status(stack: LedgerStack) -> dict[str, Any]:
    """What `payments status --json` prints, as the operator runs it."""
    answer = await run_payments(stack.env, "status", "--json")
    assert answer.code == 0, answer.stdout + answer.stderr[-2000:]
    document: dict[str, Any] = json.loads(answer.stdout)
    return document


async def quick_lag(stack: LedgerStack) -> int:
    """The same numbers in-process, for polling loops (a CLI process per poll is slow)."""
    return ledger_lag(json.loads((await gather(stack.js)).to_json()))


def ledger_lag(document: dict[str, Any]) -> int:
    (found,) = [c for c in document["consumers"] if c["consumer"] == DURABLE]
    assert found["lag"] == found["pending"] + found["ack_pending"]
    return int(found["lag"])


def workload(n: int) -> dict[str, Any]:
    return {
        "workload_id": f"lag-{n}",
        "orchestrator_id": ORCHESTRATORS[n % 2]["orchestrator_id"],
        "duration_ms": 60_000,
        "artifact_uri": f"/out/lag-{n}.webm",
    }


async def send(stack: LedgerStack, numbers: list[int]) -> None:
    for n in numbers:
        answer = await call(
            stack.http, "POST", f"{stack.base}/api/workloads/time", json=workload(n)
        )
        assert answer.status == 202, answer


async def load_until(stack: LedgerStack, stop: asyncio.Event, first: int) -> int:
    """SENDERS concurrent senders until `stop`; how many workloads were stored."""
    sent = 0

    async def sender(index: int) -> None:
        nonlocal sent
        n = first + index
        while not stop.is_set():
            await send(stack, [n])
            sent += 1
            n += SENDERS

    await asyncio.gather(*(sender(i) for i in range(SENDERS)))
    return sent


async def test_status_shows_the_lag_of_a_stopped_role_and_zero_after_it_catches_up(
    tmp_path: Path,
) -> None:
    registry_port, ledger_port = free_port(), free_port()
    async with ledger_stack(
        "sqlite",
        tmp_path,
        ORCHESTRATORS,
        ledger_env={"PAYMENTS_METRICS_PORT": str(ledger_port)},
        PAYMENTS_METRICS_PORT=str(registry_port),
        PAYMENTS_CONSUMER_LAG_POLL_SECONDS=POLL_S,
    ) as stack:
        await send(stack, list(range(10)))

        async def credited(count: int) -> bool:
            return await processed_count(stack.sessions, "workload_time:") == count

        await wait_until(lambda: credited(10), 30.0, stack)
        assert await quick_lag(stack) == 0

        # Stop the role, and keep the load coming.
        (ledger,) = stack.ledger
        assert ledger.terminate() == 0
        stopped_at = time.monotonic()
        stop = asyncio.Event()
        load = asyncio.create_task(load_until(stack, stop, 10))
        # Under load: the lag is there while the requests keep coming (it only grows while the
        # role is down, so once seen here the CLI must see it too).
        while await quick_lag(stack) == 0:
            await asyncio.sleep(0.05)
        during = await status(stack)
        assert ledger_lag(during) > 0, during
        while await quick_lag(stack) < MIN_SENT_WHILE_STOPPED:
            await asyncio.sleep(0.1)
        stop.set()
        sent = await load
        assert ledger_lag(await status(stack)) == sent
        # The operator's table; `--max-lag` turns the lag into an exit code for alerting.
        text = await run_payments(stack.env, "status", "--max-lag", "10")
        assert text.code == 1, text.stdout + text.stderr
        line = next(x for x in text.stdout.splitlines() if f" {DURABLE} " in x)
        assert line.split()[:3] == [WORKLOADS.name, DURABLE, str(sent)], line
        assert "dead letters waiting: 0" in text.stdout
        assert any(
            x.startswith(f"{WORKLOADS.name} ") and "MESSAGES" not in x
            for x in text.stdout.splitlines()
        )

        # The registry worker's /metrics shows the stopped role's lag too.
        async def registry_sees(value: int) -> bool:
            seen = await asyncio.to_thread(
                gauge,
                registry_port,
                "payments_consumer_pending_messages",
                stream=WORKLOADS.name,
                consumer=DURABLE,
            )
            return seen == value

        await wait_until(lambda: registry_sees(sent), 10.0, stack)
        down_s = time.monotonic() - stopped_at

        # Start it again: it catches up and the lag is zero.
        await stack.start_ledger(1, PAYMENTS_METRICS_PORT=str(ledger_port))
        await wait_until(lambda: credited(10 + sent), 60.0, stack)

        async def caught_up() -> bool:
            return await quick_lag(stack) == 0

        await wait_until(caught_up, 30.0, stack)
        assert ledger_lag(await status(stack)) == 0
        await wait_until(lambda: registry_sees(0), 10.0, stack)
        # The restarted worker saw how old the waiting messages were.
        delays = dict(
            (labels.get("le"), value)
            for labels, value in await asyncio.to_thread(
                samples, ledger_port, "payments_event_delay_seconds_bucket", consumer=DURABLE
            )
        )
        total = await asyncio.to_thread(
            samples, ledger_port, "payments_event_delay_seconds_count", consumer=DURABLE
        )
        assert total and total[0][1] > 0
        fast = max(
            (v for le, v in delays.items() if le and le != "+Inf" and float(le) < down_s / 2)
        )
        assert fast < total[0][1], (delays, down_s)

        # A poison message: the worker's log line names its event key and stream sequence.
        ingress = await nats.connect(
            stack.nats.url, user="ingress", password=stack.nats.passwords.ingress
        )
        try:
            ack = await ingress.jetstream().publish(
                "workloads.time.orch-s0",
                b'{"not": "a workload"}',
                stream=WORKLOADS.name,
                headers={
                    EVENT_KEY_HEADER: "poison-key-1",
                    MSG_ID_HEADER: "poison-key-1",
                    SCHEMA_HEADER: "workloads.time.v1",
                },
            )
        finally:
            await ingress.close()
        restarted = stack.ledger[-1]

        async def logged() -> dict[str, Any] | None:
            for raw in restarted.log_text().splitlines():
                if raw.startswith("{") and '"dead-lettered"' in raw:
                    record: dict[str, Any] = json.loads(raw)
                    return record
            return None

        record = await wait_until(logged, 15.0, stack)
        assert record["event_key"] == "poison-key-1"
        assert record["stream_seq"] == ack.seq
        assert record["consumer"] == DURABLE and record["role"] == "ledger"
        assert "not a workload" not in json.dumps(record), "a body reached a log line"
        dead = await asyncio.to_thread(
            samples, ledger_port, "payments_dead_letters_total", consumer=DURABLE
        )
        assert dead and dead[0][1] >= 1
