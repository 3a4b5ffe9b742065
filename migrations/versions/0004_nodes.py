"""Create verifier_nodes: which registered device each Kubernetes node runs on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verifier_nodes",
        sa.Column("node_name", sa.String(length=253), nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["registered_devices.device_id"], ondelete="CASCADE",
            name=op.f("fk_verifier_nodes_device_id_registered_devices"),
        ),
        sa.PrimaryKeyConstraint("node_name", name=op.f("pk_verifier_nodes")),
        sa.UniqueConstraint("device_id", name=op.f("uq_verifier_nodes_device_id")),
    )


def downgrade() -> None:
    op.drop_table("verifier_nodes")
