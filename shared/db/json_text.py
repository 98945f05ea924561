"""How JSON columns are written: orjson's encoder, with the standard library's as the fallback.

Why: every ledger entry and inbox row carries a JSON column, and SQLAlchemy's default encoder
(`json.dumps`) was about 3.5 % of the ledger worker's CPU (py-spy, bench/README.md, session 8);
orjson writes the same values several times faster. Its text is compact UTF-8 rather than
`json.dumps`'s spaced, ASCII-escaped form: the same JSON value, which is all any reader
(SQLAlchemy's `json.loads`, PostgreSQL's JSON types) sees.

Where orjson refuses a value (an integer beyond 64 bits, a key that is not a string) the
standard encoder writes it, so whatever was stored before is stored now. One difference is
kept on purpose: a non-finite float is written as null, where `json.dumps` wrote the non-JSON
token NaN, which PostgreSQL refuses (a replay into it would stop at that row).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)
