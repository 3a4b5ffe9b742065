"""Tables of stored policies: contents by hash, names, and the versions of each name.

A policy body is stored once, under the SHA-256 of its canonical JSON, however many names and
versions point at it. A name has one kind for its whole life and a counter of its versions.
Each upload that changes the content adds a version row.

Other tables refer to a policy by name through a foreign key to ``policies.name``, so that
the database itself rejects deleting a name that is still in use.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from edgetrust.db import Base

POLICY_KINDS: Final = ("runtime", "measured-boot", "pcr", "image-signature")
POLICY_NAME_MAX_LENGTH: Final = 255
# Hex of a SHA-256 digest.
CONTENT_HASH_LENGTH: Final = 64

_KIND_CHECK: Final = "kind IN ({})".format(", ".join(f"'{kind}'" for kind in POLICY_KINDS))


class PolicyContent(Base):
    """A policy body, stored once per content hash."""

    __tablename__ = "policy_contents"
    __table_args__ = (CheckConstraint(_KIND_CHECK, name="kind_known"),)

    # SHA-256 hex of ``body``.
    content_hash: Mapped[str] = mapped_column(String(CONTENT_HASH_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # The canonical JSON of the policy as UTF-8: sorted keys, no white space, ASCII escapes.
    # Bytes rather than a JSON column, so that the hash can be recomputed from what is stored.
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Policy(Base):
    """A policy name: its kind and the number of its newest version."""

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint(_KIND_CHECK, name="kind_known"),
        CheckConstraint("latest_version >= 0", name="latest_version_not_negative"),
    )

    name: Mapped[str] = mapped_column(String(POLICY_NAME_MAX_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Writers lock this row and increment the counter, so concurrent uploads of one name get
    # consecutive version numbers.
    latest_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PolicyVersion(Base):
    """One version of a named policy."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_policy_versions_name_version"),
        CheckConstraint(_KIND_CHECK, name="kind_known"),
        CheckConstraint("version >= 1", name="version_positive"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(
        String(POLICY_NAME_MAX_LENGTH), ForeignKey("policies.name", ondelete="CASCADE")
    )
    # Always the kind of the name.
    kind: Mapped[str] = mapped_column(String(32))
    # 1 for the first upload of a name, then one more for each upload with new content.
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(
        String(CONTENT_HASH_LENGTH), ForeignKey("policy_contents.content_hash"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The DSSE envelope the policy arrived in, as uploaded, or NULL for an unsigned upload.
    envelope: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Key id (SHA-256 hex of the PEM public key) of the signature that verified the envelope.
    signed_by: Mapped[str | None] = mapped_column(String(CONTENT_HASH_LENGTH))
