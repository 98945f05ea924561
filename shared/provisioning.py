"""`payments nats provision`: create the streams and durable consumers, or report their drift.

Provisioning is an explicit operator step. Workers bind to the durables it created and never
create or change a stream themselves (FastStream's `declare=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.streams import (
    ALL_CONSUMERS,
    ALL_STREAMS,
    DUPLICATE_WINDOW_S,
    MAX_MESSAGE_BYTES,
    ConsumerSpec,
    StreamSpec,
)


@dataclass(frozen=True)
class ProvisionResult:
    kind: str  # stream | consumer
    name: str
    action: str  # created | ok | drift | updated
    differences: tuple[str, ...] = ()

    def line(self) -> str:
        detail = f" ({'; '.join(self.differences)})" if self.differences else ""
        return f"{self.kind} {self.name}: {self.action}{detail}"


def stream_config(spec: StreamSpec, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        max_age=spec.max_age_s,
        max_msg_size=MAX_MESSAGE_BYTES,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        allow_direct=True,
        # The outbox relay stores each commit's messages as one atomic batch (one fsync).
        allow_atomic=True,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=spec.filter_subjects[0] if len(spec.filter_subjects) == 1 else None,
        filter_subjects=list(spec.filter_subjects) if len(spec.filter_subjects) > 1 else None,
    )


_STREAM_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "num_replicas",
    "max_age",
    "max_msg_size",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "allow_atomic",
)
_CONSUMER_FIELDS = (
    "deliver_policy",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "filter_subject",
    "filter_subjects",
)
# Fields the server refuses to change on an existing stream or consumer.
_IMMUTABLE = {"retention", "storage", "deliver_policy", "ack_policy"}


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return sorted(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def differences(expected: Any, actual: Any, fields: tuple[str, ...]) -> list[str]:
    found = []
    for name in fields:
        want, have = _normalise(getattr(expected, name)), _normalise(getattr(actual, name))
        if (want or None) != (have or None):
            found.append(f"{name}: expected {want!r}, found {have!r}")
    return found


async def provision_stream(
    js: JetStreamContext, spec: StreamSpec, replicas: int, update: bool
) -> ProvisionResult:
    wanted = stream_config(spec, replicas)
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        await js.add_stream(wanted)
        return ProvisionResult("stream", spec.name, "created")
    drift = differences(wanted, info.config, _STREAM_FIELDS)
    if not drift:
        return ProvisionResult("stream", spec.name, "ok")
    fixable = not any(item.split(":")[0] in _IMMUTABLE for item in drift)
    if update and fixable:
        await js.update_stream(wanted)
        return ProvisionResult("stream", spec.name, "updated", tuple(drift))
    return ProvisionResult("stream", spec.name, "drift", tuple(drift))


async def provision_consumer(
    js: JetStreamContext, spec: ConsumerSpec, update: bool
) -> ProvisionResult:
    wanted = consumer_config(spec)
    name = f"{spec.stream}/{spec.durable}"
    try:
        info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        await js.add_consumer(spec.stream, wanted)
        return ProvisionResult("consumer", name, "created")
    drift = differences(wanted, info.config, _CONSUMER_FIELDS)
    if not drift:
        return ProvisionResult("consumer", name, "ok")
    fixable = not any(item.split(":")[0] in _IMMUTABLE for item in drift)
    if update and fixable:
        # Re-sending the create for an existing durable updates its editable fields.
        await js.add_consumer(spec.stream, wanted)
        return ProvisionResult("consumer", name, "updated", tuple(drift))
    return ProvisionResult("consumer", name, "drift", tuple(drift))


async def provision(
    js: JetStreamContext, replicas: int, update: bool = False
) -> list[ProvisionResult]:
    results = [await provision_stream(js, spec, replicas, update) for spec in ALL_STREAMS]
    results += [await provision_consumer(js, spec, update) for spec in ALL_CONSUMERS]
    return results


async def missing_streams(js: JetStreamContext) -> list[str]:
    missing = []
    for spec in ALL_STREAMS:
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            missing.append(spec.name)
    return missing
