"""In-memory sliding-window rate limits, per api process (as in the original).

With several api copies each enforces its own window, so the effective limit is at most
copies × limit; registration and invite redemption are rare enough that this is acceptable.
"""

from __future__ import annotations

import time
from collections import deque

# Keys idle this long are forgotten, bounding memory under many distinct callers.
IDLE_KEY_TTL_S = 600.0
MAX_TRACKED_KEYS = 100_000


class SlidingWindow:
    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        hits = self._hits.setdefault(key, deque())
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        if len(self._hits) > MAX_TRACKED_KEYS:
            self._forget_idle(now)
        return True

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, v in self._hits.items() if not v or now - v[-1] > IDLE_KEY_TTL_S]:
            del self._hits[key]


class RateLimiter:
    """A key passes only if every window allows it."""

    def __init__(self, windows: list[SlidingWindow]) -> None:
        self.windows = windows

    def allow(self, *keys: str) -> bool:
        now = time.monotonic()
        return all(window.allow(key, now) for key in keys for window in self.windows)
