"""The OpenAPI document of the HTTP api, built from its route table and the pydantic models.

Handlers parse their own bodies (api.parsing), so what a route takes and answers cannot be read
off its signature: `ROUTE_DOCS` says it, next to the code, for every route `setup_routes`
registers. Paths, methods and path parameters come from aiohttp's router; request and response
schemas from the models in contracts/. A route without an entry here (or an entry without a
route) stops the generator, so the document cannot silently fall behind the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from contracts.http import (
    AcceptedResponse,
    ActivityLeaseHeartbeatRequest,
    ActivityLeaseRequest,
    AdjustmentRequest,
    ErrorBody,
    HealthReportRequest,
    JobRecordRequest,
    OrchestratorRecord,
    RegisterRequest,
    RegisterResponse,
    SessionEventRequest,
    WorkloadCreateRequest,
    WorkloadPatchRequest,
    WorkloadRecord,
    WorkloadTimeRequest,
)
from contracts.licensing import (
    AccessRequest,
    ImageRefRequest,
    ImageUpsertRequest,
    InviteCreateRequest,
    InviteIdRequest,
    InviteRedeemRequest,
    LeaseRequest,
)

Auth = Literal["public", "admin", "viewer", "orchestrator", "session_reporter"]
SCHEMAS_REF = "#/components/schemas/{model}"
OPENAPI_VERSION = "3.1.0"
TITLE = "Payments pipeline HTTP api"


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    kind: Literal["string", "integer", "boolean"] = "string"


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    auth: Auth
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    # The answer is `{list_key: [response, ...]}` rather than one `response`.
    list_key: str | None = None
    status: int = 200
    also: tuple[int, ...] = ()  # other success statuses, with the same body
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    publishes: bool = False  # stored in a stream first: 503 with Retry-After while NATS is down
    content_type: str = "application/json"


LIMIT = Query("limit", "how many, newest first", "integer")
BY_ORCHESTRATOR = Query("orchestrator_id", "only this orchestrator")
ACTIVE_ONLY = Query("active_only", "only active ones", "boolean")
SINCE = Query("since", "ISO 8601 timestamp (inclusive)")
UNTIL = Query("until", "ISO 8601 timestamp (exclusive)")
LEASES = "/api/activity/leases"
TOKENS = "/api/licenses/orchestrators/{orchestrator_id}/tokens"

ROUTE_DOCS: dict[tuple[str, str], RouteDoc] = {
    ("GET", "/healthz"): RouteDoc("Liveness", "public"),
    ("GET", "/readyz"): RouteDoc(
        "Readiness: NATS, every stream and the database answer", "public", errors=(503,)
    ),
    ("GET", "/metrics"): RouteDoc(
        "Prometheus metrics of this api process", "public", content_type="text/plain"
    ),
    ("GET", "/docs/openapi.json"): RouteDoc("This document", "public"),
    ("GET", "/docs/asyncapi.json"): RouteDoc(
        "The AsyncAPI document of the streams, subjects and message schemas", "public"
    ),
    ("POST", "/api/orchestrators/register"): RouteDoc(
        "Register an orchestrator (rate limited per id and per client IP)",
        "public",
        request=RegisterRequest,
        response=RegisterResponse,
        errors=(403, 409, 429, 503),
    ),
    ("GET", "/api/orchestrators"): RouteDoc(
        "Every orchestrator", "viewer", response=OrchestratorRecord, list_key="orchestrators"
    ),
    ("GET", "/api/orchestrators/me"): RouteDoc(
        "The caller's own record", "orchestrator", response=OrchestratorRecord, errors=(404,)
    ),
    ("GET", "/api/orchestrators/me/stats"): RouteDoc(
        "The caller's earnings by day",
        "orchestrator",
        query=(Query("days", "how many days back (1-365)", "integer"),),
    ),
    ("GET", "/api/orchestrators/{orchestrator_id}"): RouteDoc(
        "One orchestrator", "viewer", response=OrchestratorRecord, errors=(404,)
    ),
    ("POST", "/api/orchestrators/{orchestrator_id}/health"): RouteDoc(
        "Store a forwarder's health report",
        "admin",
        request=HealthReportRequest,
        response=AcceptedResponse,
        status=202,
        errors=(404,),
        publishes=True,
    ),
    ("GET", "/api/orchestrators/{orchestrator_id}/stats"): RouteDoc(
        "An orchestrator's earnings by day",
        "viewer",
        query=(Query("days", "how many days back (1-365)", "integer"),),
    ),
    ("POST", "/api/workloads/time"): RouteDoc(
        "Record a time-based workload (credited by the ledger worker)",
        "admin",
        request=WorkloadTimeRequest,
        response=WorkloadRecord,
        status=202,
        also=(200,),
        errors=(404, 409),
        publishes=True,
    ),
    ("POST", "/api/workloads"): RouteDoc(
        "Submit a fixed-price workload (credited once verified)",
        "admin",
        request=WorkloadCreateRequest,
        response=WorkloadRecord,
        status=202,
        also=(200,),
        errors=(404, 409),
        publishes=True,
    ),
    ("GET", "/api/workloads"): RouteDoc(
        "Workloads",
        "viewer",
        response=WorkloadRecord,
        list_key="workloads",
        query=(
            BY_ORCHESTRATOR,
            Query("status", "pending, verified, paid or rejected"),
            SINCE,
            UNTIL,
            LIMIT,
        ),
    ),
    ("GET", "/api/workloads/summary"): RouteDoc(
        "Per orchestrator: workloads, earned and pending", "viewer", query=(SINCE, UNTIL)
    ),
    ("PATCH", "/api/workloads/{workload_id}"): RouteDoc(
        "Change a workload (status, notes, transaction, artifact)",
        "admin",
        request=WorkloadPatchRequest,
        response=WorkloadRecord,
        status=202,
        also=(200,),
        errors=(404,),
        publishes=True,
    ),
    ("POST", "/api/ledger/adjustments"): RouteDoc(
        "Adjust a balance (send Idempotency-Key to make a retry safe)",
        "admin",
        request=AdjustmentRequest,
        also=(202,),
        errors=(404,),
        publishes=True,
    ),
    ("GET", "/api/ledger/events"): RouteDoc(
        "Ledger entries, newest first", "viewer", query=(BY_ORCHESTRATOR, LIMIT)
    ),
    ("POST", "/api/sessions/events"): RouteDoc(
        "Store an edge's session event",
        "session_reporter",
        request=SessionEventRequest,
        status=202,
        publishes=True,
    ),
    ("GET", "/api/sessions"): RouteDoc(
        "Sessions", "viewer", query=(BY_ORCHESTRATOR, ACTIVE_ONLY, LIMIT)
    ),
    ("POST", LEASES): RouteDoc(
        "Issue an activity lease",
        "admin",
        request=ActivityLeaseRequest,
        also=(202,),
        errors=(404, 409),
        publishes=True,
    ),
    ("GET", LEASES): RouteDoc(
        "Activity leases", "viewer", query=(BY_ORCHESTRATOR, ACTIVE_ONLY, LIMIT)
    ),
    ("POST", LEASES + "/{lease_id}/heartbeat"): RouteDoc(
        "Extend an activity lease",
        "admin",
        request=ActivityLeaseHeartbeatRequest,
        also=(202,),
        errors=(404, 409),
        publishes=True,
    ),
    ("DELETE", LEASES + "/{lease_id}"): RouteDoc(
        "Revoke an activity lease", "admin", also=(202,), errors=(404,), publishes=True
    ),
    ("POST", TOKENS): RouteDoc(
        "Mint an orchestrator token (shown once)", "admin", errors=(404,), publishes=True
    ),
    ("GET", TOKENS): RouteDoc("An orchestrator's tokens (never the secret)", "admin"),
    ("DELETE", TOKENS + "/{token_id}"): RouteDoc(
        "Revoke an orchestrator token", "admin", errors=(404,), publishes=True
    ),
    ("PUT", "/api/licenses/images"): RouteDoc(
        "Store or rotate an image's sealed secret",
        "admin",
        request=ImageUpsertRequest,
        publishes=True,
    ),
    ("GET", "/api/licenses/images"): RouteDoc("Licensed images (never the secret)", "admin"),
    ("POST", "/api/licenses/images/revoke"): RouteDoc(
        "Revoke an image", "admin", request=ImageRefRequest, errors=(404,), publishes=True
    ),
    ("GET", "/api/licenses/access"): RouteDoc("Who may use which image", "admin"),
    ("POST", "/api/licenses/access/grant"): RouteDoc(
        "Grant an orchestrator an image", "admin", request=AccessRequest, publishes=True
    ),
    ("POST", "/api/licenses/access/revoke"): RouteDoc(
        "Take an image away from an orchestrator", "admin", request=AccessRequest, publishes=True
    ),
    ("POST", "/api/licenses/invites"): RouteDoc(
        "Create a wallet-bound invite (its code is shown once)",
        "admin",
        request=InviteCreateRequest,
        publishes=True,
    ),
    ("GET", "/api/licenses/invites"): RouteDoc("Invites (never the code)", "admin"),
    ("POST", "/api/licenses/invites/revoke"): RouteDoc(
        "Revoke an invite", "admin", request=InviteIdRequest, errors=(404,), publishes=True
    ),
    ("POST", "/api/licenses/invites/redeem"): RouteDoc(
        "Redeem an invite: register, grant access, mint a token (rate limited per IP)",
        "public",
        request=InviteRedeemRequest,
        errors=(403, 404, 409, 429),
        publishes=True,
    ),
    ("POST", "/api/licenses/lease"): RouteDoc(
        "Take an image lease: the decryption secret and a fresh artifact URL",
        "orchestrator",
        request=LeaseRequest,
        errors=(403, 404),
        publishes=True,
    ),
    ("POST", "/api/licenses/lease/{lease_id}/heartbeat"): RouteDoc(
        "Extend an image lease", "orchestrator", errors=(404, 409), publishes=True
    ),
    ("GET", "/api/licenses/leases"): RouteDoc(
        "Image leases",
        "viewer",
        query=(BY_ORCHESTRATOR, Query("image_ref", "only this image"), LIMIT),
    ),
    ("POST", "/api/jobs/record"): RouteDoc(
        "Start a recording job (`Prefer: wait=N` waits for it to be applied)",
        "admin",
        request=JobRecordRequest,
        status=202,
        also=(200,),
        errors=(404, 409),
        publishes=True,
    ),
    ("GET", "/api/jobs/{job_id}"): RouteDoc(
        "A recording job, with a fresh download URL", "viewer", errors=(404,)
    ),
    ("POST", "/api/jobs/{job_id}/cancel"): RouteDoc(
        "Cancel a recording job", "admin", status=202, errors=(404, 409), publishes=True
    ),
    ("GET", "/api/recordings/presign"): RouteDoc(
        "Presign a recording's download URL (the recordings bucket only)",
        "viewer",
        query=(Query("s3_uri", "s3://<recordings bucket>/<key>"),),
        errors=(400, 422, 503),
    ),
}

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "adminToken": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"},
    "viewerToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Admin-Token",
        "description": "The admin token or one of PAYMENTS_VIEWER_TOKENS.",
    },
    "orchestratorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "An orchestrator token (also accepted in X-Orchestrator-Token).",
    },
    "sessionReporterToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Session-Token",
        "description": "Checked only when PAYMENTS_SESSION_REPORTER_TOKEN is set (or Bearer).",
    },
}
_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "public": [],
    "admin": [{"adminToken": []}],
    "viewer": [{"viewerToken": []}],
    "orchestrator": [{"orchestratorToken": []}],
    "session_reporter": [{"sessionReporterToken": []}, {}],
}
_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or wrong token",
    403: "Refused",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "The body breaks the contract (the field and the rule are named)",
    429: "Too many requests",
    503: "The event store or a worker is unavailable; retry after Retry-After seconds",
}
_SUCCESS_TEXT = {
    200: "Done (for a write: applied, or already known)",
    202: "Stored in the stream; a worker applies it",
}
_PATH_PARAMETER = re.compile(r"{([^}/]+)}")


class UndocumentedRoute(RuntimeError):
    pass


def routes_of(app: web.Application) -> list[tuple[str, str]]:
    found = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue  # aiohttp adds HEAD beside each GET
        found.append((route.method, route.resource.canonical))
    return found


def _error_responses(doc: RouteDoc) -> dict[int, str]:
    codes = set(doc.errors)
    if doc.auth not in ("public",):
        codes.add(401)
    if doc.request is not None:
        codes |= {400, 413, 422}
    if doc.publishes:
        codes.add(503)
    return {code: _ERROR_TEXT[code] for code in sorted(codes)}


def _success_schema(doc: RouteDoc, names: dict[Any, str]) -> dict[str, Any]:
    if doc.response is None:
        return {"type": "object"}
    reference = {"$ref": names[(doc.response, "serialization")]}
    if doc.list_key is None:
        return reference
    return {
        "type": "object",
        "properties": {doc.list_key: {"type": "array", "items": reference}},
        "required": [doc.list_key],
    }


def _operation(method: str, path: str, doc: RouteDoc, names: dict[Any, str]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAMETER.findall(path)
    ]
    parameters += [
        {"name": q.name, "in": "query", "description": q.description, "schema": {"type": q.kind}}
        for q in doc.query
    ]
    responses: dict[str, Any] = {}
    for status in sorted({doc.status, *doc.also}):
        success: dict[str, Any] = {"description": _SUCCESS_TEXT[status]}
        if doc.content_type == "application/json":
            success["content"] = {"application/json": {"schema": _success_schema(doc, names)}}
        else:
            success["content"] = {doc.content_type: {"schema": {"type": "string"}}}
        responses[str(status)] = success
    error_body = {"$ref": names[(ErrorBody, "serialization")]}
    for code, text in _error_responses(doc).items():
        answer: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {"schema": error_body}},
        }
        if code == 503:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        responses[str(code)] = answer
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": doc.summary,
        "security": _SECURITY[doc.auth],
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = parameters
    if doc.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": names[(doc.request, "validation")]}}
            },
        }
    return operation


def openapi_document(app: web.Application, version: str) -> dict[str, Any]:
    routes = routes_of(app)
    missing = [f"{m} {p}" for m, p in routes if (m, p) not in ROUTE_DOCS]
    stale = [f"{m} {p}" for m, p in ROUTE_DOCS if (m, p) not in set(routes)]
    if missing or stale:
        raise UndocumentedRoute(
            f"api/openapi.py ROUTE_DOCS is out of step with the routes: missing {missing}, "
            f"without a route {stale}"
        )
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorBody, "serialization")
    ]
    for doc in ROUTE_DOCS.values():
        if doc.request is not None and (doc.request, "validation") not in wanted:
            wanted.append((doc.request, "validation"))
        if doc.response is not None and (doc.response, "serialization") not in wanted:
            wanted.append((doc.response, "serialization"))
    mapping, definitions = models_json_schema(wanted, ref_template=SCHEMAS_REF)
    names = {key: value["$ref"] for key, value in mapping.items()}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(routes):
        paths.setdefault(path, {})[method.lower()] = _operation(
            method, path, ROUTE_DOCS[(method, path)], names
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": version,
            "description": (
                "2xx on a write means the event is stored in JetStream (PubAck); workers apply "
                'it. Error bodies are {"detail": ...} and never echo a submitted value. '
                "Generated from the route table and contracts/ by `payments docs write`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
