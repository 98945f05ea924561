"""`payments nats provision`: idempotent, `--check` reports drift (exit 1) and changes nothing,
a plain run fixes the drift. Run as the operator runs it: the console script, against a real
nats-server."""

from __future__ import annotations

import os
from pathlib import Path

from contracts.streams import ALL_CONSUMERS, ALL_STREAMS, DUPLICATE_WINDOW_S, HEALTH, MAX_DELIVER
from contracts.streams import REGISTRY_HEALTH_CONSUMER as HEALTH_DURABLE
from shared.embedded_nats import EmbeddedNats
from shared.nats_client import connect
from shared.settings import build_settings
from tests.e2e import CliResult, run_cli

CONSUMER = f"{HEALTH_DURABLE.stream}/{HEALTH_DURABLE.durable}"


def cli_env(nats: EmbeddedNats, tmp: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAYMENTS_")}
    return {
        **env,
        "PAYMENTS_NATS_URL": nats.url,
        "PAYMENTS_DATA_DIR": str(tmp / "data"),
        **nats.passwords.env(),
    }


def actions(result: CliResult) -> dict[str, str]:
    """`kind name: action (details)` lines, by `kind name`."""
    found = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition(": ")
        found[name] = rest
    return found


def expected_names() -> set[str]:
    streams = {f"stream {spec.name}" for spec in ALL_STREAMS}
    return streams | {f"consumer {spec.stream}/{spec.durable}" for spec in ALL_CONSUMERS}


async def test_provision_is_idempotent_and_check_reports_and_fixes_drift(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = cli_env(nats_server, tmp_path)
    created = await run_cli(env, "nats", "provision")
    assert created.code == 0, created
    assert set(actions(created)) == expected_names()
    assert set(actions(created).values()) == {"created"}

    again = await run_cli(env, "nats", "provision")
    assert again.code == 0, again
    assert set(actions(again)) == expected_names()
    assert set(actions(again).values()) == {"ok"}, again.stdout

    settings = build_settings(nats_url=nats_server.url, nats_ops_password=nats_server.passwords.ops)
    nc = await connect(settings, "ops", "test-drift")
    js = nc.jetstream()
    try:
        consumer = (await js.consumer_info(HEALTH.name, HEALTH_DURABLE.durable)).config
        consumer.max_deliver = 3
        await js.add_consumer(HEALTH.name, consumer)
        stream = (await js.stream_info(HEALTH.name)).config
        stream.duplicate_window = 30.0
        await js.update_stream(stream)

        check = await run_cli(env, "nats", "provision", "--check")
        assert check.code == 1, check
        found = actions(check)
        assert found[f"consumer {CONSUMER}"] == (
            f"drift (max_deliver: expected {MAX_DELIVER!r}, found 3)"
        )
        assert found[f"stream {HEALTH.name}"] == (
            f"drift (duplicate_window: expected {DUPLICATE_WINDOW_S!r}, found 30.0)"
        )
        others = {
            k: v for k, v in found.items() if k not in (f"consumer {CONSUMER}", "stream HEALTH")
        }
        assert set(others.values()) == {"ok"}, check.stdout
        # --check changed nothing.
        assert (await js.consumer_info(HEALTH.name, HEALTH_DURABLE.durable)).config.max_deliver == 3
        assert (await js.stream_info(HEALTH.name)).config.duplicate_window == 30.0

        fixed = await run_cli(env, "nats", "provision")
        assert fixed.code == 0, fixed
        assert actions(fixed)[f"consumer {CONSUMER}"].startswith("updated (max_deliver")
        assert actions(fixed)[f"stream {HEALTH.name}"].startswith("updated (duplicate_window")
        info = await js.consumer_info(HEALTH.name, HEALTH_DURABLE.durable)
        assert info.config.max_deliver == MAX_DELIVER
        assert (await js.stream_info(HEALTH.name)).config.duplicate_window == DUPLICATE_WINDOW_S
    finally:
        await nc.close()

    clean = await run_cli(env, "nats", "provision", "--check")
    assert clean.code == 0, clean
    assert set(actions(clean).values()) == {"ok"}, clean.stdout
