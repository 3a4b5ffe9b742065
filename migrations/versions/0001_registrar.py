"""Create the registrar's table of registered devices.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registered_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("ek_tpm", sa.LargeBinary(), nullable=True),
        sa.Column("ekcert", sa.LargeBinary(), nullable=True),
        sa.Column("aik_tpm", sa.LargeBinary(), nullable=False),
        sa.Column("iak_tpm", sa.LargeBinary(), nullable=True),
        sa.Column("iak_cert", sa.LargeBinary(), nullable=True),
        sa.Column("idevid_tpm", sa.LargeBinary(), nullable=True),
        sa.Column("idevid_cert", sa.LargeBinary(), nullable=True),
        sa.Column("ip", sa.String(length=255), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("mtls_cert", sa.Text(), nullable=True),
        sa.Column("pending_ip", sa.String(length=255), nullable=True),
        sa.Column("pending_port", sa.Integer(), nullable=True),
        sa.Column("pending_mtls_cert", sa.Text(), nullable=True),
        sa.Column("regcount", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("challenge_secret", sa.LargeBinary(), nullable=True),
        sa.Column("challenge_issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_activations", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "port IS NULL OR port BETWEEN 1 AND 65535",
            name=op.f("ck_registered_devices_port_range"),
        ),
        sa.CheckConstraint(
            "pending_port IS NULL OR pending_port BETWEEN 1 AND 65535",
            name=op.f("ck_registered_devices_pending_port_range"),
        ),
        sa.CheckConstraint("regcount >= 1", name=op.f("ck_registered_devices_regcount_positive")),
        sa.CheckConstraint(
            "failed_activations >= 0",
            name=op.f("ck_registered_devices_failed_activations_not_negative"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_devices")),
        sa.UniqueConstraint("device_id", name=op.f("uq_registered_devices_device_id")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("registered_devices")
