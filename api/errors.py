"""Domain errors and the one place that turns them into HTTP answers.

Every error body is `{"detail": "..."}` and never echoes a submitted value, so a secret in a
request cannot come back in an error or reach a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from aiohttp import web

from shared.observability import HTTP_REQUESTS, HTTP_SECONDS

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying when the event store is unreachable.
RETRY_AFTER_S = 2


class ApiError(Exception):
    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class TooManyRequests(ApiError):
    status = 429


class ServiceUnavailable(ApiError):
    status = 503


class Relayed(ApiError):
    """A worker's answer to a command, passed through with its status and body."""

    def __init__(self, status: int, body: dict[str, object]) -> None:
        super().__init__(str(body.get("detail", "")))
        self.status = status
        self.body = body


def error_response(status: int, detail: str) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response({"detail": detail}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    started = time.perf_counter()
    response = await _answer(request, handler)
    _latency(route).observe(time.perf_counter() - started)
    method = request.method if request.method in KNOWN_METHODS else "OTHER"
    _answered(method, route, response.status).inc()
    return response


# Any token is a valid HTTP method; label only these, so a client cannot grow the metrics.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# The metrics' children, looked up once per route (and method and status): both sets are small
# and fixed (canonical routes, "unmatched"), and labels() costs a lock and a dict per call.
@cache
def _latency(route: str) -> Any:
    return HTTP_SECONDS.labels(route)


@cache
def _answered(method: str, route: str, status: int) -> Any:
    return HTTP_REQUESTS.labels(method, route, str(status))


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Relayed as error:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
        return web.json_response(error.body, status=error.status, headers=headers)
    except ApiError as error:
        return error_response(error.status, error.detail)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "Request body is too large")
    except web.HTTPException as error:
        if error.status >= 400:
            return error_response(error.status, error.reason or "Request failed")
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_response(500, "Internal error")
