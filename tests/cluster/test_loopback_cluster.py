"""The scaled-out deployment on loopback: a three-node JetStream cluster (nats-cluster.conf,
streams with 3 replicas), PostgreSQL, two copies of every worker role and two api processes.

A steady load of session events and time workloads goes through HTTP, alternating between the
apis, while the test SIGKILLs the node that leads the SESSIONS stream's raft group, then one copy
of every worker role, then the node that leads the WORKLOADS stream, bringing each back. A
client does what an edge does: a 503 with Retry-After is retried after that pause with the same
idempotency key until it is accepted. Anything else (another status, no answer) is a failure.

Afterwards every accepted event must be stored and applied exactly once:
  - each workload is credited once, with exactly duration_ms x 10**12 wei (0.06 ETH/minute),
    an amount the test computes from what it sent;
  - each session is credited exactly the time between its first and last stored event, in
    segments keyed as the sessions worker keys them, none twice; the stored receive times are
    the ones the apis answered with;
  - balances equal the sum of their entries, nothing is dead-lettered, and every stream ends
    with all three replicas current.

Size: 120 sessions x 8 events and 240 workloads over about 40 s, so the whole test stays near
two minutes on the 2-core machine. `-m cluster` runs it alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from contracts.streams import ALL_STREAMS, LEDGER_WORKLOADS_CONSUMER, SESSIONS, WORKLOADS
from shared.db.models import Balance, DeadLetter, LedgerEntry, ProcessedEvent, Session
from shared.nats_client import JETSTREAM_UNANSWERED
from tests.cluster.cluster_stack import (
    CLUSTER_SIZE,
    ClusterStack,
    cluster_stack,
    restart_worker,
    server_variables,
    stream_leader,
)
from tests.harness import ADMIN_TOKEN, wait_for
from tests.ledger_stack import read_stream
from tests.session_stack import RATE_ETH_PER_MINUTE, WEI_PER_MS, orchestrator, parse_time

SESSION_COUNT = 120
HEARTBEATS = 6
STEPS = ["start", *["heartbeat"] * HEARTBEATS, "end"]
WORKLOAD_COUNT = 240
# A session's events are this far apart, so each session lives through most of the faults.
STEP_INTERVAL_S = 4.0
# Sessions start spread over this long; workloads are spread over the whole load.
START_SPREAD_S = 8.0
WORKLOAD_SPAN_S = 36.0
SEGMENT_S = 10
WORKER_COPIES = 2
API_COPIES = 2
HTTP_CONNECTIONS = 64
HTTP_TIMEOUT_S = 30.0
# Consumers redeliver a killed worker's unacked messages after this (production: 10-30 s).
ACK_WAIT_S = 5.0
FIRST_FAULT_AT_S = 5.0
NODE_DOWN_S = 4.0
WORKER_DOWN_S = 2.0
LEADER_ELECTION_TIMEOUT_S = 30.0
# A client keeps retrying an event this long; past it the api has stopped recovering.
ACCEPT_DEADLINE_S = 60.0
# Pause before retrying after an answer that is not a 503 (only to keep counting; it fails).
RETRY_PAUSE_S = 0.5
SETTLE_TIMEOUT_S = 60.0
REPLICAS_CURRENT_TIMEOUT_S = 30.0
TEST_TIMEOUT_S = 420
ORCHESTRATORS = [
    orchestrator("orch-cl-a", "a", "198.51.100.31"),
    orchestrator("orch-cl-b", "b", "198.51.100.32"),
    orchestrator("orch-cl-c", "c", "198.51.100.33"),
]
SESSION_CONSUMER = "sessions"
WORKLOAD_CONSUMER = LEDGER_WORKLOADS_CONSUMER.durable
CREDIT_REASONS = {"session_time", "workload_time"}

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(TEST_TIMEOUT_S)]


def session_id(index: int) -> str:
    return f"cl-{index:04d}"


def workload_id(index: int) -> str:
    return f"cl-w-{index:04d}"


def owner(index: int) -> dict[str, str]:
    return ORCHESTRATORS[index % len(ORCHESTRATORS)]


def duration_ms(index: int) -> int:
    return 1_000 + 37 * index


@dataclass
class Load:
    """The clients: every request and its answer, counted."""

    bases: list[str]
    http: aiohttp.ClientSession
    sent: int = 0
    attempts: int = 0
    unavailable: int = 0
    problems: list[str] = field(default_factory=list)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def post(
        self, name: str, path: str, body: dict[str, Any], headers: dict[str, str], spread: int
    ) -> dict[str, Any] | None:
        """POST until accepted (2xx); the answer, or None when the deadline passed."""
        self.sent += 1
        deadline = time.monotonic() + ACCEPT_DEADLINE_S
        attempt = 0
        while time.monotonic() < deadline:
            # Consecutive attempts go to different apis, as a load balancer would send them.
            base = self.bases[(spread + attempt) % len(self.bases)]
            attempt += 1
            self.attempts += 1
            try:
                async with self.http.post(base + path, json=body, headers=headers) as answer:
                    status, text = answer.status, await answer.text()
                    retry_after = answer.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as error:
                self.problems.append(f"{name}: no answer from {base}: {type(error).__name__}")
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if 200 <= status < 300:
                found: dict[str, Any] = json.loads(text)
                self.accepted[name] = found
                return found
            if status == 503 and retry_after is not None:
                self.unavailable += 1
                await asyncio.sleep(float(retry_after))
                continue
            self.problems.append(f"{name}: {status} {retry_after=} {text[:200]}")
            await asyncio.sleep(RETRY_PAUSE_S)
        self.problems.append(f"{name}: not accepted within {ACCEPT_DEADLINE_S}s")
        return None

    async def session(self, index: int) -> None:
        await asyncio.sleep(START_SPREAD_S * index / SESSION_COUNT)
        target = owner(index)
        for step, event in enumerate(STEPS):
            if step:
                await asyncio.sleep(STEP_INTERVAL_S)
            body = {
                "session_id": session_id(index),
                "upstream_addr": target["host_public_ip"],
                "upstream_port": 8443,
                "edge_id": f"edge-{index % 5}",
                "event": event,
            }
            key = {"Idempotency-Key": f"{session_id(index)}-{step}"}
            # The next event only after this one is stored: a session's events stay in order.
            if await self.post(
                f"{session_id(index)}/{step}", SESSION_PATH, body, key, index + step
            ):
                continue
            return

    async def workload(self, index: int) -> None:
        await asyncio.sleep(WORKLOAD_SPAN_S * index / WORKLOAD_COUNT)
        body = {
            "workload_id": workload_id(index),
            "orchestrator_id": owner(index)["orchestrator_id"],
            "duration_ms": duration_ms(index),
            "artifact_uri": f"/cluster/{index}.webm",
        }
        await self.post(workload_id(index), WORKLOAD_PATH, body, ADMIN, index)


SESSION_PATH = "/api/sessions/events"
WORKLOAD_PATH = "/api/workloads/time"
ADMIN = {"X-Admin-Token": ADMIN_TOKEN}


async def kill_stream_leader(stack: ClusterStack, stream: str, started: float) -> str:
    """SIGKILL the node leading `stream`'s raft group, wait for another to lead, bring it back."""
    leader = await stream_leader(stack.js, stream)
    stack.cluster.kill(leader)
    killed_at = time.monotonic()

    async def new_leader() -> str | None:
        current = await stream_leader(stack.js, stream, LEADER_ELECTION_TIMEOUT_S)
        return current if current != leader else None

    successor = await wait_for(new_leader, LEADER_ELECTION_TIMEOUT_S, interval_s=0.1)
    elected_s = time.monotonic() - killed_at
    await asyncio.sleep(max(0.0, NODE_DOWN_S - elected_s))
    current_s = await asyncio.to_thread(stack.cluster.restart, leader)
    return (
        f"t={killed_at - started:.1f}s SIGKILL {leader} (leader of {stream}); "
        f"{successor} leads after {elected_s:.1f}s; {leader} restarted, current after "
        f"{current_s:.1f}s"
    )


