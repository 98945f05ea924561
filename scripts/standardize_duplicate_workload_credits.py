#!/usr/bin/env python3
"""Standardize credits of workloads with duplicated artifact hashes (dry run unless --apply).

Same flags as the original. Adjustments go through the ledger as adjustment events; excluded
orchestrators are left alone entirely, as the help always said.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.settings import ConfigurationError, build_settings
from shared.standardize import (
    DEFAULT_REASON,
    apply_plan,
    compute_plan,
    describe,
    load_workloads,
)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--standard-non-unique-eth", type=Decimal)
    parser.add_argument("--exclude-orchestrator", action="append", default=[])
    parser.add_argument("--participation-only", action="append", default=[])
    parser.add_argument("--apply", action="store_true", help="publish the adjustments")
    parser.add_argument("--reason", default=DEFAULT_REASON)
    parser.add_argument("--note")
    args = parser.parse_args()
    os.environ.setdefault("PAYMENTS_DATA_DIR", str(args.data_dir))
    try:
        settings = build_settings()
    except ConfigurationError as error:
        print(str(error), file=sys.stderr)
        return 2
    workloads = asyncio.run(load_workloads(settings))
    plan = compute_plan(
        workloads,
        standard_override=args.standard_non_unique_eth,
        excluded=set(args.exclude_orchestrator),
        participation_only=set(args.participation_only),
    )
    for line in describe(plan):
        print(line)
    if not args.apply:
        print("dry run: nothing written (use --apply)")
        return 0
    if plan.standard_eth <= 0 and args.standard_non_unique_eth is None:
        return 0
    for line in asyncio.run(apply_plan(settings, plan, args.reason, args.note)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
