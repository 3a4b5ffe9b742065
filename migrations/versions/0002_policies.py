"""Create the policy tables: contents by hash, names, and versions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_KIND_CHECK = "kind IN ('runtime', 'measured-boot', 'pcr', 'image-signature')"


def upgrade() -> None:
    op.create_table(
        "policy_contents",
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_KIND_CHECK, name=op.f("ck_policy_contents_kind_known")),
        sa.PrimaryKeyConstraint("content_hash", name=op.f("pk_policy_contents")),
    )
    op.create_table(
        "policies",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_KIND_CHECK, name=op.f("ck_policies_kind_known")),
        sa.CheckConstraint(
            "latest_version >= 0", name=op.f("ck_policies_latest_version_not_negative")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_policies")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("envelope", sa.JSON(), nullable=True),
        sa.Column("signed_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint(_KIND_CHECK, name=op.f("ck_policy_versions_kind_known")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_policy_versions_version_positive")),
        sa.ForeignKeyConstraint(
            ["name"], ["policies.name"], ondelete="CASCADE",
            name=op.f("fk_policy_versions_name_policies"),
        ),
        sa.ForeignKeyConstraint(
            ["content_hash"], ["policy_contents.content_hash"],
            name=op.f("fk_policy_versions_content_hash_policy_contents"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_policy_versions_name_version")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_policy_versions_content_hash"), "policy_versions", ["content_hash"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_policy_versions_content_hash"), table_name="policy_versions")
    op.drop_table("policy_versions")
    op.drop_table("policies")
    op.drop_table("policy_contents")
