"""`payments`: the operator's command line.

payments stack run                 start the embedded stack (what `make run` does)
payments api                       run the HTTP api alone
payments nats provision [--check]  create streams and consumers, or only report drift
payments db upgrade                migrate the database to the newest schema
payments dlq list [--all]          list dead letters
payments dlq retry ID... | --all   publish dead letters again to their original subjects
payments devchain [--port N]       Anvil with the TicketBroker double, for tests and demos
payments status [--json]           every stream, and every consumer with its lag
payments backup --out DIR          the database, the audit files and every stream's snapshot
payments restore --from DIR        put a backup back into an empty database and NATS server
payments docs write [--check]      regenerate docs/asyncapi.json and docs/openapi.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.settings import ConfigurationError, Settings, build_settings

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_stack_run(args: argparse.Namespace, settings: Settings) -> int:
    from shared.stack import run_stack

    return run_stack()


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from api.app import main as api_main

    api_main()
    return 0


def cmd_provision(args: argparse.Namespace, settings: Settings) -> int:
    from shared.nats_client import connect
    from shared.provisioning import provision

    async def run() -> int:
        nc = await connect(settings, "ops", "payments-cli")
        try:
            results = await provision(
                nc.jetstream(), settings.stream_replicas, update=not args.check
            )
        finally:
            await nc.close()
        for result in results:
            print(result.line())
        return 1 if any(r.action == "drift" for r in results) else 0

    return asyncio.run(run())


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from shared.db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    print(f"database {settings.database_url_for_display} is at the newest schema")
    return 0


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from shared.dead_letter_ops import list_dead_letters

    for line in asyncio.run(
        list_dead_letters(settings, include_retried=args.all, limit=args.limit)
    ):
        print(line)
    return 0


def cmd_dlq_retry(args: argparse.Namespace, settings: Settings) -> int:
    from shared.dead_letter_ops import retry_dead_letters

    if not args.ids and not args.all:
        print("give dead-letter ids or --all", file=sys.stderr)
        return 2
    for line in asyncio.run(retry_dead_letters(settings, args.ids, retry_all=args.all)):
        print(line)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from shared.replay import ReplayError, replay

    try:
        reports = asyncio.run(replay(settings, args.into, progress=not args.quiet))
    except ReplayError as error:
        print(f"replay refused: {error}", file=sys.stderr)
        return 2
    for r in reports:
        print(
            f"{r.consumer}: {r.messages} messages, {r.applied} applied, "
            f"{r.duplicates} duplicates, {r.dead} dead-lettered"
        )
    return 0


async def ledger_stream_messages(settings: Settings) -> int | None:
    """How many messages the LEDGER stream holds, or None when NATS cannot be asked."""
    from contracts.streams import LEDGER
    from shared.nats_client import connect_once

    try:
        nc = await connect_once(settings, "ops", "payments-reconcile")
    except Exception:
        return None
    try:
        return int((await nc.jetstream().stream_info(LEDGER.name)).state.messages)
    finally:
        await nc.close()


def add_reconcile_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--data-dir", type=Path, help="data folder (its SQLite database)")
    command.add_argument("--registry", help="accepted for old scripts; ids are canonical")
    command.add_argument("--no-registry-canonicalize", action="store_true", help="accepted; no-op")
    command.add_argument("--label", default="live")
    command.add_argument("--out", type=Path, help="markdown report (stdout if omitted)")
    command.add_argument("--top", type=int, default=25)
    command.add_argument("--against", help="database URL to compare with (a replay)")
    command.add_argument("--write-reconciled-balances", type=Path)
    command.add_argument("--write-mismatches-json", type=Path)
    command.add_argument("--write-workload-hash-index-json", type=Path)
    command.add_argument("--write-workload-hash-unique-md", type=Path)
    command.add_argument("--write-workload-hash-dupes-md", type=Path)
    command.add_argument("--no-stream-check", action="store_true", help="do not ask NATS")


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Writes the report; exits 1 when anything disagrees, so operators can alert on it."""
    from shared.reconcile import reconcile, write_outputs

    if args.data_dir is not None:
        settings = build_settings(data_dir=args.data_dir)
    stream_messages = (
        None if args.no_stream_check else asyncio.run(ledger_stream_messages(settings))
    )
    result = asyncio.run(
        reconcile(
            settings.resolved_database_url,
            label=args.label,
            top=args.top,
            against_url=args.against,
            stream_messages=stream_messages,
        )
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result.markdown, encoding="utf-8")
    else:
        print(result.markdown)
    write_outputs(
        result,
        {
            "reconciled_balances": args.write_reconciled_balances,
            "mismatches_json": args.write_mismatches_json,
            "hash_index_json": args.write_workload_hash_index_json,
            "hash_unique_md": args.write_workload_hash_unique_md,
            "hash_dupes_md": args.write_workload_hash_dupes_md,
        },
    )
    print(
        f"mismatches: {len(result.mismatches)}; replay differences: "
        f"{len(result.replay_differences)}; "
        f"entries missing from LEDGER stream: {result.stream_gap}",
        file=sys.stderr,
    )
    return 0 if result.clean else 1


