"""docs/asyncapi.json and docs/openapi.json match the code, cover all of it, and the api serves
them.

This is the CI check of the generated documents: it fails when a checked-in document differs
from what the code generates now (run `payments docs write`), when a message schema, a stream
or a consumer is missing from the AsyncAPI document, and when a route has no OpenAPI entry.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app, setup_routes
from api.openapi import ROUTE_DOCS, UndocumentedRoute, openapi_document, routes_of
from contracts import events
from contracts.catalog import SUBJECT_FAMILIES, as_filter, filter_covers
from contracts.streams import ALL_CONSUMERS, ALL_STREAMS, stream_by_name
from shared.embedded_nats import free_port
from shared.generated_docs import (
    ASYNCAPI_PATH,
    OPENAPI_PATH,
    asyncapi_text,
    openapi_text,
    stale_documents,
)
from shared.settings import build_settings


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(asyncapi_text())
    return document


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(openapi_text())
    return document


def test_the_checked_in_documents_are_what_the_code_generates() -> None:
    stale = stale_documents()
    assert not stale, f"{[str(p) for p in stale]} differ from the code: run `payments docs write`"


def event_models() -> list[type[events.EventModel]]:
    return [
        model
        for _name, model in inspect.getmembers(events, inspect.isclass)
        if issubclass(model, events.EventModel) and model is not events.EventModel
    ]


def test_every_message_schema_stream_and_consumer_is_in_the_asyncapi_document(
    asyncapi: dict[str, Any],
) -> None:
    cataloged = {model for family in SUBJECT_FAMILIES for model in family.messages}
    assert set(event_models()) == cataloged, "contracts/catalog.py misses a schema"
    schemas = asyncapi["components"]["schemas"]
    for model in event_models():
        assert model.__name__ in schemas, model
    assert {s["name"] for s in asyncapi["x-streams"]} == {s.name for s in ALL_STREAMS}
    channels = asyncapi["channels"]
    for spec in ALL_CONSUMERS:
        assert spec.durable in channels, spec.durable
        assert channels[spec.durable]["bindings"]["nats"]["subject"] == spec.filter_subjects[0]
    for family in SUBJECT_FAMILIES:
        channel = channels[f"{family.subject}:publish"]
        assert channel["address"] == family.subject
        # The family lives inside its stream's subjects.
        stream = stream_by_name(family.stream)
        assert any(filter_covers(subject, family.subject) for subject in stream.subjects), family
        assert as_filter(family.subject).count("*") == family.subject.count("{")
    # The headers every stored message carries, with the schemas of that channel.
    message_name = "ledger-workloads:SubscribeMessage"
    headers = asyncapi["components"]["messages"][message_name]["headers"]
    assert set(headers["required"]) == {"Nats-Msg-Id", "Payments-Event-Key", "Payments-Schema"}
    assert "workloads.time.v1" in headers["properties"]["Payments-Schema"]["enum"]
    assert asyncapi["asyncapi"] == "3.0.0"


def test_every_route_has_an_openapi_entry_and_a_new_one_cannot_slip_through(
    openapi: dict[str, Any],
) -> None:
    app = web.Application()
    setup_routes(app)
    routes = routes_of(app)
    assert set(routes) == set(ROUTE_DOCS)
    for method, path in routes:
        operation = openapi["paths"][path][method.lower()]
        assert operation["responses"], (method, path)
    adjust = openapi["paths"]["/api/ledger/adjustments"]["post"]
    assert adjust["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "AdjustmentRequest"
    )
    assert adjust["security"] == [{"adminToken": []}]
    assert "Retry-After" in adjust["responses"]["503"]["headers"]

    async def undocumented(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    setup_routes(app)
    app.router.add_get("/api/not-documented", undocumented)
    with pytest.raises(UndocumentedRoute, match="/api/not-documented"):
        openapi_document(app, "0")


async def test_the_api_serves_the_checked_in_documents(tmp_path: Path) -> None:
    # No NATS behind this port: the api answers its documents without it.
    settings = build_settings(
        nats_url=f"nats://127.0.0.1:{free_port()}",
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}",
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        for route, path in (
            ("/docs/openapi.json", OPENAPI_PATH),
            ("/docs/asyncapi.json", ASYNCAPI_PATH),
        ):
            answer = await client.get(route)
            assert answer.status == 200, route
            assert answer.content_type == "application/json"
            assert await answer.text() == path.read_text(encoding="utf-8"), route
