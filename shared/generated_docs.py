"""`payments docs write`: docs/asyncapi.json and docs/openapi.json, regenerated from the code.

The api serves the same documents (GET /docs/asyncapi.json, /docs/openapi.json), generated from
its own route table and contracts/; the checked-in copies are for readers and review, and
tests/test_generated_docs.py fails when they differ from what the code generates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI_PATH = PROJECT_ROOT / "docs" / "asyncapi.json"
OPENAPI_PATH = PROJECT_ROOT / "docs" / "openapi.json"


def render(document: dict[str, Any]) -> str:
    """One stable text for a document: sorted keys, so a diff shows only real changes."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def asyncapi_text() -> str:
    from shared.asyncapi_doc import asyncapi_document

    return render(asyncapi_document())


def openapi_text(app: web.Application | None = None) -> str:
    from api.app import setup_routes
    from api.openapi import openapi_document
    from shared.asyncapi_doc import package_version

    if app is None:
        app = web.Application()
        setup_routes(app)
    return render(openapi_document(app, package_version()))


DOCUMENTS: dict[Path, Callable[[], str]] = {
    ASYNCAPI_PATH: asyncapi_text,
    OPENAPI_PATH: openapi_text,
}


def stale_documents() -> list[Path]:
    """The checked-in documents that differ from what the code generates."""
    return [
        path
        for path, make in DOCUMENTS.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != make()
    ]


def write_documents() -> list[Path]:
    for path, make in DOCUMENTS.items():
        path.write_text(make(), encoding="utf-8")
    return list(DOCUMENTS)
