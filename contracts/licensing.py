"""Image licensing: HTTP request models and the command envelope the licensing worker answers.

Licensing state lives in the database only (secrets cannot go into a stream): the licensing
worker changes it in answer to request-reply commands, and every change is audited on the
AUDIT stream, without a secret, token or invite code.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.events import UtcDatetime
from contracts.http import ADDRESS_PATTERN

LICENSING_COMMANDS = "licensing.commands"
LICENSING_QUEUE = "licensing"


def command_subject(name: str) -> str:
    return f"{LICENSING_COMMANDS}.{name}"


class LicensingCommandV1(BaseModel):
    """`name` picks the handler; `actor` is who the api authenticated (orchestrator tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    args: dict[str, Any]
    actor: dict[str, str] = Field(default_factory=dict)
    request_ip: str | None = Field(default=None, max_length=64)
    received_at: UtcDatetime


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUpsertRequest(_Strict):
    image_ref: str = Field(min_length=1, max_length=512)
    secret_b64: str | None = Field(default=None, max_length=2048)
    artifact_s3_uri: str | None = Field(default=None, max_length=2048)


class ImageRefRequest(_Strict):
    image_ref: str = Field(min_length=1, max_length=512)


class AccessRequest(_Strict):
    orchestrator_id: str = Field(min_length=1, max_length=128)
    image_ref: str = Field(min_length=1, max_length=512)


class InviteCreateRequest(_Strict):
    image_ref: str = Field(min_length=1, max_length=512)
    bound_address: str = Field(pattern=ADDRESS_PATTERN)
    ttl_seconds: int | None = Field(default=None, ge=60, le=7_776_000)
    expires_at: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_expiry(self) -> InviteCreateRequest:
        if self.ttl_seconds is not None and self.expires_at is not None:
            raise ValueError("give ttl_seconds or expires_at, not both")
        return self


class InviteIdRequest(_Strict):
    invite_id: str = Field(min_length=1, max_length=64)


class InviteRedeemRequest(_Strict):
    code: str = Field(min_length=4, max_length=128)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    address: str = Field(pattern=ADDRESS_PATTERN)
    capability: str | None = Field(default=None, max_length=128)
    contact_email: str | None = Field(default=None, max_length=255)


class LeaseRequest(_Strict):
    image_ref: str = Field(min_length=1, max_length=512)
