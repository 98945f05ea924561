"""image licensing

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 06:29:59.765643
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "license_access",
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("image_ref", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("granted_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("orchestrator_id", "image_ref"),
    )
    op.create_table(
        "license_images",
        sa.Column("image_ref", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("secret_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("artifact_s3_uri", sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=True),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("rotated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("image_ref"),
    )
    op.create_table(
        "license_invites",
        sa.Column("invite_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("code_hash", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("image_ref", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("bound_address", sqlmodel.sql.sqltypes.AutoString(length=42), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("expires_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("note", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("revoked_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("redeeming_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("redeemed_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("redeemed_by", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("redeemed_ip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("redeemed_address", sqlmodel.sql.sqltypes.AutoString(length=42), nullable=True),
        sa.Column("redeemed_token_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.PrimaryKeyConstraint("invite_id"),
        sa.UniqueConstraint("code_hash"),
    )
    op.create_table(
        "license_leases",
        sa.Column("lease_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("image_ref", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("token_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("issued_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_seen_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_seen_ip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("expires_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("end_reason", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.PrimaryKeyConstraint("lease_id"),
    )
    with op.batch_alter_table("license_leases", schema=None) as batch_op:
        batch_op.create_index(
            "ix_license_leases_expiry", ["revoked_at", "expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_license_leases_image_ref"), ["image_ref"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_license_leases_orchestrator_id"), ["orchestrator_id"], unique=False
        )

    op.create_table(
        "orchestrator_tokens",
        sa.Column("token_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("token_hash", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_seen_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("token_id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("orchestrator_tokens", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_orchestrator_tokens_orchestrator_id"), ["orchestrator_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("orchestrator_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_orchestrator_tokens_orchestrator_id"))

    op.drop_table("orchestrator_tokens")
    with op.batch_alter_table("license_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_license_leases_orchestrator_id"))
        batch_op.drop_index(batch_op.f("ix_license_leases_image_ref"))
        batch_op.drop_index("ix_license_leases_expiry")

    op.drop_table("license_leases")
    op.drop_table("license_invites")
    op.drop_table("license_images")
    op.drop_table("license_access")
