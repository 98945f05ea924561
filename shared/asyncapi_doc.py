"""The AsyncAPI document of the streams, made by FastStream's generator from contracts/.

The workers consume through their own pull loop (shared.pull_loop), so their FastStream apps
hold no stream subscribers for the generator to see. This module gives FastStream what it needs
instead: a documentation-only `NatsBroker` (never connected) with one publisher per subject
family of `contracts.catalog` (the schemas that travel on it, as a union) and one pull
subscriber per durable consumer of `contracts.streams` (the union of the schemas its filters
receive), plus the request-reply commands with their queue groups. FastStream's `AsyncAPI`
factory turns that into the document (AsyncAPI 3.0.0). Two things FastStream cannot say are
added to its output: the headers every stored message carries, and the streams themselves
(`x-streams`: subjects, retention, duplicate window), and its `correlation_id` header, which
we never set, is removed.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote

from faststream.nats import JStream, NatsBroker, PullSub
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from contracts.catalog import COMMANDS, SUBJECT_FAMILIES, filter_covers
from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER
from contracts.streams import (
    ALL_CONSUMERS,
    ALL_STREAMS,
    DUPLICATE_WINDOW_S,
    MAX_MESSAGE_BYTES,
    ConsumerSpec,
)

TITLE = "Payments pipeline streams"
# The embedded stack's server; a deployment's URL is its own.
DOCUMENTED_SERVER = "nats://127.0.0.1:4322"
DESCRIPTION = (
    "JetStream streams, subjects and message schemas of the payments pipeline. Every stored "
    "message is JSON, with the headers Nats-Msg-Id (JetStream de-duplication), "
    "Payments-Event-Key (the database idempotency key) and Payments-Schema (the versioned "
    "schema of the body). Receive operations are durable pull consumers shared by every copy "
    "of a worker role. Generated from contracts/ by `payments docs write`."
)


def package_version() -> str:
    try:
        return version("payments-pipeline")
    except PackageNotFoundError:
        return "0.0.0"


def union(models: tuple[type[BaseModel], ...]) -> Any:
    return functools.reduce(operator.or_, models)


def handler_for(message_type: Any) -> Callable[[Any], Awaitable[None]]:
    """A handler whose parameter annotation tells FastStream the message schema."""

    async def documented(message: Any) -> None:  # never called: the broker never connects
        return None

    documented.__annotations__ = {"message": message_type, "return": None}
    return documented


def consumer_models(spec: ConsumerSpec) -> tuple[type[BaseModel], ...]:
    found: list[type[BaseModel]] = []
    for family in SUBJECT_FAMILIES:
        if family.stream != spec.stream:
            continue
        if any(filter_covers(f, family.subject) for f in spec.filter_subjects):
            found += [m for m in family.messages if m not in found]
    return tuple(found)


def consumer_description(spec: ConsumerSpec) -> str:
    ordered = (
        "strictly ordered (max_ack_pending 1)"
        if spec.max_ack_pending == 1
        else (f"up to {spec.max_ack_pending} messages in flight")
    )
    return (
        f"{spec.description} Durable pull consumer `{spec.durable}` on stream {spec.stream}, "
        f"filters {', '.join(spec.filter_subjects)}; explicit ack, ack_wait {spec.ack_wait_s:g} s, "
        f"max_deliver {spec.max_deliver}, {ordered}."
    )


def build_broker() -> NatsBroker:
    broker = NatsBroker(DOCUMENTED_SERVER)
    streams = {spec.name: JStream(spec.name, declare=False) for spec in ALL_STREAMS}
    for family in SUBJECT_FAMILIES:
        schemas = ", ".join(model.SCHEMA for model in family.messages)
        broker.publisher(
            family.subject,
            stream=streams[family.stream],
            schema=union(family.messages),
            title=f"{family.subject}:publish",
            description=(
                f"{family.description} Stream {family.stream}; published by "
                f"{family.publishers}; Payments-Schema {schemas}."
            ),
        )
    for spec in ALL_CONSUMERS:
        models = consumer_models(spec)
        if not models:
            raise ValueError(f"no message family of contracts.catalog reaches {spec.durable}")
        broker.subscriber(
            spec.filter_subjects[0],
            stream=streams[spec.stream],
            durable=spec.durable,
            pull_sub=PullSub(batch_size=spec.batch_size),
            title=spec.durable,
            description=consumer_description(spec),
        )(handler_for(union(models)))
    for command in COMMANDS:
        broker.subscriber(
            command.subject,
            queue=command.queue,
            title=f"{command.subject}:command",
            description=(
                f"{command.description} Request-reply on core NATS, queue group "
                f"`{command.queue}`; the reply is a {command.reply.__name__}."
            ),
        )(handler_for(command.request))
    return broker


def _message_headers(schemas: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            MSG_ID_HEADER: {"type": "string", "description": "JetStream de-duplication id."},
            EVENT_KEY_HEADER: {
                "type": "string",
                "description": "The event's idempotency key, unique in the database.",
            },
            SCHEMA_HEADER: {"type": "string", "enum": schemas},
        },
        "required": [MSG_ID_HEADER, EVENT_KEY_HEADER, SCHEMA_HEADER],
    }


def _schemas_by_channel() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for family in SUBJECT_FAMILIES:
        found[f"{family.subject}:publish"] = [m.SCHEMA for m in family.messages]
    for spec in ALL_CONSUMERS:
        found[spec.durable] = [m.SCHEMA for m in consumer_models(spec)]  # type: ignore[attr-defined]
    return found


def streams_extension() -> list[dict[str, Any]]:
    return [
        {
            "name": spec.name,
            "subjects": list(spec.subjects),
            "description": spec.description,
            "retention": "limits",
            "storage": "file",
            "max_age_seconds": spec.max_age_s,
            "duplicate_window_seconds": DUPLICATE_WINDOW_S,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "deny_delete": spec.deny_delete,
            "deny_purge": spec.deny_purge,
            "consumers": [c.durable for c in ALL_CONSUMERS if c.stream == spec.name],
        }
        for spec in ALL_STREAMS
    ]


def asyncapi_document() -> dict[str, Any]:
    specification = AsyncAPI(
        build_broker(),
        title=TITLE,
        version=package_version(),
        description=DESCRIPTION,
        schema_version="3.0.0",
    ).to_specification()
    document: dict[str, Any] = specification.to_jsonable()
    schemas = _schemas_by_channel()
    for channel_name, channel in document.get("channels", {}).items():
        for reference in channel.get("messages", {}).values():
            name = unquote(reference["$ref"].rsplit("/", 1)[-1])
            message = document["components"]["messages"][name]
            message.pop("correlationId", None)
            if channel_name in schemas:  # stream messages; commands carry no such headers
                message["headers"] = _message_headers(schemas[channel_name])
    document["x-streams"] = streams_extension()
    return document
