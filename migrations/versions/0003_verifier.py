"""Create the verifier's tables: devices, attestations and the verdict history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _status_check(column: str, table: str, name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(
        f"{column} IN ('trusted', 'untrusted', 'unknown')", name=op.f(f"ck_{table}_{name}")
    )


def upgrade() -> None:
    op.create_table(
        "verifier_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("ip", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("poll_interval", sa.Float(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("runtime_policy", sa.String(length=255), nullable=True),
        sa.Column("mb_policy", sa.String(length=255), nullable=True),
        sa.Column("pcr_policy", sa.String(length=255), nullable=True),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_id", sa.String(length=36), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=True),
        sa.Column("verdict_id", sa.String(length=36), nullable=True),
        sa.Column("verdict_status", sa.String(length=16), nullable=False),
        sa.Column("verdict_reasons", sa.JSON(), nullable=False),
        sa.Column("verdict_policies", sa.JSON(), nullable=False),
        sa.Column("verdict_issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verdict_attested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verdict_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("port BETWEEN 1 AND 65535", name=op.f("ck_verifier_devices_port_range")),
        sa.CheckConstraint(
            "poll_interval > 0", name=op.f("ck_verifier_devices_poll_interval_positive")
        ),
        sa.CheckConstraint(
            "consecutive_failures >= 0",
            name=op.f("ck_verifier_devices_consecutive_failures_not_negative"),
        ),
        _status_check("verdict_status", "verifier_devices", "verdict_status_known"),
        sa.ForeignKeyConstraint(
            ["device_id"], ["registered_devices.device_id"], ondelete="CASCADE",
            name=op.f("fk_verifier_devices_device_id_registered_devices"),
        ),
        sa.ForeignKeyConstraint(
            ["runtime_policy"], ["policies.name"],
            name=op.f("fk_verifier_devices_runtime_policy_policies"),
        ),
        sa.ForeignKeyConstraint(
            ["mb_policy"], ["policies.name"], name=op.f("fk_verifier_devices_mb_policy_policies"),
        ),
        sa.ForeignKeyConstraint(
            ["pcr_policy"], ["policies.name"], name=op.f("fk_verifier_devices_pcr_policy_policies"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verifier_devices")),
        sa.UniqueConstraint("device_id", name=op.f("uq_verifier_devices_device_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_verifier_devices_due", "verifier_devices", ["paused", "next_poll_at"], unique=False
    )

    op.create_table(
        "verifier_attestations",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("verdict_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("poller", sa.String(length=255), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=True),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("boot_session", sa.Integer(), nullable=True),
        sa.Column("ima_start_index", sa.Integer(), nullable=True),
        sa.Column("ima_next_index", sa.Integer(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        _status_check("status", "verifier_attestations", "status_known"),
        sa.ForeignKeyConstraint(
            ["device_id"], ["verifier_devices.device_id"], ondelete="CASCADE",
            name=op.f("fk_verifier_attestations_device_id_verifier_devices"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verifier_attestations")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_verifier_attestations_device_id_finished_at", "verifier_attestations",
        ["device_id", "finished_at"], unique=False,
    )

    op.create_table(
        "verifier_verdicts",
        sa.Column("id", _ROW_ID, nullable=False),
        sa.Column("verdict_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("policies", sa.JSON(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attestation_id", _ROW_ID, nullable=True),
        _status_check("status", "verifier_verdicts", "status_known"),
        sa.ForeignKeyConstraint(
            ["device_id"], ["verifier_devices.device_id"], ondelete="CASCADE",
            name=op.f("fk_verifier_verdicts_device_id_verifier_devices"),
        ),
        sa.ForeignKeyConstraint(
            ["attestation_id"], ["verifier_attestations.id"], ondelete="SET NULL",
            name=op.f("fk_verifier_verdicts_attestation_id_verifier_attestations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verifier_verdicts")),
        sa.UniqueConstraint("verdict_id", name=op.f("uq_verifier_verdicts_verdict_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_verifier_verdicts_device_id_issued_at", "verifier_verdicts",
        ["device_id", "issued_at"], unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_verifier_verdicts_device_id_issued_at", table_name="verifier_verdicts")
    op.drop_table("verifier_verdicts")
    op.drop_index(
        "ix_verifier_attestations_device_id_finished_at", table_name="verifier_attestations"
    )
    op.drop_table("verifier_attestations")
    op.drop_index("ix_verifier_devices_due", table_name="verifier_devices")
    op.drop_table("verifier_devices")
