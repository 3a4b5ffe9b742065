"""Tables of the registrar: one row per registered device."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from edgetrust.db import Base

# Maximum length of a Keylime agent uuid. Most agents use RFC 4122 UUIDs of 36 characters.
DEVICE_ID_MAX_LENGTH = 255


class RegisteredDevice(Base):
    """A device that registered its EK and AK, and whether it proved they share one TPM.

    The identity (``ek_tpm``, ``ekcert``, ``aik_tpm``) never changes in place: a registration
    with another identity is rejected, and an operator deletes the row to enroll the device
    again. Contact details from a registration wait in the ``pending_*`` columns until the
    device completes that registration's credential challenge, so a request that only repeats
    public keys cannot redirect the verifier to another address.
    """

    __tablename__ = "registered_devices"
    __table_args__ = (
        CheckConstraint("port IS NULL OR port BETWEEN 1 AND 65535", name="port_range"),
        CheckConstraint(
            "pending_port IS NULL OR pending_port BETWEEN 1 AND 65535", name="pending_port_range"
        ),
        CheckConstraint("regcount >= 1", name="regcount_positive"),
        CheckConstraint("failed_activations >= 0", name="failed_activations_not_negative"),
        # SQLite would otherwise reuse the id of a deleted last row, and an update by id that
        # was prepared for the deleted device could then land on its successor.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Keylime agent uuid.
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_MAX_LENGTH), unique=True)

    # TPM2B_PUBLIC of the EK. NULL when the device sent only its EK certificate.
    ek_tpm: Mapped[bytes | None] = mapped_column(LargeBinary)
    # DER of the EK certificate, which chains to the EK CA bundle and certifies the EK.
    # NULL only when the settings allow registration without one.
    ekcert: Mapped[bytes | None] = mapped_column(LargeBinary)
    # TPM2B_PUBLIC of the AK: a restricted signing key that quotes are verified with.
    aik_tpm: Mapped[bytes] = mapped_column(LargeBinary)

    # IAK and IDevID as the device sent them. NOTE: stored for Keylime clients, but not
    # verified: the registrar trusts the EK certificate only.
    iak_tpm: Mapped[bytes | None] = mapped_column(LargeBinary)
    iak_cert: Mapped[bytes | None] = mapped_column(LargeBinary)
    idevid_tpm: Mapped[bytes | None] = mapped_column(LargeBinary)
    idevid_cert: Mapped[bytes | None] = mapped_column(LargeBinary)

    # Where the verifier reaches the agent: set from pending_* on each successful activation.
    ip: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    # PEM of the agent's mTLS server certificate, or "disabled".
    mtls_cert: Mapped[str | None] = mapped_column(Text)
    pending_ip: Mapped[str | None] = mapped_column(String(255))
    pending_port: Mapped[int | None] = mapped_column(Integer)
    pending_mtls_cert: Mapped[str | None] = mapped_column(Text)

    # Number of accepted registrations, this one included.
    regcount: Mapped[int] = mapped_column(Integer)
    # True once the device completed a credential challenge, which proves that the AK lives
    # in the TPM that contains the EK.
    active: Mapped[bool]
    # The random secret wrapped by MakeCredential, until the device activates it or the
    # challenge is voided. Cleared on activation: it must not outlive its use.
    challenge_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    challenge_issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Wrong auth_tags sent for the pending challenge.
    failed_activations: Mapped[int] = mapped_column(Integer)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
