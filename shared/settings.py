"""Settings from the environment, keeping the original service's variable names.

`load_settings()` turns a misconfiguration into one clear line and exit code 2, so a bad
deployment stops at start-up instead of failing on the first request.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_API_PORT = 8081
DEFAULT_EMBEDDED_NATS_PORT = 4322
ADDRESS_LENGTH = 42


def _split_list(value: Any) -> list[str]:
    """Comma- or space-separated lists, as the original accepted them."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(item).strip() for item in value if str(item).strip()]
    text = str(value).replace(",", " ")
    return [item for item in text.split() if item]


def _env(*names: str) -> Any:
    """A setting read from a variable without the PAYMENTS_ prefix (the original's names)."""
    return Field(default=None, validation_alias=AliasChoices(*names))


StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYMENTS_", extra="ignore", frozen=True)

    # Where things live.
    data_dir: Path = Path("./data")
    database_url: str | None = None
    nats_url: str | None = None
    embedded_nats_port: int = Field(default=DEFAULT_EMBEDDED_NATS_PORT, ge=1, le=65535)
    nats_ingress_password: SecretStr | None = None
    nats_worker_password: SecretStr | None = None
    nats_ops_password: SecretStr | None = None
    stream_replicas: int = Field(default=1, ge=1, le=5)

    # HTTP.
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=1, le=65535)
    api_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    # SO_REUSEPORT: several api processes on one host share the port and the kernel spreads
    # connections over them (each has its own NATS connection and group commit). Off by
    # default, so a second process on a taken port fails loudly instead of sharing it.
    api_reuse_port: bool = False
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # How often each worker asks the server for every stream's and consumer's state (/metrics).
    consumer_lag_poll_seconds: float = Field(default=10.0, gt=0, le=3600)
    log_level: str = "INFO"

    # Auth.
    api_admin_token: SecretStr | None = None
    viewer_tokens: StrList = Field(default_factory=list)
    session_reporter_token: SecretStr | None = None
    insecure_dev_mode: bool = False
    trusted_proxy_cidrs: StrList = Field(default_factory=list)
    manager_ip_allowlist: StrList = Field(default_factory=list)

    # Registry.
    forwarder_health_ttl_seconds: float = Field(default=120.0, gt=0)
    # Health polling (the health-poller role) and the cooldowns misses start.
    health_poll_interval_seconds: float = Field(default=60.0, gt=0)
    health_poll_concurrency: int = Field(default=16, ge=1, le=1024)
    default_health_timeout: float = Field(default=5.0, gt=0, le=120)
    miss_threshold: int = Field(default=3, ge=1)
    cooldown_seconds: float = Field(default=3600.0, ge=0)
    default_min_service_uptime: float = Field(default=80.0, ge=0, le=100)
    session_idle_timeout_seconds: float = Field(default=120.0, gt=0)
    bootstrap_orchestrators: str | None = None
    bootstrap_orchestrators_path: Path | None = None
    bootstrap_skip_rank_validation: bool = True
    single_orchestrator_mode: bool = False
    single_orchestrator_id: str | None = _env("ORCHESTRATOR_ID")
    single_orchestrator_address: str | None = _env("ORCHESTRATOR_ADDRESS")
    address_denylist: StrList = Field(default_factory=list)
    registration_per_minute: int = Field(default=5, ge=1)
    registration_burst: int = Field(default=5, ge=1)
    audit_log_path: Path | None = None

    # Ledger.
    workload_time_credit_eth_per_minute: Decimal = Field(default=Decimal("0.000005353596"), ge=0)

    session_credit_eth_per_minute: Decimal = Field(default=Decimal("0"), ge=0)
    session_segment_seconds: int = Field(default=2400, gt=0)
    session_tick_seconds: float = Field(default=15.0, gt=0)
    activity_lease_seconds: int = Field(default=900, ge=30)
    activity_lease_max_seconds: int = Field(default=3600, ge=30)
    payout_strategy: str = "eth_transfer"

    # Image licensing.
    secret_key: SecretStr | None = None
    secret_key_previous: SecretStr | None = None
    license_lease_seconds: int = Field(default=900, ge=30)
    license_invite_default_ttl_seconds: int = Field(default=604_800, ge=60)
    license_redeem_per_minute: int = Field(default=30, ge=1)
    license_artifact_region: str | None = None
    license_artifact_presign_seconds: int = Field(default=900, ge=1, le=604_800)
    license_audit_log_path: Path | None = None
    s3_endpoint_url: str | None = None
    s3_addressing_style: str = Field(default="auto", pattern="^(auto|path|virtual)$")
    edge_config_url: str | None = None
    edge_config_token: SecretStr | None = None

    # Recording jobs: where recordings go, and the orchestrator host's services they drive.
    recordings_bucket: str | None = None
    recordings_prefix: str = Field(default="recordings", max_length=256)
    recordings_region: str | None = None
    recordings_presign_seconds: int = Field(default=3600, ge=1, le=604_800)
    job_power_port: int = Field(default=9090, ge=1, le=65535)
    job_runner_port: int = Field(default=9877, ge=1, le=65535)
    job_recorder_port: int = Field(default=8889, ge=1, le=65535)
    job_http_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    job_ready_attempts: int = Field(default=60, ge=0, le=10_000)
    job_ready_interval_seconds: float = Field(default=2.0, gt=0, le=600)
    job_poll_interval_seconds: float = Field(default=1.0, gt=0, le=600)
    job_upload_attempts: int = Field(default=90, ge=1, le=10_000)
    job_upload_interval_seconds: float = Field(default=1.0, gt=0, le=600)

    # Payouts (the original's names where it had them; see docs/payouts.md).
    payout_threshold_eth: Decimal = Field(
        default=Decimal("0.001"), gt=0, validation_alias="PAYMENT_PAYOUT_THRESHOLD_ETH"
    )
    payment_interval_seconds: float = Field(
        default=60.0, gt=0, validation_alias="PAYMENT_INTERVAL_SECONDS"
    )
    # Secure by default, as the original: nothing is signed until an operator turns this off.
    payment_dry_run: bool = Field(default=True, validation_alias="PAYMENT_DRY_RUN")
    payment_private_key: SecretStr | None = Field(
        default=None, validation_alias="PAYMENT_PRIVATE_KEY"
    )
    payment_private_key_file: Path | None = Field(
        default=None, validation_alias="PAYMENT_PRIVATE_KEY_FILE"
    )
    payment_keystore_path: Path | None = Field(
        default=None, validation_alias="PAYMENT_KEYSTORE_PATH"
    )
    payment_keystore_password: SecretStr | None = Field(
        default=None, validation_alias="PAYMENT_KEYSTORE_PASSWORD"
    )
    payout_confirmations: int = Field(default=1, ge=1, le=1000)
    payout_receipt_timeout_seconds: float = Field(default=300.0, gt=0)
    # A broadcast transaction without a receipt this long is re-sent with higher fees.
    payout_replace_after_seconds: float = Field(default=600.0, gt=0)
    # How long a payouts worker's hold on the payer account lasts unless renewed.
    payout_lease_seconds: float = Field(default=30.0, gt=0)
    # After a payout reverted or failed, its orchestrator waits this long before the next try.
    payout_retry_after_failure_seconds: float = Field(default=600.0, ge=0)
    livepeer_ticket_broker_address: str | None = None
    livepeer_deposit_autofund: bool = True
    livepeer_deposit_target_eth: Decimal = Field(default=Decimal("0.02"), ge=0)
    livepeer_deposit_low_watermark_eth: Decimal = Field(default=Decimal("0.01"), ge=0)
    livepeer_batch_payouts: bool = True
    livepeer_batch_max_tickets: int = Field(default=20, ge=1, le=200)

    # Rank check against the Livepeer BondingManager transcoder pool.
    top_contract_address: str | None = _env("TOP_CONTRACT_ADDRESS")
    top_cache_ttl_seconds: float = Field(
        default=300.0, gt=0, validation_alias="TOP_CACHE_TTL_SECONDS"
    )
    eth_rpc_url: str = Field(default="http://localhost:8545", validation_alias="ETH_RPC_URL")
    eth_chain_id: int = Field(default=42161, validation_alias="ETH_CHAIN_ID")

    @field_validator("viewer_tokens", "trusted_proxy_cidrs", "manager_ip_allowlist", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> list[str]:
        return _split_list(value)

    @field_validator("address_denylist", mode="before")
    @classmethod
    def _denylist(cls, value: Any) -> list[str]:
        addresses = sorted({item.lower() for item in _split_list(value)})
        for address in addresses:
            if len(address) != ADDRESS_LENGTH or not address.startswith("0x"):
                raise ValueError(f"not a 0x-prefixed 40-hex-digit address: {address}")
            int(address, 16)
        return addresses

    @field_validator("payout_strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("eth_transfer", "livepeer_ticket"):
            raise ValueError("must be eth_transfer or livepeer_ticket")
        return value

    @field_validator("livepeer_ticket_broker_address")
    @classmethod
    def _broker_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if len(value) != ADDRESS_LENGTH or not value.startswith("0x"):
            raise ValueError("must be a 0x-prefixed 40-hex-digit address")
        int(value, 16)
        return value

    @model_validator(mode="after")
    def _deposit_watermarks(self) -> Settings:
        if self.livepeer_deposit_autofund and not (
            self.livepeer_deposit_target_eth > 0
            and 0 <= self.livepeer_deposit_low_watermark_eth <= self.livepeer_deposit_target_eth
        ):
            raise ValueError(
                "PAYMENTS_LIVEPEER_DEPOSIT_AUTOFUND needs DEPOSIT_TARGET_ETH > 0 and "
                "0 <= DEPOSIT_LOW_WATERMARK_ETH <= DEPOSIT_TARGET_ETH"
            )
        return self

    @field_validator("trusted_proxy_cidrs", "manager_ip_allowlist")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @field_validator("bootstrap_orchestrators")
    @classmethod
    def _bootstrap_json(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            json.loads(value)
        return value

    @cached_property
    def sqlite_path(self) -> Path:
        return self.data_dir / "payments.db"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.sqlite_path.resolve()}"

    @property
    def database_url_for_display(self) -> str:
        """The database URL with its password masked: for output and logs, never the real one."""
        from sqlalchemy.engine import make_url

        return make_url(self.resolved_database_url).render_as_string(hide_password=True)

    @property
    def resolved_nats_url(self) -> str:
        return self.nats_url or f"nats://127.0.0.1:{self.embedded_nats_port}"

    @property
    def resolved_bootstrap_path(self) -> Path:
        return self.bootstrap_orchestrators_path or self.data_dir / "orchestrators.json"

    @property
    def resolved_audit_dir(self) -> Path:
        return self.data_dir / "audit"

    @property
    def admin_token_configured(self) -> bool:
        return bool(self.api_admin_token and self.api_admin_token.get_secret_value())

    @property
    def resolved_license_audit_log(self) -> Path:
        return self.license_audit_log_path or self.resolved_audit_dir / "license.log"

    def check_consistency(self) -> None:
        """Cross-field rules that pydantic's per-field validation cannot express."""
        from shared.secrets_box import SecretKeyError, parse_key

        for name in ("secret_key", "secret_key_previous"):
            value = getattr(self, name)
            try:
                parse_key(value.get_secret_value() if value else None)
            except SecretKeyError as error:
                raise ValueError(f"PAYMENTS_{name.upper()}: {error}") from None
        if self.single_orchestrator_mode and not (
            self.single_orchestrator_id and self.single_orchestrator_address
        ):
            raise ValueError(
                "PAYMENTS_SINGLE_ORCHESTRATOR_MODE needs ORCHESTRATOR_ID and ORCHESTRATOR_ADDRESS"
            )


class ConfigurationError(Exception):
    """Raised instead of exiting when a caller (a test) wants to see the message."""


def describe_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "settings"
    env_name = location if location.isupper() else f"PAYMENTS_{location.upper()}"
    return f"configuration error: {env_name}: {first['msg']}"


def build_settings(**overrides: Any) -> Settings:
    """Build settings or raise ConfigurationError with one line that names the variable."""
    try:
        settings = Settings(**overrides)
        settings.check_consistency()
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(error)) from None
    except ValueError as error:
        raise ConfigurationError(f"configuration error: {error}") from None
    return settings


def load_settings() -> Settings:
    """Settings for a process entry point: a misconfiguration exits with one clear line."""
    try:
        return build_settings()
    except ConfigurationError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None