def cmd_secrets_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.secrets_box import SecretKeyError
    from shared.secrets_rotation import rotate

    try:
        resealed, current = asyncio.run(rotate(settings))
    except (SecretKeyError, ValueError) as error:
        print(f"rotation failed: {error}", file=sys.stderr)
        return 1
    print(f"re-sealed {resealed} image secrets; {current} were already under the current key")
    return 0


def cmd_devchain(args: argparse.Namespace, settings: Settings) -> int:
    from shared.chain.devchain import run_devchain

    return run_devchain(port=args.port, recipients=args.recipient or ())


async def dead_letters_waiting(settings: Settings) -> int | None:
    """Dead letters not yet retried, or None when the database cannot be asked."""
    from sqlalchemy import func, select
    from sqlmodel import col

    from shared.db.engine import make_engine
    from shared.db.models import DeadLetter

    engine = make_engine(settings.resolved_database_url, writer=False)
    try:
        async with engine.connect() as connection:
            query = (
                select(func.count()).select_from(DeadLetter).where(col(DeadLetter.status) == "dead")
            )
            return int((await connection.execute(query)).scalar_one())
    except Exception:
        return None
    finally:
        await engine.dispose()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 1 when a stream or consumer is missing, or a consumer lags more than --max-lag."""
    from shared.nats_client import connect_once
    from shared.status import gather, render

    async def run() -> int:
        try:
            nc = await connect_once(settings, "ops", "payments-status")
        except Exception as error:
            print(f"NATS at {settings.resolved_nats_url} is unreachable: {type(error).__name__}")
            return 2
        try:
            status = await gather(nc.jetstream())
        finally:
            await nc.close()
        waiting = None if args.no_database else await dead_letters_waiting(settings)
        if args.json:
            print(status.to_json())
        else:
            print(render(status))
            if waiting is not None:
                print(f"\ndead letters waiting: {waiting} (payments dlq list)")
        ours = [c for c in status.consumers if c.defined]
        lagging = args.max_lag is not None and any(c.lag > args.max_lag for c in ours)
        return 1 if status.missing_streams or status.missing_consumers or lagging else 0

    return asyncio.run(run())


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from shared.backup import BackupError, backup

    try:
        manifest = asyncio.run(backup(settings, args.out))
    except BackupError as error:
        print(f"backup failed: {error}", file=sys.stderr)
        return 1
    for line in manifest.lines():
        print(line)
    print(f"backup written to {args.out} ({len(manifest.files)} files, checksums in manifest.json)")
    print(
        "it holds the database (sealed secrets, token hashes): keep it as private as the "
        "database; PAYMENTS_SECRET_KEY is not in it"
    )
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from shared.backup import BackupError, BackupFailed, restore

    try:
        lines = asyncio.run(restore(settings, args.source))
    except BackupFailed as error:
        print(f"restore failed: {error}", file=sys.stderr)
        return 1
    except BackupError as error:
        print(f"restore refused: {error}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print(
        "restored; start the workers: they deliver every stream again and apply only what "
        "the database lacks. Then `payments reconcile`."
    )
    return 0


def cmd_docs_write(args: argparse.Namespace, settings: Settings) -> int:
    from shared.generated_docs import stale_documents, write_documents

    if args.check:
        stale = stale_documents()
        for path in stale:
            print(f"{path} differs from the code: run `payments docs write`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_documents():
        print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="payments", description="Payments pipeline operations.")
    groups = root.add_subparsers(dest="group", required=True)

    stack = groups.add_parser("stack", help="the embedded stack").add_subparsers(
        dest="action", required=True
    )
    stack.add_parser("run", help="start NATS, migrate, run the api and every worker").set_defaults(
        func=cmd_stack_run
    )

    groups.add_parser("api", help="run the HTTP api").set_defaults(func=cmd_api)

    nats_group = groups.add_parser("nats", help="NATS JetStream").add_subparsers(
        dest="action", required=True
    )
    provision = nats_group.add_parser("provision", help="create or check streams and consumers")
    provision.add_argument("--check", action="store_true", help="only report drift, change nothing")
    provision.set_defaults(func=cmd_provision)

    db = groups.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="run migrations").set_defaults(func=cmd_db_upgrade)

    dlq = groups.add_parser("dlq", help="dead letters").add_subparsers(dest="action", required=True)
    listing = dlq.add_parser("list", help="list dead letters")
    listing.add_argument("--all", action="store_true", help="include retried ones")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(func=cmd_dlq_list)
    retry = dlq.add_parser("retry", help="publish dead letters again")
    retry.add_argument("ids", nargs="*", type=int)
    retry.add_argument("--all", action="store_true", help="every dead letter not yet retried")
    retry.set_defaults(func=cmd_dlq_retry)

    replay = groups.add_parser("replay", help="rebuild every projection into an empty database")
    replay.add_argument("--into", required=True, help="database URL of an empty database")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=cmd_replay)

    secrets_group = groups.add_parser("secrets", help="image secrets").add_subparsers(
        dest="action", required=True
    )
    secrets_group.add_parser(
        "rotate", help="re-seal every image secret under PAYMENTS_SECRET_KEY"
    ).set_defaults(func=cmd_secrets_rotate)

    reconcile = groups.add_parser("reconcile", help="ledger reconciliation report")
    add_reconcile_arguments(reconcile)
    reconcile.set_defaults(func=cmd_reconcile)

    devchain = groups.add_parser(
        "devchain", help="Anvil on 127.0.0.1 with the TicketBroker double deployed (dev only)"
    )
    devchain.add_argument("--port", type=int, default=8545, help="RPC port (default 8545)")
    devchain.add_argument(
        "--recipient",
        action="append",
        metavar="ADDRESS",
        help="a registered, active recipient; repeat for more (default: Anvil accounts 1-3)",
    )
    devchain.set_defaults(func=cmd_devchain)
    status = groups.add_parser("status", help="streams, consumers and their lag")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--max-lag", type=int, help="exit 1 when one of our consumers lags more than this"
    )
    status.add_argument(
        "--no-database", action="store_true", help="do not count dead letters in the database"
    )
    status.set_defaults(func=cmd_status)

    backup = groups.add_parser("backup", help="back up the database, audit files and streams")
    backup.add_argument("--out", required=True, type=Path, help="a new or empty folder")
    backup.set_defaults(func=cmd_backup)

    restore = groups.add_parser("restore", help="restore a backup into an empty deployment")
    restore.add_argument("--from", dest="source", required=True, type=Path, help="backup folder")
    restore.set_defaults(func=cmd_restore)

    docs = groups.add_parser("docs", help="generated documents").add_subparsers(
        dest="action", required=True
    )
    write = docs.add_parser("write", help="write docs/asyncapi.json and docs/openapi.json")
    write.add_argument("--check", action="store_true", help="only report stale documents")
    write.set_defaults(func=cmd_docs_write)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = build_settings()
    except ConfigurationError as error:
        print(str(error), file=sys.stderr)
        return 2
    command: Command = args.func
    return command(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
