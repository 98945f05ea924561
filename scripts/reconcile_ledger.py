#!/usr/bin/env python3
"""Ledger reconciliation report, with the original script's flags: `payments reconcile`.

`--data-dir` selects the data folder (its SQLite database) unless PAYMENTS_DATABASE_URL names
another database. `--registry` and `--no-registry-canonicalize` are accepted for old cron lines
and do nothing: orchestrator ids in the ledger are already canonical.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reconcile", *sys.argv[1:]]))
