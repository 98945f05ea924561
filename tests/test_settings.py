"""A misconfiguration stops start-up with exactly one clear line naming the variable, exit code 2,
before anything is touched."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from shared import cli
from shared.settings import build_settings
from tests.e2e import run_cli
from tests.harness import PROJECT_ROOT

MISCONFIGURATIONS = [
    ({"PAYMENTS_API_PORT": "abc"}, "PAYMENTS_API_PORT"),
    ({"PAYMENTS_API_PORT": "70000"}, "PAYMENTS_API_PORT"),
    ({"PAYMENTS_API_MAX_BODY_BYTES": "12"}, "PAYMENTS_API_MAX_BODY_BYTES"),
    ({"PAYMENTS_INSECURE_DEV_MODE": "perhaps"}, "PAYMENTS_INSECURE_DEV_MODE"),
    ({"PAYMENTS_TRUSTED_PROXY_CIDRS": "10.0.0.0/33"}, "PAYMENTS_TRUSTED_PROXY_CIDRS"),
    ({"PAYMENTS_MANAGER_IP_ALLOWLIST": "office"}, "PAYMENTS_MANAGER_IP_ALLOWLIST"),
    ({"PAYMENTS_ADDRESS_DENYLIST": "0x1234"}, "PAYMENTS_ADDRESS_DENYLIST"),
    ({"PAYMENTS_BOOTSTRAP_ORCHESTRATORS": "{not json"}, "PAYMENTS_BOOTSTRAP_ORCHESTRATORS"),
    ({"PAYMENTS_FORWARDER_HEALTH_TTL_SECONDS": "0"}, "PAYMENTS_FORWARDER_HEALTH_TTL_SECONDS"),
    ({"TOP_CACHE_TTL_SECONDS": "-1"}, "TOP_CACHE_TTL_SECONDS"),
    ({"PAYMENTS_SINGLE_ORCHESTRATOR_MODE": "true"}, "PAYMENTS_SINGLE_ORCHESTRATOR_MODE"),
]


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENTS_")}
    env["PAYMENTS_DATA_DIR"] = str(tmp / "data")
    return env


async def test_payments_db_upgrade_exits_2_with_one_line_naming_the_variable(
    tmp_path: Path,
) -> None:
    """The console script, as an operator runs it."""
    result = await run_cli({**base_env(tmp_path), "PAYMENTS_API_PORT": "abc"}, "db", "upgrade")
    assert result.code == 2, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "configuration error: PAYMENTS_API_PORT: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]
    assert not (tmp_path / "data").exists(), "nothing may be created before the check"


@pytest.mark.parametrize(
    ("overrides", "variable"), MISCONFIGURATIONS, ids=[v for _o, v in MISCONFIGURATIONS]
)
def test_each_misconfiguration_is_one_line_naming_its_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    variable: str,
) -> None:
    for name in [name for name in os.environ if name.startswith("PAYMENTS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PAYMENTS_DATA_DIR", str(tmp_path / "data"))
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["db", "upgrade"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("configuration error: ") and variable in lines[0], lines
    assert not (tmp_path / "data").exists(), "nothing may be created before the check"


async def test_a_valid_configuration_migrates(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "PAYMENTS_API_PORT": "8099"}
    (tmp_path / "data").mkdir()
    for _ in range(2):  # idempotent
        result = await run_cli(env, "db", "upgrade")
        assert result.code == 0, result
        assert "is at the newest schema" in result.stdout
    assert (tmp_path / "data" / "payments.db").is_file()


@pytest.mark.parametrize("entry", ["api", "worker"])
async def test_api_and_worker_refuse_a_misconfiguration_in_one_line(
    tmp_path: Path, entry: str
) -> None:
    argv = (
        [sys.executable, "-m", "api.app"]
        if entry == "api"
        else [str(Path(sys.executable).parent / "faststream"), "run", "workers.registry:app"]
    )
    process = await asyncio.create_subprocess_exec(
        *argv,
        env={**base_env(tmp_path), "PAYMENTS_API_PORT": "abc", "PYTHONPATH": str(PROJECT_ROOT)},
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, (stdout, stderr)
    lines = [line for line in (stdout + stderr).decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "PAYMENTS_API_PORT" in lines[0]


def test_the_database_url_is_shown_without_its_password() -> None:
    settings = build_settings(
        database_url="postgresql+asyncpg://payments:s3cret-pw@db:5432/payments"
    )
    shown = settings.database_url_for_display
    assert "s3cret-pw" not in shown
    assert shown == "postgresql+asyncpg://payments:***@db:5432/payments"
