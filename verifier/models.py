"""Tables of the verifier: the devices it attests, their attestations and their verdicts.

- ``verifier_devices``: one row per device added to the verifier. It refers to the registrar's
  row by device id and is deleted with it, because without the registrar's AK there is
  nothing to verify quotes with. It holds the schedule and lease the pollers coordinate
  through, the state the engine carries between attestations, and the current verdict.
- ``verifier_attestations``: one row per attestation attempt, passed, failed or unreachable,
  with the nonce, the times, a summary of the evidence and the findings.
- ``verifier_verdicts``: the verdict history, one row each time a device's verdict status or
  reason codes change. Every attestation also records its own verdict id and status.

A fleet of 1,000 devices polled every 10 seconds adds 8.6 million attestation rows a day, so
``verifier.retention`` deletes those older than the setting ``attestation_retention``. It never
deletes verdict rows, which the verdict stream reads as its event sequence.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgetrust.db import Base
from registrar.models import DEVICE_ID_MAX_LENGTH
from verifier import policy_store
from verifier.policy_models import POLICY_NAME_MAX_LENGTH

VERDICT_STATUSES: Final = ("trusted", "untrusted", "unknown")
_STATUS_CHECK: Final = "{} IN ('trusted', 'untrusted', 'unknown')"
# Length of a UUID in its canonical text form.
_UUID_LENGTH: Final = 36
# SQLite makes only an INTEGER PRIMARY KEY an alias of its rowid, which autoincrements.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class VerifierDevice(Base):
    """A device the verifier attests: contact, schedule, lease, state and current verdict."""

    __tablename__ = "verifier_devices"
    __table_args__ = (
        CheckConstraint("port BETWEEN 1 AND 65535", name="port_range"),
        CheckConstraint("poll_interval > 0", name="poll_interval_positive"),
        CheckConstraint("consecutive_failures >= 0", name="consecutive_failures_not_negative"),
        CheckConstraint(_STATUS_CHECK.format("verdict_status"), name="verdict_status_known"),
        # The claim query: due devices that are not paused, earliest first.
        Index("ix_verifier_devices_due", "paused", "next_poll_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("registered_devices.device_id", ondelete="CASCADE"),
        unique=True,
    )

    # Where the poller reaches the agent: Keylime's cloudagent_ip and cloudagent_port.
    ip: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    # Seconds between two attestations (Keylime's quote_interval).
    poll_interval: Mapped[float] = mapped_column(Float)
    paused: Mapped[bool]

    # Names in the policy store; the latest version of each applies at every attestation.
    runtime_policy: Mapped[str | None] = mapped_column(
        String(POLICY_NAME_MAX_LENGTH), ForeignKey("policies.name")
    )
    mb_policy: Mapped[str | None] = mapped_column(
        String(POLICY_NAME_MAX_LENGTH), ForeignKey("policies.name")
    )
    pcr_policy: Mapped[str | None] = mapped_column(
        String(POLICY_NAME_MAX_LENGTH), ForeignKey("policies.name")
    )

    # Time the device is due. A poller that claims the device moves it to the lease expiry,
    # so that no other poller claims it meanwhile and a dead poller's devices come due again.
    next_poll_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The poller holding the device, and the random id of its claim: only the holder of the
    # current claim may store the attestation.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_id: Mapped[str | None] = mapped_column(String(_UUID_LENGTH))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Attestations in a row that could not reach the agent; the retry delay doubles with each.
    consecutive_failures: Mapped[int] = mapped_column(Integer)

    # verifier.state.DeviceState.to_json() after the last attestation; NULL before the first.
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    # The current verdict (verifier.verdicts.Verdict).
    verdict_id: Mapped[str | None] = mapped_column(String(_UUID_LENGTH))
    verdict_status: Mapped[str] = mapped_column(String(16))
    verdict_reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    verdict_policies: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    verdict_issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verdict_attested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verdict_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Attestation(Base):
    """One attestation attempt and its outcome."""

    __tablename__ = "verifier_attestations"
    __table_args__ = (
        CheckConstraint(_STATUS_CHECK.format("status"), name="status_known"),
        Index("ix_verifier_attestations_device_id_finished_at", "device_id", "finished_at"),
        # The retention query: attestations finished before a cutoff, over all devices.
        Index("ix_verifier_attestations_finished_at", "finished_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("verifier_devices.device_id", ondelete="CASCADE"),
    )
    verdict_id: Mapped[str] = mapped_column(String(_UUID_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    poller: Mapped[str] = mapped_column(String(255))
    # The nonce sent; NULL only when no request could be made.
    nonce: Mapped[str | None] = mapped_column(String(64))

    # When the device was due, when the request started and when the result was stored.
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    # resetCount of the quote, which numbers the device's boot sessions.
    boot_session: Mapped[int | None] = mapped_column(Integer)
    # IMA entries requested from, and the next entry to request after this attestation.
    ima_start_index: Mapped[int | None] = mapped_column(Integer)
    ima_next_index: Mapped[int | None] = mapped_column(Integer)
    # The quote string, PCR bank, mask, clockInfo and sizes of what the device sent.
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    # evidence.findings.Finding.to_json() of each finding.
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class VerdictRecord(Base):
    """A verdict that changed a device's status or reason codes."""

    __tablename__ = "verifier_verdicts"
    __table_args__ = (
        CheckConstraint(_STATUS_CHECK.format("status"), name="status_known"),
        Index("ix_verifier_verdicts_device_id_issued_at", "device_id", "issued_at"),
        # Deleting an attestation sets attestation_id to NULL in the rows that refer to it.
        # Without this index the database scans this table for each deleted attestation.
        Index("ix_verifier_verdicts_attestation_id", "attestation_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_ROW_ID, primary_key=True)
    verdict_id: Mapped[str] = mapped_column(String(_UUID_LENGTH), unique=True)
    device_id: Mapped[str] = mapped_column(
        String(DEVICE_ID_MAX_LENGTH),
        ForeignKey("verifier_devices.device_id", ondelete="CASCADE"),
    )
    status: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    policies: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attestation_id: Mapped[int | None] = mapped_column(
        _ROW_ID, ForeignKey("verifier_attestations.id", ondelete="SET NULL")
    )


def devices_using_policy(session: Session, name: str) -> list[str]:
    """Return the ids of the devices whose runtime, measured-boot or PCR policy is ``name``."""
    query = select(VerifierDevice.device_id).where(
        (VerifierDevice.runtime_policy == name)
        | (VerifierDevice.mb_policy == name)
        | (VerifierDevice.pcr_policy == name)
    )
    return list(session.scalars(query))


policy_store.register_usage_check(devices_using_policy)
