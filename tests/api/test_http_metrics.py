"""The api's request metrics: one count per answer, labelled by route, method and status, with
methods outside the standard set folded into OTHER so clients cannot grow the label space."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.errors import NotFound, error_middleware
from shared.observability import HTTP_REQUESTS, HTTP_SECONDS


def counted(method: str, route: str, status: str) -> float:
    value = HTTP_REQUESTS.labels(method, route, status)._value.get()
    return float(value)


def observed(route: str) -> float:
    for metric in HTTP_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("route") == route:
                return float(sample.value)
    return 0.0


async def test_requests_are_counted_by_route_method_and_status() -> None:
    async def found(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, status=202)

    async def missing(_request: web.Request) -> web.Response:
        raise NotFound("no such thing")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/metrics-test/{item}", found)
    app.router.add_get("/metrics-test/{item}", missing)
    app.router.add_route("*", "/metrics-any", found)
    before_ok = counted("POST", "/metrics-test/{item}", "202")
    before_404 = counted("GET", "/metrics-test/{item}", "404")
    before_other = counted("OTHER", "/metrics-any", "202")
    before_seconds = observed("/metrics-test/{item}")

    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            assert (await client.post("/metrics-test/a")).status == 202
        assert (await client.get("/metrics-test/b")).status == 404
        assert (await client.request("PROPFIND", "/metrics-any")).status == 202

    assert counted("POST", "/metrics-test/{item}", "202") - before_ok == 3
    assert counted("GET", "/metrics-test/{item}", "404") - before_404 == 1
    assert counted("OTHER", "/metrics-any", "202") - before_other == 1
    assert observed("/metrics-test/{item}") - before_seconds == 4
