"""Bootstrap orchestrators from `PAYMENTS_BOOTSTRAP_ORCHESTRATORS` (inline JSON) and the file
`PAYMENTS_BOOTSTRAP_ORCHESTRATORS_PATH`, plus the single-orchestrator mode's one record.

Shapes accepted, as in the original: a list of objects, a single object, or a dict keyed by id.
Entries are de-duplicated case-insensitively by id and by address (the first one wins).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts.http import RegisterRequest
from shared.settings import Settings


class BootstrapError(ValueError):
    pass


def _entries(document: Any) -> list[dict[str, Any]]:
    if isinstance(document, list):
        return [dict(item) for item in document]
    if isinstance(document, dict) and "orchestrator_id" in document:
        return [dict(document)]
    if isinstance(document, dict):
        return [{"orchestrator_id": key, **dict(value)} for key, value in document.items()]
    raise BootstrapError("bootstrap orchestrators must be a list, an object or a dict by id")


def _read_sources(settings: Settings) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if settings.bootstrap_orchestrators and settings.bootstrap_orchestrators.strip():
        found += _entries(json.loads(settings.bootstrap_orchestrators))
    path: Path = settings.resolved_bootstrap_path
    if path.is_file():
        found += _entries(json.loads(path.read_text(encoding="utf-8")))
    if settings.single_orchestrator_mode:
        found.append(
            {
                "orchestrator_id": settings.single_orchestrator_id,
                "address": settings.single_orchestrator_address,
            }
        )
    return found


def bootstrap_requests(settings: Settings) -> list[RegisterRequest]:
    """Validated, de-duplicated bootstrap registrations; raises BootstrapError on a bad entry."""
    requests: list[RegisterRequest] = []
    seen_ids: set[str] = set()
    seen_addresses: set[str] = set()
    for entry in _read_sources(settings):
        try:
            request = RegisterRequest.model_validate(entry)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BootstrapError(
                f"bootstrap orchestrator {entry.get('orchestrator_id')!r}: {where}: {first['msg']}"
            ) from None
        id_key, address_key = request.orchestrator_id.lower(), request.address.lower()
        if id_key in seen_ids or address_key in seen_addresses:
            continue
        seen_ids.add(id_key)
        seen_addresses.add(address_key)
        requests.append(request)
    return requests
