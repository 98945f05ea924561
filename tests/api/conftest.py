"""One stack per database backend shared by every api test (package scope): nats-server, the
database, one registry worker (with an address denylist), the api under test (admin token, small
body limit) and api variants that differ only in their auth settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e import BACKENDS, Stack, orchestrator, orchestrator_row, running_stack
from tests.harness import wait_for

ORCH_ID = "orch-1"
PUBLIC_IP = "198.51.100.20"
HEALTH_URL = "http://198.51.100.20:7000/health"
DENIED_ADDRESS = "0x" + "dead" * 10
MAX_BODY_BYTES = 8192
VIEWER_TOKENS = ("viewer-one", "viewer-two")
MANAGER_IP = "10.9.9.9"
# Extra api processes beside the stack's own; a None value removes the variable.
API_VARIANTS: dict[str, dict[str, str | None]] = {
    "no-token": {"PAYMENTS_API_ADMIN_TOKEN": None},
    "dev-open": {"PAYMENTS_API_ADMIN_TOKEN": None, "PAYMENTS_INSECURE_DEV_MODE": "true"},
    # Viewers, a manager allowlist that trusts no proxy, and a small registration burst.
    "viewers": {
        "PAYMENTS_VIEWER_TOKENS": " , ".join(VIEWER_TOKENS),
        "PAYMENTS_MANAGER_IP_ALLOWLIST": f"{MANAGER_IP}/32",
        "PAYMENTS_REGISTRATION_BURST": "2",
    },
    "trusted-proxy": {
        "PAYMENTS_MANAGER_IP_ALLOWLIST": f"{MANAGER_IP}/32",
        "PAYMENTS_TRUSTED_PROXY_CIDRS": "127.0.0.1/32",
    },
}


@pytest_asyncio.fixture(scope="package", loop_scope="package", params=BACKENDS)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp(f"api-{request.param}")
    bootstrap = [orchestrator(ORCH_ID, "1", host_public_ip=PUBLIC_IP, health_url=HEALTH_URL)]
    async with running_stack(
        request.param,
        tmp,
        bootstrap=bootstrap,
        # Mixed case: the denylist is matched case-insensitively.
        worker_env={"PAYMENTS_ADDRESS_DENYLIST": "0x" + DENIED_ADDRESS[2:].upper()},
        api_env={"PAYMENTS_API_MAX_BODY_BYTES": str(MAX_BODY_BYTES)},
        api_variants=API_VARIANTS,
    ) as stack:
        await wait_for(lambda: orchestrator_row(stack, ORCH_ID), timeout_s=20)
        yield stack
