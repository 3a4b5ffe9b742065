"""Tables of verdict-change webhooks and of push mode.

- ``webhooks``: the receivers of verdict-change events, each with its URL and the HMAC secret
  that signs what it receives. Managed with ``/v1/webhooks`` (``verifier.notify``).
- ``webhook_deliveries``: the outbox. One row per event and receiver, inserted in the same
  transaction as the verdict change it reports, so a process that dies after that commit
  loses nothing. The delivery worker claims due rows, sends them and marks them delivered or,
  after the maximum number of attempts, failed.
- ``verifier_push_devices``: the devices that push their evidence (push mode) instead of being
  polled. A device of the verifier without a row here is in pull mode.
- ``verifier_push_challenges``: the challenges issued to push-mode devices. Each is single-use
  and valid until its ``expires_at``.

``verifier.retention`` deletes delivered and failed deliveries older than the setting
``outbox_retention``. Pending ones stay until they are delivered or fail.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from edgetrust.db import Base
from registrar.models import DEVICE_ID_MAX_LENGTH

WEBHOOK_URL_MAX_LENGTH: Final = 2048
# secrets.token_urlsafe(32) is 43 characters; receivers may bring longer secrets of their own.
WEBHOOK_SECRET_MAX_LENGTH: Final = 256
# "<verdict id>:<cause>", such as "9f1c...:expiry".
EVENT_ID_MAX_LENGTH: Final = 64
DELIVERY_STATUSES: Final = ("pending", "delivered", "failed")
# Length of a UUID in its canonical text form.
_UUID_LENGTH: Final = 36
# SQLite makes only an INTEGER PRIMARY KEY an alias of its rowid, which autoincrements.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class Webhook(Base):
    """A receiver of verdict-change events."""

    __tablename__ = "webhooks"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(WEBHOOK_URL_MAX_LENGTH), unique=True)
    # HMAC-SHA256 key of the X-Edgetrust-Signature header. Stored as given, because signing
    # needs the key itself; it is returned only by the request that creates the webhook.
    secret: Mapped[str] = mapped_column(String(WEBHOOK_SECRET_MAX_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one receiver, and the state of its delivery."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status_known"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        # The same event is queued at most once per receiver, even when two writers enqueue it.
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_webhook_id_event_id"),
        # The claim query: pending rows that are due, earliest first.
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_event_id", "event_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(Integer, ForeignKey("webhooks.id", ondelete="CASCADE"))
    # The Idempotency-Key header: the same for every attempt, so receivers can drop repeats.
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_MAX_LENGTH))
    # No foreign key: the event outlives a device removed after it.
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_MAX_LENGTH))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    # When the row is due. A worker that claims it moves this to the end of its lease, so a
    # worker that dies mid-delivery leaves the row due again once the lease has passed.
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claim_id: Mapped[str | None] = mapped_column(String(_UUID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # HTTP status of the last attempt, NULL when no response arrived.
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))


class PushDevice(Base):
    """A device of the verifier in push mode; its poll_interval is its push interval."""

    __tablename__ = "verifier_push_devices"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("verifier_devices.device_id", ondelete="CASCADE"),
        unique=True,
    )
    enabled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When evidence was last accepted (its signature verified), whatever the verdict.
    last_evidence_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PushChallenge(Base):
    """A challenge issued to a push-mode device: what its next quote must carry."""

    __tablename__ = "verifier_push_challenges"
    __table_args__ = (
        CheckConstraint("ima_offset >= 0", name="ima_offset_not_negative"),
        Index("ix_verifier_push_challenges_device_id_issued_at", "device_id", "issued_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True)
    challenge_id: Mapped[str] = mapped_column(String(_UUID_LENGTH), unique=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("verifier_push_devices.device_id", ondelete="CASCADE"),
    )
    # ASCII nonce, the quote's qualifying data.
    nonce: Mapped[str] = mapped_column(String(64))
    # PCR indexes requested, PCR 16 included.
    pcrs: Mapped[list[int]] = mapped_column(JSON)
    # The ima_ml_entry requested: the verifier's next IMA entry for this device.
    ima_offset: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
