"""`payments reconcile`: the ledger reconciliation report, from our database and streams.

The original's report (original-behaviour §10.1), rebuilt on the append-only ledger:
top balances, balance breakdown, credit reasons, balance-versus-entries mismatches, test runs,
and the workload sections (credit consistency, artifact hash uniqueness, uncredited workloads).
With `--against <url>` (a database `payments replay` rebuilt) it also lists every orchestrator
whose balance or entries differ between the two. It also compares the LEDGER stream with the
entries, so an entry that never reached downstream readers shows.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Balance, LedgerEntry, Workload
from shared.db.repositories import outbox as outbox_repo
from shared.db.repositories import workloads as workload_rules
from shared.money import wei_to_eth

MISMATCH_ROWS_MAX = 200
TABLE_ROWS_MAX = 50
REASONS_TOP = 25
CREDITABLE = ("verified", "paid")


@dataclass
class Mismatch:
    orchestrator_id: str
    stored_wei: int
    reconstructed_wei: int

    def as_json(self, stored_label: str = "balances_table") -> dict[str, str]:
        return {
            "orchestrator_id": self.orchestrator_id,
            stored_label: wei_to_eth(self.stored_wei),
            "reconstructed": wei_to_eth(self.reconstructed_wei),
            "delta": wei_to_eth(self.stored_wei - self.reconstructed_wei),
        }


@dataclass
class LedgerFacts:
    entries: list[LedgerEntry]
    balances: dict[str, int]
    credits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payouts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sums: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_reason: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    reason_totals: Counter[str] = field(default_factory=Counter)
    reason_counts: Counter[str] = field(default_factory=Counter)
    test_runs: Counter[str] = field(default_factory=Counter)
    workload_credit_keys: Counter[str] = field(default_factory=Counter)


async def load_ledger(session: AsyncSession) -> LedgerFacts:
    entries = list(
        (await session.execute(select(LedgerEntry).order_by(col(LedgerEntry.id)))).scalars()
    )
    rows = await session.execute(select(col(Balance.orchestrator_id), col(Balance.balance_wei)))
    facts = LedgerFacts(entries=entries, balances={oid: int(b) for oid, b in rows.all()})
    for entry in entries:
        oid, delta = entry.orchestrator_id, entry.amount_wei
        facts.sums[oid] += delta
        facts.by_reason[oid][entry.reason] += delta
        if entry.reason == "payout" and delta < 0:
            facts.payouts[oid] += -delta
        elif delta > 0:
            facts.credits[oid] += delta
            facts.reason_totals[entry.reason] += delta
            facts.reason_counts[entry.reason] += 1
        metadata = entry.entry_metadata or {}
        if metadata.get("test_run_id"):
            facts.test_runs[str(metadata["test_run_id"])] += 1
        if entry.reason.startswith("workload") and metadata.get("workload_id"):
            facts.workload_credit_keys[str(metadata["workload_id"])] += 1
    return facts


def balance_mismatches(facts: LedgerFacts) -> list[Mismatch]:
    ids = sorted(set(facts.balances) | set(facts.sums))
    return [
        Mismatch(oid, facts.balances.get(oid, 0), facts.sums.get(oid, 0))
        for oid in ids
        if facts.balances.get(oid, 0) != facts.sums.get(oid, 0)
    ]


def replay_differences(live: LedgerFacts, rebuilt: LedgerFacts) -> list[str]:
    """Orchestrators whose balance or set of entries differs between live and rebuilt."""

    def entry_set(facts: LedgerFacts) -> dict[str, set[tuple[str, int, str]]]:
        found: dict[str, set[tuple[str, int, str]]] = defaultdict(set)
        for e in facts.entries:
            found[e.orchestrator_id].add((e.entry_key, e.amount_wei, e.reason))
        return found

    live_entries, rebuilt_entries = entry_set(live), entry_set(rebuilt)
    ids = sorted(
        set(live.balances) | set(rebuilt.balances) | set(live_entries) | set(rebuilt_entries)
    )
    differing = []
    for oid in ids:
        if live.balances.get(oid, 0) != rebuilt.balances.get(oid, 0):
            differing.append(
                f"{oid}: balance {wei_to_eth(live.balances.get(oid, 0))} live vs "
                f"{wei_to_eth(rebuilt.balances.get(oid, 0))} rebuilt"
            )
        elif live_entries.get(oid, set()) != rebuilt_entries.get(oid, set()):
            differing.append(f"{oid}: entries differ")
    return differing


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


@dataclass
class ReconcileResult:
    markdown: str
    mismatches: list[Mismatch]
    replay_differences: list[str]
    reconciled_balances: dict[str, str]
    hash_index: list[dict[str, Any]]
    stream_gap: int

    @property
    def clean(self) -> bool:
        return not self.mismatches and not self.replay_differences and self.stream_gap == 0


def workload_sections(
    workloads: list[Workload], facts: LedgerFacts
) -> tuple[list[str], list[dict[str, Any]]]:
    lines = ["", "## Workloads", ""]
    statuses = Counter(w.status for w in workloads)
    lines += [f"- {status}: {count}" for status, count in sorted(statuses.items())]
    creditable = [w for w in workloads if w.status in CREDITABLE]
    uncredited = [
        w
        for w in creditable
        if not w.credited and (w.kind == "time" or workload_rules.has_artifact(w))
    ]
    missing_artifact = [w for w in creditable if not workload_rules.has_artifact(w)]
    lines += [
        f"- verified/paid but uncredited with an artifact: {len(uncredited)}",
        f"- verified/paid missing artifact metadata: {len(missing_artifact)}",
        "",
        "### Workload credit consistency",
        "",
    ]
    ledger_records: dict[str, int] = defaultdict(int)
    for entry in facts.entries:
        if entry.reason in ("workload", "workload_time"):
            ledger_records[entry.orchestrator_id] += entry.amount_wei
    table_credited: dict[str, int] = defaultdict(int)
    for w in workloads:
        if w.credited:
            table_credited[w.orchestrator_id] += w.payout_amount_wei
    lines.append(
        f"- ledger workload credits: {wei_to_eth(sum(ledger_records.values()))} ETH; "
        f"credited workloads: {wei_to_eth(sum(table_credited.values()))} ETH"
    )
    repeated = [key for key, count in facts.workload_credit_keys.items() if count > 1]
    lines.append(f"- workloads credited more than once: {len(repeated)}")
    rows = [
        [
            oid,
            wei_to_eth(ledger_records.get(oid, 0)),
            wei_to_eth(table_credited.get(oid, 0)),
            wei_to_eth(ledger_records.get(oid, 0) - table_credited.get(oid, 0)),
        ]
        for oid in sorted(set(ledger_records) | set(table_credited))
    ][:TABLE_ROWS_MAX]
    lines += ["", *_table(["orchestrator", "ledger", "workloads", "difference"], rows)]
    by_hash: dict[str, list[Workload]] = defaultdict(list)
    for w in creditable:
        if w.artifact_hash and w.artifact_hash.strip():
            by_hash[w.artifact_hash.strip().lower()].append(w)
    index: list[dict[str, Any]] = [
        {
            "artifact_hash": digest,
            "count": len(items),
            "workloads": [
                {
                    "workload_id": w.workload_id,
                    "orchestrator_id": w.orchestrator_id,
                    "status": w.status,
                    "credited": w.credited,
                    "payout_amount_eth": wei_to_eth(w.payout_amount_wei),
                    "artifact_uri": w.artifact_uri,
                    "artifact_hash": w.artifact_hash,
                    "plan_id": w.plan_id,
                    "run_id": w.run_id,
                }
                for w in items
            ],
        }
        for digest, items in sorted(by_hash.items())
    ]
    dupes = [item for item in index if item["count"] > 1]
    lines += [
        "",
        "### Artifact hash uniqueness (verified/paid workloads)",
        "",
        f"- unique hashes: {len(index) - len(dupes)}; duplicated hashes: {len(dupes)}",
        "",
    ]
    lines += _table(
        ["artifact_hash", "count", "orchestrators"],
        [
            [
                d["artifact_hash"],
                d["count"],
                ", ".join(sorted({w["orchestrator_id"] for w in d["workloads"]})),
            ]
            for d in sorted(dupes, key=lambda d: -d["count"])[:TABLE_ROWS_MAX]
        ],
    )
    no_hash = sorted(
        (w for w in creditable if not (w.artifact_hash or "").strip()),
        key=lambda w: -w.payout_amount_wei,
    )[:TABLE_ROWS_MAX]
    lines += ["", "### Verified/paid workloads missing artifact_hash (top 50 by payout)", ""]
    lines += _table(
        ["workload", "orchestrator", "payout_eth"],
        [[w.workload_id, w.orchestrator_id, wei_to_eth(w.payout_amount_wei)] for w in no_hash],
    )
    top_uncredited = sorted(uncredited, key=lambda w: -w.payout_amount_wei)[:TABLE_ROWS_MAX]
    lines += ["", "### Uncredited workloads (top 50 by payout_amount_eth)", ""]
    lines += _table(
        ["workload", "orchestrator", "status", "payout_eth"],
        [
            [w.workload_id, w.orchestrator_id, w.status, wei_to_eth(w.payout_amount_wei)]
            for w in top_uncredited
        ],
    )
    return lines, index


def render(
    label: str,
    database_url: str,
    facts: LedgerFacts,
    mismatches: list[Mismatch],
    differences: list[str] | None,
    workloads: list[Workload],
    top: int,
    stream_messages: int | None,
    unpublished: int,
) -> tuple[str, list[dict[str, Any]]]:
    entries = facts.entries
    window = (
        f"{entries[0].occurred_at.isoformat()} .. {entries[-1].occurred_at.isoformat()}"  # type: ignore[union-attr]
        if entries
        else "empty"
    )
    totals = Counter(
        {r: sum(v.get(r, 0) for v in facts.by_reason.values()) for r in facts.reason_counts}
    )
    lines = [
        f"# Payments Ledger Reconciliation ({label})",
        "",
        f"- generated at: {datetime.now(UTC).isoformat()}",
        f"- database: {database_url.split('@')[-1]}",
        f"- ledger entries: {len(entries)} (window {window})",
        f"- total delta: {wei_to_eth(sum(facts.sums.values()))} ETH",
        f"- workload credits: records {wei_to_eth(totals.get('workload', 0))}, "
        f"other {wei_to_eth(totals.get('workload_time', 0))}",
        f"- accrued: session {wei_to_eth(totals.get('session_time', 0))}, "
        f"adjustment {wei_to_eth(facts.reason_totals.get('adjustment', 0))}",
        f"- payouts: {wei_to_eth(sum(facts.payouts.values()))} ETH",
        f"- test events: {sum(facts.test_runs.values())}",
        f"- LEDGER stream messages: {'unknown' if stream_messages is None else stream_messages}; "
        f"unpublished outbox rows: {unpublished}",
        "",
        "## Top Balances",
        "",
    ]
    ranked = sorted(facts.balances.items(), key=lambda item: -item[1])[:top]
    lines += _table(
        ["orchestrator", "credits", "payouts", "balance"],
        [
            [
                oid,
                wei_to_eth(facts.credits.get(oid, 0)),
                wei_to_eth(facts.payouts.get(oid, 0)),
                wei_to_eth(bal),
            ]
            for oid, bal in ranked
        ],
    )
    lines += ["", "## Balance Breakdown (top balances)", ""]

    def reason_sum(oid: str, *names: str) -> int:
        return sum(facts.by_reason[oid].get(n, 0) for n in names)

    breakdown = []
    for oid, bal in ranked:
        other = sum(
            v
            for r, v in facts.by_reason[oid].items()
            if r not in ("workload", "workload_time", "session_time", "adjustment", "payout")
            and v > 0
        )
        breakdown.append(
            [
                oid,
                wei_to_eth(bal),
                wei_to_eth(reason_sum(oid, "workload", "workload_time")),
                wei_to_eth(reason_sum(oid, "session_time", "adjustment") + other),
                wei_to_eth(reason_sum(oid, "session_time")),
                wei_to_eth(reason_sum(oid, "adjustment")),
                wei_to_eth(other),
                wei_to_eth(-reason_sum(oid, "payout")),
            ]
        )
    lines += _table(
        [
            "orchestrator",
            "balance",
            "workload",
            "accrued",
            "session",
            "adjustment",
            "other credit",
            "payout",
        ],
        breakdown,
    )
    lines += ["", f"## Credit Reasons (top {REASONS_TOP})", ""]
    lines += _table(
        ["reason", "entries", "credited_eth"],
        [
            [r, facts.reason_counts[r], wei_to_eth(v)]
            for r, v in facts.reason_totals.most_common(REASONS_TOP)
        ],
    )
    lines += [
        "",
        "## Mismatches (balances vs ledger entries)",
        "",
        f"- mismatches: {len(mismatches)}",
        "",
    ]
    lines += _table(
        ["orchestrator", "balances table", "sum of entries", "delta"],
        [
            [
                m.orchestrator_id,
                wei_to_eth(m.stored_wei),
                wei_to_eth(m.reconstructed_wei),
                wei_to_eth(m.stored_wei - m.reconstructed_wei),
            ]
            for m in mismatches[:MISMATCH_ROWS_MAX]
        ],
    )
    if differences is not None:
        lines += ["", "## Replay comparison", "", f"- differing orchestrators: {len(differences)}"]
        lines += [f"- {line}" for line in differences[:MISMATCH_ROWS_MAX]]
    lines += ["", "## Test Runs", ""]
    lines += _table(
        ["test_run_id", "entries"], [[k, v] for k, v in sorted(facts.test_runs.items())]
    )
    index: list[dict[str, Any]] = []
    if workloads:
        more, index = workload_sections(workloads, facts)
        lines += more
    return "\n".join(lines) + "\n", index


async def reconcile(
    database_url: str,
    *,
    label: str = "live",
    top: int = 25,
    against_url: str | None = None,
    stream_messages: int | None = None,
) -> ReconcileResult:
    engine = make_engine(database_url, writer=False)
    try:
        async with make_sessionmaker(engine)() as session:
            facts = await load_ledger(session)
            workloads = list((await session.execute(select(Workload))).scalars())
            unpublished = await outbox_repo.pending_count(session)
    finally:
        await engine.dispose()
    differences = None
    if against_url is not None:
        other = make_engine(against_url, writer=False)
        try:
            async with make_sessionmaker(other)() as session:
                differences = replay_differences(facts, await load_ledger(session))
        finally:
            await other.dispose()
    mismatches = balance_mismatches(facts)
    markdown, index = render(
        label,
        database_url,
        facts,
        mismatches,
        differences,
        workloads,
        top,
        stream_messages,
        unpublished,
    )
    ledger_messages_expected = len(facts.entries) - unpublished
    gap = 0 if stream_messages is None else max(0, ledger_messages_expected - stream_messages)
    return ReconcileResult(
        markdown=markdown,
        mismatches=mismatches,
        replay_differences=differences or [],
        reconciled_balances={oid: wei_to_eth(v) for oid, v in sorted(facts.sums.items())},
        hash_index=index,
        stream_gap=gap,
    )


def write_outputs(result: ReconcileResult, options: dict[str, Path | None]) -> None:
    def dump(path: Path | None, document: Any) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    dump(options.get("reconciled_balances"), result.reconciled_balances)
    dump(options.get("mismatches_json"), [m.as_json() for m in result.mismatches])
    dump(options.get("hash_index_json"), result.hash_index)
    for key, want_dupes in (("hash_unique_md", False), ("hash_dupes_md", True)):
        path = options.get(key)
        if path is None:
            continue
        rows = [
            [i["artifact_hash"], i["count"], ", ".join(w["workload_id"] for w in i["workloads"])]
            for i in result.hash_index
            if (i["count"] > 1) == want_dupes
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "\n".join(_table(["artifact_hash", "count", "workloads"], rows)) + "\n",
            encoding="utf-8",
        )
