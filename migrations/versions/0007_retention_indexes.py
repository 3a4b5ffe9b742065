"""Index attestations by finish time and verdict rows by attestation, for retention.

``verifier.retention`` deletes attestations finished before a cutoff across all devices, which
the index on (device_id, finished_at) cannot serve. Each deleted attestation sets
``attestation_id`` to NULL in the verdict rows that refer to it, which needs the second index.

On PostgreSQL both are built with CREATE INDEX CONCURRENTLY, so pollers of the older release
can keep storing attestations while a large table is indexed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_verifier_attestations_finished_at", "verifier_attestations", ["finished_at"]),
    ("ix_verifier_verdicts_attestation_id", "verifier_verdicts", ["attestation_id"]),
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # CONCURRENTLY cannot run inside a transaction. A failed concurrent build leaves an
        # invalid index behind (PostgreSQL, CREATE INDEX), so a second run drops it first.
        with op.get_context().autocommit_block():
            for name, table, columns in _INDEXES:
                op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
                op.create_index(name, table, columns, postgresql_concurrently=True)
        return
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in _INDEXES:
        op.drop_index(name, table_name=table)
