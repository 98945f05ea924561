"""Request parsing: malformed JSON is a 400, a body that breaks the contract a 422.

Error messages name the field and the rule, never the submitted value.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from api.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable

ModelT = TypeVar("ModelT", bound=BaseModel)
MAX_IDEMPOTENCY_KEY_CHARS = 200


def describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


async def read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is too large") from None
    if not raw:
        raise BadRequest("Request body is empty; expected a JSON object")
    try:
        # The workers' parser, with its limits (nesting, number size, surrogates): a body the
        # ingress accepts is one a worker can decode. Its messages never echo the input.
        document = from_json(raw)
    except ValueError as error:
        raise BadRequest(f"Malformed JSON body: {error}") from None
    if contains_nul(document):
        raise BadRequest("JSON strings must not contain NUL (\\u0000) characters")
    return document


def contains_nul(document: Any) -> bool:
    """True when any key or string holds U+0000, which PostgreSQL text columns cannot store."""
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def path_id(request: web.Request, name: str, not_found: str) -> str:
    """A path identifier; one that no record can have (a NUL character) is a 404 at once."""
    value = request.match_info[name]
    if "\x00" in value:
        raise NotFound(not_found)
    return value


async def parse_body(request: web.Request, model: type[ModelT]) -> ModelT:
    document = await read_json(request)
    if not isinstance(document, dict):
        raise BadRequest("Request body must be a JSON object")
    return validate(model, document)


def validate(model: type[ModelT], document: Any) -> ModelT:
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise Unprocessable(describe(error)) from None


def idempotency_key(request: web.Request) -> str | None:
    """The client's `Idempotency-Key` header, if any: printable and at most 200 characters."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_IDEMPOTENCY_KEY_CHARS or not value.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
        )
    return value


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise Unprocessable(f"{name} must be between {low} and {high}")
    return value