async def kill_one_copy_of_each_worker(stack: ClusterStack, started: float) -> str:
    victims = [copies[0] for copies in stack.workers.values()]
    for victim in victims:
        victim.kill()  # SIGKILL
    killed_at = time.monotonic()
    await asyncio.sleep(WORKER_DOWN_S)
    await asyncio.gather(*(asyncio.to_thread(restart_worker, v) for v in victims))
    return (
        f"t={killed_at - started:.1f}s SIGKILL {', '.join(v.name for v in victims)}; "
        f"all back after {time.monotonic() - killed_at:.1f}s"
    )


async def inject_faults(stack: ClusterStack, started: float) -> list[str]:
    await asyncio.sleep(FIRST_FAULT_AT_S)
    return [
        await kill_stream_leader(stack, SESSIONS.name, started),
        await kill_one_copy_of_each_worker(stack, started),
        await kill_stream_leader(stack, WORKLOADS.name, started),
    ]


def expected_sessions(
    stored: list[dict[str, Any]],
) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Per session, from its stored events alone: the credit in wei and the segment keys."""
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in stored:
        by_session[event["session_id"]].append(event)
    credit: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    for sid, events in by_session.items():
        assert [e["event"] for e in events] == STEPS, sid  # each stored once, in order
        first, last = parse_time(events[0]["received_at"]), parse_time(events[-1]["received_at"])
        elapsed_ms = (last - first) // timedelta(milliseconds=1)
        segments = -(-elapsed_ms // (SEGMENT_S * 1000))  # a started segment is billed
        credit[sid] = elapsed_ms * WEI_PER_MS
        keys[sid] = {f"session:{sid}:0:{i}" for i in range(segments)}
    return credit, keys


async def all_current(stack: ClusterStack) -> bool:
    """Every stream has its 3 replicas, and the followers are current.

    An API request that goes unanswered (a leader is still being elected after the faults,
    seen in CI as a 5 s timeout on STREAM.INFO) means not yet: the caller polls until its
    deadline, and a cluster that never answers still fails there.
    """
    for spec in ALL_STREAMS:
        try:
            info = await stack.js.stream_info(spec.name)
        except JETSTREAM_UNANSWERED:
            return False
        replicas = (info.cluster.replicas or []) if info.cluster else []
        if info.config.num_replicas != CLUSTER_SIZE or len(replicas) != CLUSTER_SIZE - 1:
            return False
        if not all(replica.current for replica in replicas):
            return False
    return True


async def test_cluster_loses_no_accepted_event_when_nodes_and_workers_are_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    async with cluster_stack(
        tmp_path,
        ORCHESTRATORS,
        worker_copies=WORKER_COPIES,
        api_copies=API_COPIES,
        ack_wait_s=ACK_WAIT_S,
        PAYMENTS_SESSION_CREDIT_ETH_PER_MINUTE=RATE_ETH_PER_MINUTE,
        PAYMENTS_WORKLOAD_TIME_CREDIT_ETH_PER_MINUTE=RATE_ETH_PER_MINUTE,
        PAYMENTS_SESSION_SEGMENT_SECONDS=str(SEGMENT_S),
        PAYMENTS_SESSION_IDLE_TIMEOUT_SECONDS="900",
        PAYMENTS_SESSION_TICK_SECONDS="5",
    ) as stack:
        ready_s = time.monotonic() - began
        for node in stack.cluster.nodes:  # the durability setting reached every node
            varz = await asyncio.to_thread(server_variables, node)
            assert varz["jetstream"]["config"]["sync_always"] is True, node.server_name
        assert await all_current(stack)

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=HTTP_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
        ) as http:
            load = Load(stack.bases, http)
            started = time.monotonic()
            senders = [load.session(i) for i in range(SESSION_COUNT)]
            senders += [load.workload(i) for i in range(WORKLOAD_COUNT)]
            injecting = asyncio.create_task(inject_faults(stack, started))
            await asyncio.gather(*senders)
            faults = await injecting
            load_s = time.monotonic() - started

        assert not load.problems, load.problems[:20]
        assert load.sent == len(load.accepted) == SESSION_COUNT * len(STEPS) + WORKLOAD_COUNT

        async def settled() -> bool:
            async with stack.sessions() as db:
                ended = await db.execute(
                    select(func.count()).select_from(Session).where(Session.ended_at.is_not(None))  # type: ignore[union-attr]
                )
                credited = await db.execute(
                    select(func.count())
                    .select_from(LedgerEntry)
                    .where(LedgerEntry.reason == "workload_time")
                )
                return ended.scalar_one() == SESSION_COUNT and (
                    credited.scalar_one() >= WORKLOAD_COUNT
                )

        await stack.until(settled, SETTLE_TIMEOUT_S)
        settle_s = time.monotonic() - started - load_s
        await stack.until(lambda: all_current(stack), REPLICAS_CURRENT_TIMEOUT_S)

        # What the streams hold: every accepted event, in order per session.
        session_msgs = await read_stream(stack.js, SESSIONS.name, "sessions.events.>")
        workload_msgs = await read_stream(stack.js, WORKLOADS.name, "workloads.time.>")
        stored_keys = [
            m.headers["Nats-Msg-Id"] for m in [*session_msgs, *workload_msgs] if m.headers
        ]
        stored_twice = len(stored_keys) - len(set(stored_keys))
        first_copy: dict[str, dict[str, Any]] = {}
        for message in session_msgs:
            assert message.headers is not None
            first_copy.setdefault(message.headers["Nats-Msg-Id"], json.loads(message.data))
        # Answers by kind: session event names are "<session>/<step>".
        session_answers = {n: a for n, a in load.accepted.items() if "/" in n}
        workload_answers = {n: a for n, a in load.accepted.items() if "/" not in n}
        assert len(session_answers) == SESSION_COUNT * len(STEPS)
        lost = [
            a["event_key"] for a in session_answers.values() if a["event_key"] not in first_copy
        ]
        assert not lost, f"accepted but not stored: {lost[:10]}"
        for answer in session_answers.values():
            if not answer["duplicate"]:  # this attempt was the one stored: its receive time
                stored = first_copy[answer["event_key"]]
                assert parse_time(stored["received_at"]) == parse_time(answer["received_at"])
        expected_credit, expected_keys = expected_sessions(list(first_copy.values()))
        assert len(expected_credit) == SESSION_COUNT

        async with stack.sessions() as db:
            entries = list((await db.execute(select(LedgerEntry))).scalars())
            applied = set(
                (
                    await db.execute(
                        select(ProcessedEvent.consumer, ProcessedEvent.event_key).where(
                            ProcessedEvent.consumer.in_([SESSION_CONSUMER, WORKLOAD_CONSUMER])  # type: ignore[attr-defined]
                        )
                    )
                ).all()
            )
            balances = {
                b.orchestrator_id: b.balance_wei
                for b in (await db.execute(select(Balance))).scalars()
            }
            dead = (await db.execute(select(func.count()).select_from(DeadLetter))).scalar_one()

        # Applied: an accepted event has its inbox row (at most one: the key is unique).
        session_keys_accepted = {a["event_key"] for a in session_answers.values()}
        sessions_applied = {k for c, k in applied if c == SESSION_CONSUMER}
        workload_inbox = {k for c, k in applied if c == WORKLOAD_CONSUMER}
        # A retry answered from the projection (200) carries no key; the others must match.
        answered = {a["event_key"] for a in workload_answers.values() if "event_key" in a}

        # Credited: amounts computed here from what was sent (workloads) and stored (sessions).
        workload_credits: dict[str, list[int]] = defaultdict(list)
        session_credit: dict[str, int] = defaultdict(int)
        session_keys: dict[str, list[str]] = defaultdict(list)
        per_orchestrator: dict[str, int] = defaultdict(int)
        for entry in entries:
            metadata = entry.entry_metadata or {}
            per_orchestrator[entry.orchestrator_id] += entry.amount_wei
            if entry.reason == "workload_time":
                workload_credits[metadata["workload_id"]].append(entry.amount_wei)
            else:
                session_credit[metadata["session_id"]] += entry.amount_wei
                session_keys[metadata["session_id"]].append(entry.entry_key)
        doubled = sum(len(amounts) - 1 for amounts in workload_credits.values())
        doubled += sum(len(keys) - len(set(keys)) for keys in session_keys.values())
        credited = len(session_keys_accepted & sessions_applied) + len(workload_credits)
        expected_workloads = {
            workload_id(i): duration_ms(i) * WEI_PER_MS for i in range(WORKLOAD_COUNT)
        }
        total = sum(expected_workloads.values()) + sum(expected_credit.values())
        with capsys.disabled():  # shown in `make test` output, pass or fail
            print(
                f"\n[cluster] {CLUSTER_SIZE} nats nodes, {WORKER_COPIES} copies of each worker, "
                f"{API_COPIES} apis; ready after {ready_s:.1f}s\n"
                + "".join(f"[cluster] {fault}\n" for fault in faults)
                + f"[cluster] events sent {load.sent}, accepted {len(load.accepted)} "
                f"({load.attempts} requests, {load.unavailable} answered 503 + Retry-After), "
                f"credited {credited}, doubled {doubled}; stored twice {stored_twice}; "
                f"{total} wei expected, {sum(per_orchestrator.values())} credited in "
                f"{len(entries)} entries; load {load_s:.1f}s, settled {settle_s:.1f}s later"
            )

        unapplied = sorted(session_keys_accepted - sessions_applied)
        assert not unapplied, f"accepted, stored, never applied: {unapplied[:10]}"
        assert len(workload_inbox) == WORKLOAD_COUNT
        assert answered <= workload_inbox
        assert answered <= set(stored_keys), "a workload accepted but not stored"
        assert doubled == 0
        assert credited == len(load.accepted)
        assert {e.reason for e in entries} <= CREDIT_REASONS, {e.reason for e in entries}
        assert {w: sum(a) for w, a in workload_credits.items()} == expected_workloads
        wrong = [s for s in expected_credit if session_credit.get(s) != expected_credit[s]]
        assert not wrong, [(s, session_credit.get(s), expected_credit[s]) for s in wrong[:5]]
        assert {s: set(k) for s, k in session_keys.items()} == expected_keys
        assert sum(per_orchestrator.values()) == total
        assert balances == dict(per_orchestrator)
        assert dead == 0
