"""Hashing and constant-time comparison for tokens and codes."""

from __future__ import annotations

import hashlib
import hmac


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def token_matches(presented: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an unset expectation never matches."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def matches_any(presented: str | None, expected: list[str]) -> bool:
    """Checks every candidate, so the time taken does not reveal which one matched."""
    found = False
    for candidate in expected:
        found = token_matches(presented, candidate) or found
    return found
