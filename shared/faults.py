"""Named fault points that tests turn into a crash, in the manner of FoundationDB's BUGGIFY.

`PAYMENTS_FAULT_POINTS` holds a comma-separated list of armed point names. An armed point kills
the process with `os._exit`, as SIGKILL would: no cleanup, no ack, no flush. In production the
variable is unset and a fault point costs one set lookup.
"""

from __future__ import annotations

import os
import sys

FAULT_POINTS_ENV = "PAYMENTS_FAULT_POINTS"
FAULT_EXIT_CODE = 86


def _armed_points() -> frozenset[str]:
    raw = os.environ.get(FAULT_POINTS_ENV, "")
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


ARMED_POINTS = _armed_points()


def fault_point(name: str) -> None:
    """Crash here if a test armed this point."""
    if name in ARMED_POINTS:
        sys.stderr.write(f"fault point {name} reached: exiting with {FAULT_EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
