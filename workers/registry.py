"""Registry worker: the orchestrator registry, fed by registrations and health reports.

Consumes
  - REGISTRY `registry.events.<id>` through durable `registry-events`, strictly in stream order
    (max_ack_pending 1), so address conflicts are decided the same way on every replay.
  - HEALTH `health.reports.<id>` through durable `registry-health`, in batches.
  - core NATS requests on `registry.commands.register` (queue group `registry`): the public
    registration command, answered to the api.

Produces
  - REGISTRY events: registrations that passed the rank check, and the bootstrap and
    single-mode registrations this worker publishes when it starts.
  - AUDIT `audit.registry.<event>` (register, register_denied, cooldown_started,
    cooldown_cleared) through the outbox.

Guarantee
  Each event changes the projection at most once (its event key is in the inbox, written in the
  same transaction); a health snapshot is kept newest-first by its ingress receive time, so
  redelivery and replay order do not matter. Time comes from the events, never the wall clock.
  Reports also drive eligibility, in report-time order: PAYMENTS_MISS_THRESHOLD consecutive
  misses (services reported but none up, or a health_url poll without a readable answer) start
  a cooldown of PAYMENTS_COOLDOWN_SECONDS from the report's time (audited
  `cooldown_started`); a healthy report after it ends clears it (`cooldown_cleared`). A report
  not newer than the last one counted changes no count, so replay gives the same cooldowns.

Limits
  A health report for an orchestrator the projection does not know yet is retried with backoff
  (its registration may still be in flight) and dead-lettered after MAX_ATTEMPTS deliveries.
  Registration answers wait at most REGISTRATION_APPLY_WAIT_S for the event to be applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsMessage
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from contracts import subjects
from contracts.commands import CommandReply, RegisterCommandV1
from contracts.events import (
    AuditEventV1,
    HealthReportV1,
    OrchestratorRegisteredV1,
    RegistrationOrigin,
)
from contracts.streams import (
    AUDIT,
    REGISTRY_EVENTS_CONSUMER,
    REGISTRY_HEALTH_CONSUMER,
    ConsumerSpec,
)
from shared.bootstrap import bootstrap_requests
from shared.db.models import Orchestrator
from shared.db.repositories import ledger, outbox, registry
from shared.event_consumer import Decoded, EventConsumer, Outcome
from shared.money import wei_to_eth
from shared.rank import RankUnknown, TopOrchestrators
from shared.registration import (
    publish_registration,
    register_and_wait,
    registered_event,
    registration_key,
)
from shared.registry_rules import HealthRules
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)

settings = load_settings()
runtime = WorkerRuntime("registry", settings)
app = runtime.app
DENYLIST = frozenset(settings.address_denylist)
HEALTH_RULES = HealthRules(
    miss_threshold=settings.miss_threshold,
    cooldown_s=settings.cooldown_seconds,
    default_min_uptime=settings.default_min_service_uptime,
)
top_orchestrators = TopOrchestrators(
    settings.eth_rpc_url, settings.top_contract_address, settings.top_cache_ttl_seconds
)


# -- projections ----------------------------------------------------------------------------


class RegistrationProjector:
    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[OrchestratorRegisteredV1]]
    ) -> list[Outcome]:
        outcomes = []
        for item in items:
            answer = await registry.apply_registration(
                session, item.event, item.delivery.stream_seq, DENYLIST
            )
            await self._audit(session, item, answer)
            outcomes.append(Outcome.done(answer))
        return outcomes

    async def _audit(
        self, session: AsyncSession, item: Decoded[OrchestratorRegisteredV1], answer: dict[str, Any]
    ) -> None:
        event = item.event
        if answer["status"] == 200:
            body = answer["body"]
            name, fields = (
                "register",
                {
                    "orchestrator_id": event.orchestrator_id,
                    "address": event.address,
                    "origin": event.origin,
                    "first_registration": answer["first_registration"],
                    "registration_count": body["registration_count"],
                    "is_top_100": body["is_top_100"],
                    "eligible_for_payments": body["eligible_for_payments"],
                    "denylisted": body["denylisted"],
                },
            )
        elif answer["status"] == 403:
            name, fields = (
                "register_denied",
                {
                    "orchestrator_id": event.orchestrator_id,
                    "address": event.address,
                    "origin": event.origin,
                },
            )
        else:
            return
        audit = AuditEventV1(domain="registry", event=name, at=event.registered_at, fields=fields)
        await outbox.add(
            session,
            stream=AUDIT.name,
            subject=subjects.audit("registry", name),
            event=audit,
            key=f"audit:{item.key}",
        )


class HealthProjector:
    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[HealthReportV1]]
    ) -> list[Outcome]:
        # Locked: two copies applying reports of one orchestrator must not lose the newer one.
        records = await registry.get_many(
            session, (i.event.orchestrator_id for i in items), for_update=True
        )
        outcomes = []
        for item in items:
            record = records.get(item.event.orchestrator_id)
            if record is None:
                outcomes.append(Outcome.retry("unknown orchestrator"))
                continue
            changed = registry.apply_health_report(record, item.event)
            cooldown = registry.apply_health_verdict(record, item.event, HEALTH_RULES)
            if cooldown is not None:
                await audit_cooldown(session, item, record, cooldown)
            outcomes.append(Outcome.done({"stored": changed, "cooldown": cooldown}))
        return outcomes


async def audit_cooldown(
    session: AsyncSession, item: Decoded[HealthReportV1], record: Orchestrator, name: str
) -> None:
    """`cooldown_started` / `cooldown_cleared`, dated by the report that caused it."""
    expires = record.cooldown_expires_at
    audit = AuditEventV1(
        domain="registry",
        event=name,
        at=item.event.received_at,
        fields={
            "orchestrator_id": record.orchestrator_id,
            "source": item.event.source,
            "cooldown_expires_at": expires.isoformat() if expires else None,
            "eligible_for_payments": record.eligible_for_payments,
        },
    )
    await outbox.add(
        session,
        stream=AUDIT.name,
        subject=subjects.audit("registry", name),
        event=audit,
        key=f"audit:{name}:{item.key}",
    )


registrations = runtime.event_consumer(
    consumer=REGISTRY_EVENTS_CONSUMER.durable,
    schemas={OrchestratorRegisteredV1.SCHEMA: OrchestratorRegisteredV1},
    projector=RegistrationProjector(),
)
health_reports = runtime.event_consumer(
    consumer=REGISTRY_HEALTH_CONSUMER.durable,
    schemas={HealthReportV1.SCHEMA: HealthReportV1},
    projector=HealthProjector(),
)


ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = [
    (REGISTRY_EVENTS_CONSUMER, registrations),
    (REGISTRY_HEALTH_CONSUMER, health_reports),
]


@runtime.consume(REGISTRY_EVENTS_CONSUMER)
async def on_registry_events(messages: list[Msg]) -> None:
    await registrations.handle(messages)


@runtime.consume(REGISTRY_HEALTH_CONSUMER)
async def on_health_reports(messages: list[Msg]) -> None:
    await health_reports.handle(messages)


# -- the registration command -----------------------------------------------------------------


def reply(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return CommandReply(status=status, body=body).model_dump()


@runtime.broker.subscriber(subjects.REGISTER_COMMAND, queue="registry")
async def on_register_command(body: Any, message: NatsMessage) -> dict[str, Any]:
    try:
        command = RegisterCommandV1.model_validate_json(message.body)
    except ValueError:
        return reply(400, {"detail": "Malformed registration command"})
    request = command.request
    if request.address.lower() in DENYLIST:
        # Published too, so the denial is audited and a denylisted record is flagged.
        event = registered_event(
            request,
            origin="public",
            is_top_100=None,
            request_ip=command.request_ip,
            at=command.received_at,
        )
    else:
        try:
            in_top = await top_orchestrators.contains(request.address)
        except RankUnknown:
            return reply(503, {"detail": "Unable to validate orchestrator rank at this time"})
        if not in_top:
            return reply(403, {"detail": "Address is not part of the current top orchestrators"})
        event = registered_event(
            request,
            origin="public",
            is_top_100=True,
            request_ip=command.request_ip,
            at=command.received_at,
        )
    key = registration_key(request, "public", command.received_at)
    outcome = await register_and_wait(runtime.js, runtime.sessionmaker, event, key)
    if outcome is None:
        return reply(503, {"detail": "Registration accepted but not applied yet; retry shortly"})
    answer_body = dict(outcome["body"])
    if outcome["status"] == 200:
        answer_body["balance_eth"] = await balance_eth(request.orchestrator_id)
    return reply(int(outcome["status"]), answer_body)


async def balance_eth(orchestrator_id: str) -> str:
    async with runtime.sessionmaker() as session:
        return wei_to_eth(await ledger.balance_wei(session, orchestrator_id))


# -- bootstrap --------------------------------------------------------------------------------


async def publish_bootstrap() -> None:
    """Publish the configured bootstrap registrations; unchanged entries dedupe on their key."""
    origin: RegistrationOrigin = "single" if settings.single_orchestrator_mode else "bootstrap"
    at = datetime.now(UTC)
    for request in bootstrap_requests(settings):
        is_top: bool | None = None
        if not settings.bootstrap_skip_rank_validation:
            try:
                is_top = await top_orchestrators.contains(request.address)
            except RankUnknown:
                # Registered anyway, keeping its stored rank; the next start checks again.
                log.warning(
                    "bootstrap rank unknown", extra={"orchestrator_id": request.orchestrator_id}
                )
        event = registered_event(request, origin=origin, is_top_100=is_top, request_ip=None, at=at)
        await publish_registration(runtime.js, event, registration_key(request, origin, None))
    log.info("bootstrap registrations published")


runtime.startup_hooks.append(publish_bootstrap)
