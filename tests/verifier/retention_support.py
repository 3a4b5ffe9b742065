"""Rows for the retention tests, written straight into the tables with placeholder evidence."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import transaction
from registrar.models import RegisteredDevice
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.outbox_models import Webhook, WebhookDelivery

NOW = datetime(2026, 12, 20, 12, 0, tzinfo=UTC)


def add_device(sessions: sessionmaker[Session], device_id: str) -> None:
    """Add a paused device with placeholder AK and EK, so that no poller claims it."""
    with transaction(sessions) as session:
        session.add(RegisteredDevice(
            device_id=device_id, ek_tpm=b"placeholder EK", ekcert=None, aik_tpm=b"placeholder AK",
            ip="127.0.0.1", port=9002, mtls_cert="disabled", regcount=1, active=True,
            failed_activations=0, created_at=NOW, registered_at=NOW, activated_at=NOW,
        ))
        session.flush()
        session.add(VerifierDevice(
            device_id=device_id, ip="127.0.0.1", port=9002, poll_interval=10.0, paused=True,
            next_poll_at=NOW, consecutive_failures=0, state=None, verdict_id=None,
            verdict_status="unknown", verdict_reasons=[], verdict_policies=[], created_at=NOW,
            updated_at=NOW,
        ))


def add_attestation(sessions: sessionmaker[Session], device_id: str, finished_at: datetime,
                    verdict_id: str | None = None) -> int:
    """Insert an attestation that finished at ``finished_at``; return its id."""
    with transaction(sessions) as session:
        return session.execute(insert(Attestation).values(
            device_id=device_id, verdict_id=verdict_id or str(uuid.uuid4()), status="trusted",
            poller="test", nonce="n" * 20, scheduled_at=finished_at, started_at=finished_at,
            finished_at=finished_at, boot_session=1, ima_start_index=0, ima_next_index=1,
            evidence={}, findings=[],
        ).returning(Attestation.id)).scalar_one()


def add_verdict_record(sessions: sessionmaker[Session], device_id: str, attestation_id: int,
                       issued_at: datetime, status: str = "untrusted") -> int:
    """Insert a verdict-change row that refers to ``attestation_id``; return its id."""
    with transaction(sessions) as session:
        return session.execute(insert(VerdictRecord).values(
            verdict_id=str(uuid.uuid4()), device_id=device_id, status=status, reasons=[],
            policies=[], issued_at=issued_at, attested_at=issued_at, expires_at=None,
            attestation_id=attestation_id,
        ).returning(VerdictRecord.id)).scalar_one()


def set_current_verdict(sessions: sessionmaker[Session], device_id: str, verdict_id: str) -> None:
    with transaction(sessions) as session:
        session.execute(update(VerifierDevice).where(VerifierDevice.device_id == device_id)
                        .values(verdict_id=verdict_id, verdict_status="trusted"))


def add_webhook(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        return session.execute(insert(Webhook).values(
            url="http://127.0.0.1:9/hook", secret="s" * 32, created_at=NOW,
        ).returning(Webhook.id)).scalar_one()


def add_delivery(sessions: sessionmaker[Session], webhook_id: int, device_id: str, status: str,
                 last_attempt_at: datetime, event_id: str | None = None) -> int:
    """Insert a delivery in ``status`` whose last attempt (or due time) is ``last_attempt_at``."""
    with transaction(sessions) as session:
        return session.execute(insert(WebhookDelivery).values(
            webhook_id=webhook_id, event_id=event_id or f"{uuid.uuid4()}:attestation",
            device_id=device_id, payload={}, status=status,
            attempts=0 if status == "pending" else 1, next_attempt_at=last_attempt_at,
            claim_id=None, created_at=last_attempt_at,
            delivered_at=last_attempt_at if status == "delivered" else None,
            last_status_code=None, last_error=None,
        ).returning(WebhookDelivery.id)).scalar_one()


def attestation_ids(sessions: sessionmaker[Session]) -> set[int]:
    with sessions() as session:
        return set(session.scalars(select(Attestation.id)))


def delivery_ids(sessions: sessionmaker[Session]) -> set[int]:
    with sessions() as session:
        return set(session.scalars(select(WebhookDelivery.id)))
