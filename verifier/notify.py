"""Webhooks for verdict changes: the outbox, the delivery worker and the ``/v1/webhooks`` routes.

Receivers are rows of the ``webhooks`` table, managed by admins over HTTP rather than by a
setting, so every server replica and poller reads the same receivers without a restart, and
each receiver has its own secret::

    POST   /v1/webhooks                 {"url": ..., "secret": optional} -> 201, the secret once
    GET    /v1/webhooks                 the receivers with their delivery counts, no secrets
    GET    /v1/webhooks/{id}/deliveries?status=failed&limit=N   the newest deliveries
    DELETE /v1/webhooks/{id}            remove the receiver and its deliveries (204)

How an event travels:

1. Enqueue. Whoever stores a verdict calls :func:`enqueue_verdict_change` in the transaction
   that stores it. When the device's effective status or reason codes change (a trusted
   verdict past its ``expires_at`` counts as unknown), it inserts one ``webhook_deliveries``
   row per receiver. The outbox row commits or rolls back with the verdict, so a process that
   dies after the commit loses no event.
2. Expiry. No writer changes a verdict when it expires, so the delivery worker also looks for
   trusted verdicts past their ``expires_at`` and queues a ``cause: "expiry"`` event for each,
   once per verdict (:func:`enqueue_expired_verdicts`).
3. Claim. The worker claims due rows with a lease, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
   so any number of workers share the outbox.
4. Send. ``POST <url>`` with the JSON event, a timeout for connecting and one for the answer.
5. Mark. A 2xx answer marks the row delivered. Anything else is retried after a delay that
   starts at ``backoff_initial`` and doubles up to ``backoff_max``; after ``max_attempts``
   attempts the row is marked failed and logged at WARNING.

Delivery is at least once: a worker that dies between sending and marking leaves the row
claimed until its lease passes, and the next worker sends it again. Every attempt of one
event carries the same ``Idempotency-Key`` header, so a receiver drops repeats by that key.

Each request is signed. ``X-Edgetrust-Timestamp`` is the Unix time of the attempt and
``X-Edgetrust-Signature`` is ``sha256=`` followed by the hex HMAC-SHA256, keyed with the
receiver's secret, of the timestamp, a ``.`` and the body. A receiver checks the MAC in
constant time and rejects timestamps older than a few minutes, so a captured request cannot
be replayed later; :func:`verify_signature` does both.

Every worker process of ``edgetrust serve`` and every ``edgetrust poll`` process runs a
delivery worker (:func:`start_delivery_worker`). The pull-mode poller and the push-mode
evidence route call :func:`enqueue_verdict_change` for the verdict of each attestation.

NOTE: retries can reorder events of one device, so receivers order them by ``issued_at``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from flask import Blueprint, Flask, Response, jsonify, request
from sqlalchemy import Connection, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgetrust import __version__
from edgetrust.context import AppServices, services
from edgetrust.db import make_engine, make_session_factory, transaction
from edgetrust.settings import Settings, SettingsError
from edgetrust.web import RequestError, json_body, require_str
from verifier.errors import VerifierError
from verifier.models import VerifierDevice
from verifier.outbox_models import (
    DELIVERY_STATUSES,
    WEBHOOK_SECRET_MAX_LENGTH,
    WEBHOOK_URL_MAX_LENGTH,
    Webhook,
    WebhookDelivery,
)
from verifier.poller import as_utc, utc_now
from verifier.verdicts import VERDICT_EXPIRED, Verdict, VerdictStatus

log = logging.getLogger(__name__)

EVENT_TYPE: Final = "verdict.changed"
SIGNATURE_HEADER: Final = "X-Edgetrust-Signature"
TIMESTAMP_HEADER: Final = "X-Edgetrust-Timestamp"
EVENT_HEADER: Final = "X-Edgetrust-Event"
ATTEMPT_HEADER: Final = "X-Edgetrust-Delivery-Attempt"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
# Age of a signed timestamp that verify_signature still accepts, in seconds.
SIGNATURE_TOLERANCE_SECONDS: Final = 300.0
MIN_SECRET_LENGTH: Final = 16
# Expired verdicts one sweep queues at most; the next sweep takes the rest.
EXPIRY_SWEEP_BATCH: Final = 500
# Characters of a receiver's error response kept in last_error.
_ERROR_TEXT_LENGTH: Final = 300


class WebhookError(VerifierError):
    """A webhook request that cannot be served; ``code`` decides the HTTP status."""

    default_code = "webhook-invalid"


class WebhookSignatureError(Exception):
    """A webhook request whose signature or timestamp does not verify."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


# --- Events and the outbox ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreviousVerdict:
    """The device's verdict before the one being stored, as stored in its row."""

    status: str
    reason_codes: tuple[str, ...]
    expires_at: datetime | None

    @classmethod
    def of_device(cls, device: VerifierDevice) -> PreviousVerdict:
        codes = tuple(str(reason["code"]) for reason in device.verdict_reasons)
        expires_at = None if device.verdict_expires_at is None else as_utc(device.verdict_expires_at)
        return cls(device.verdict_status, codes, expires_at)

    def effective_at(self, at: datetime) -> tuple[str, tuple[str, ...]]:
        """Return the status and reason codes at ``at``: a trusted verdict past its expiry is unknown."""
        trusted = self.status == VerdictStatus.TRUSTED.value
        if trusted and self.expires_at is not None and self.expires_at <= at:
            return VerdictStatus.UNKNOWN.value, (VERDICT_EXPIRED,)
        return self.status, self.reason_codes


def event_id(verdict_id: str, cause: str) -> str:
    """Return the idempotency key of an event: the verdict id and what caused the event."""
    return f"{verdict_id}:{cause}"


def verdict_event(verdict: Verdict, old_status: str) -> dict[str, Any]:
    """Return the JSON event of a stored verdict that changed the device's status or reasons."""
    return {
        "event_id": event_id(str(verdict.verdict_id), "attestation"),
        "type": EVENT_TYPE,
        "cause": "attestation",
        "device_id": verdict.device_id,
        "old_status": old_status,
        "new_status": verdict.status.value,
        "reasons": [reason.to_json() for reason in verdict.reasons],
        "verdict_id": str(verdict.verdict_id),
        "issued_at": _iso(verdict.issued_at),
        "attested_at": _iso(verdict.attested_at),
        "expires_at": _iso(verdict.expires_at),
    }


def expiry_event(device_id: str, verdict_id: str, attested_at: datetime | None,
                 expires_at: datetime) -> dict[str, Any]:
    """Return the JSON event of a trusted verdict that expired without a newer attestation."""
    return {
        "event_id": event_id(verdict_id, "expiry"),
        "type": EVENT_TYPE,
        "cause": "expiry",
        "device_id": device_id,
        "old_status": VerdictStatus.TRUSTED.value,
        "new_status": VerdictStatus.UNKNOWN.value,
        "reasons": [{"code": VERDICT_EXPIRED,
                     "message": f"the last passing attestation at {_iso(attested_at)} expired at "
                                f"{_iso(expires_at)} without a newer one"}],
        "verdict_id": verdict_id,
        "issued_at": _iso(expires_at),
        "attested_at": _iso(attested_at),
        "expires_at": None,
    }


def enqueue_verdict_change(session: Session | Connection, verdict: Verdict, previous: PreviousVerdict,
                           *, now: datetime | None = None) -> int:
    """Queue ``verdict`` for every webhook if it changes the device's effective status or reasons.

    Call it in the transaction that stores the verdict, for every verdict stored, because it
    decides itself whether the verdict is a change. ``session`` may be an ORM session or a Core
    connection. Returns the number of deliveries queued.
    """
    old_status, old_codes = previous.effective_at(verdict.issued_at)
    new_codes = tuple(reason.code for reason in verdict.reasons)
    if (verdict.status.value, new_codes) == (old_status, old_codes):
        return 0
    payload = verdict_event(verdict, old_status)
    webhook_ids = list(session.scalars(select(Webhook.id)))
    return _enqueue(session, webhook_ids, payload, now or verdict.issued_at)


def enqueue_expired_verdicts(session: Session, now: datetime, *, limit: int = EXPIRY_SWEEP_BATCH) -> int:
    """Queue an expiry event for each trusted verdict past its ``expires_at``, once per verdict.

    Only receivers that existed when the verdict expired get its event. Returns the number of
    deliveries queued.
    """
    expiry_id = VerifierDevice.verdict_id.concat(":expiry")
    has_receiver = exists().where(Webhook.created_at <= VerifierDevice.verdict_expires_at)
    already_queued = exists().where(WebhookDelivery.event_id == expiry_id)
    rows = session.execute(
        select(VerifierDevice.device_id, VerifierDevice.verdict_id, VerifierDevice.verdict_attested_at,
               VerifierDevice.verdict_expires_at)
        .where(VerifierDevice.verdict_status == VerdictStatus.TRUSTED.value,
               VerifierDevice.verdict_id.is_not(None),
               VerifierDevice.verdict_expires_at <= now,
               has_receiver, ~already_queued)
        .limit(limit)
    ).all()
    if not rows:
        return 0

    receivers = session.execute(select(Webhook.id, Webhook.created_at)).all()
    queued = 0
    for device_id, verdict_id, attested_at, expires_at in rows:
        assert verdict_id is not None and expires_at is not None  # the query selects only these
        expired = as_utc(expires_at)
        attested = None if attested_at is None else as_utc(attested_at)
        webhook_ids = [hook_id for hook_id, created_at in receivers if as_utc(created_at) <= expired]
        queued += _enqueue(session, webhook_ids, expiry_event(device_id, verdict_id, attested, expired), now)
    return queued


def _enqueue(session: Session | Connection, webhook_ids: Sequence[int], payload: Mapping[str, Any],
             now: datetime) -> int:
    """Insert one pending delivery per webhook, skipping those already queued for this event."""
    queued = 0
    for webhook_id in webhook_ids:
        values = {
            "webhook_id": webhook_id, "event_id": payload["event_id"], "device_id": payload["device_id"],
            "payload": dict(payload), "status": "pending", "attempts": 0, "next_attempt_at": now,
            "claim_id": None, "created_at": now,
        }
        if _insert_ignoring_duplicates(session, values):
            queued += 1
    return queued


def _insert_ignoring_duplicates(session: Session | Connection, values: Mapping[str, Any]) -> bool:
    """Insert a delivery unless one exists for the same webhook and event.

    A duplicate must not raise: an IntegrityError would roll back the verdict it belongs to.
    """
    bind = session if isinstance(session, Connection) else session.get_bind()
    dialect = bind.dialect.name
    if dialect == "postgresql":
        statement: Any = postgresql_insert(WebhookDelivery).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(WebhookDelivery).values(**values).on_conflict_do_nothing()
    else:
        raise NotImplementedError(f"the webhook outbox supports SQLite and PostgreSQL, not {dialect}")
    inserted = session.execute(statement.returning(WebhookDelivery.id)).scalar_one_or_none()
    return inserted is not None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


# --- Signatures --------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the X-Edgetrust-Signature value: ``sha256=`` and HMAC-SHA256(secret, "<ts>." + body)."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, *, now: datetime,
                     tolerance: float = SIGNATURE_TOLERANCE_SECONDS) -> None:
    """Check a received webhook request, as a receiver does; raise WebhookSignatureError.

    Codes: ``webhook-signature-missing``, ``webhook-timestamp-invalid``,
    ``webhook-timestamp-stale`` (more than ``tolerance`` seconds from ``now``) and
    ``webhook-signature-invalid``.
    """
    unverified_signature = headers.get(SIGNATURE_HEADER)
    unverified_timestamp = headers.get(TIMESTAMP_HEADER)
    if unverified_signature is None or unverified_timestamp is None:
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} or {TIMESTAMP_HEADER} is missing",
                                    code="webhook-signature-missing")
    if not unverified_timestamp.isdigit():
        raise WebhookSignatureError(f"{TIMESTAMP_HEADER} is {unverified_timestamp[:40]!r}, expected "
                                    "Unix seconds", code="webhook-timestamp-invalid")
    age = now.timestamp() - int(unverified_timestamp)
    if abs(age) > tolerance:
        raise WebhookSignatureError(f"{TIMESTAMP_HEADER} is {age:.0f} s from now, more than "
                                    f"{tolerance:.0f} s", code="webhook-timestamp-stale")
    expected = sign(secret, int(unverified_timestamp), body)
    if not hmac.compare_digest(expected.encode("ascii"), unverified_signature.encode("utf-8", "replace")):
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} does not match the body and timestamp",
                                    code="webhook-signature-invalid")


# --- Delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryOptions:
    """Settings of the delivery worker (see docs/configuration.md, webhook_*)."""

    worker_id: str
    timeout: float = 10.0
    max_attempts: int = 8
    backoff_initial: float = 5.0
    backoff_max: float = 3600.0
    poll_interval: float = 1.0
    threads: int = 4
    batch_size: int = 32
    expiry_sweep_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.timeout > 0 or not self.poll_interval > 0:
            raise SettingsError("settings webhook_timeout and webhook_poll_interval must be greater than 0")
        if self.max_attempts < 1 or self.threads < 1:
            raise SettingsError("settings webhook_max_attempts and webhook_threads must be at least 1")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise SettingsError(
                f"setting webhook_backoff_initial is {self.backoff_initial}, expected more than 0 "
                f"and at most webhook_backoff_max ({self.backoff_max})")

    @property
    def lease_seconds(self) -> float:
        """Seconds a claimed delivery stays claimed: the connect and read timeouts and a margin."""
        return 2 * self.timeout + 10

    def retry_delay(self, attempts: int) -> float:
        """Return the delay after the ``attempts``-th failed attempt."""
        return float(min(self.backoff_initial * 2 ** (attempts - 1), self.backoff_max))

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        return cls(
            worker_id=f"{socket.gethostname()}-{os.getpid()}",
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff_initial=settings.webhook_backoff_initial,
            backoff_max=settings.webhook_backoff_max,
            poll_interval=settings.webhook_poll_interval,
            threads=settings.webhook_threads,
        )


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery claimed by this worker until its lease passes, with its receiver."""

    delivery_id: int
    claim_id: str
    webhook_id: int
    url: str
    secret: str
    event_id: str
    device_id: str
    payload: dict[str, Any]
    attempts: int
    """Attempts made before this one."""


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookDeliverer:
    """Deliver the outbox as the module docstring describes. Several may share one database."""

    def __init__(self, sessions: sessionmaker[Session], options: DeliveryOptions, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._sessions = sessions
        self.options = options
        self._clock = clock
        self._postgresql = sessions.kw["bind"].dialect.name == "postgresql"

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set. A database fault is logged, and the loop retries."""
        log.info("webhook delivery worker %s started", self.options.worker_id)
        next_sweep = 0.0
        with ThreadPoolExecutor(self.options.threads, thread_name_prefix="webhook") as pool:
            while not stop.is_set():
                try:
                    if self._clock().timestamp() >= next_sweep:
                        self.sweep_expired()
                        next_sweep = self._clock().timestamp() + self.options.expiry_sweep_interval
                    claims = self.claim(self.options.batch_size)
                    list(pool.map(self.deliver, claims))
                except Exception:  # noqa: BLE001 - a database outage must not end the worker
                    log.exception("webhook delivery worker %s failed; retrying", self.options.worker_id)
                    claims = []
                if len(claims) < self.options.batch_size:
                    stop.wait(self.options.poll_interval)
        log.info("webhook delivery worker %s stopped", self.options.worker_id)

    def run_once(self) -> int:
        """Queue expiry events, then deliver every due delivery once; return how many were sent."""
        self.sweep_expired()
        claims = self.claim(self.options.batch_size)
        with ThreadPoolExecutor(self.options.threads, thread_name_prefix="webhook") as pool:
            list(pool.map(self.deliver, claims))
        return len(claims)

    def sweep_expired(self) -> int:
        """Queue the expiry events of trusted verdicts that expired since the last sweep."""
        with transaction(self._sessions) as session:
            return enqueue_expired_verdicts(session, self._clock())

    def claim(self, limit: int) -> list[ClaimedDelivery]:
        """Claim up to ``limit`` due deliveries, earliest first."""
        now = self._clock()
        claim_id = str(uuid.uuid4())
        due = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit)
        )
        if self._postgresql:
            due = due.with_for_update(skip_locked=True)

        with transaction(self._sessions) as session:
            ids = list(session.scalars(due))
            if not ids:
                return []
            claimed = list(session.scalars(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at <= now)
                .values(claim_id=claim_id,
                        next_attempt_at=now + timedelta(seconds=self.options.lease_seconds))
                .returning(WebhookDelivery.id)
                .execution_options(synchronize_session=False)
            ))
            rows = session.execute(
                select(WebhookDelivery, Webhook).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.id.in_(claimed)).order_by(WebhookDelivery.id)
            ).all()
            return [_claimed(delivery, webhook, claim_id) for delivery, webhook in rows]

    def deliver(self, claimed: ClaimedDelivery) -> None:
        """Send one claimed delivery and record the outcome, catching every Exception."""
        try:
            result = self._send(claimed)
            self._record(claimed, result)
        except Exception:  # noqa: BLE001 - one delivery must not stop the others
            log.exception("webhook delivery %d failed in edgetrust itself; it is retried after its "
                          "lease", claimed.delivery_id, extra={"device_id": claimed.device_id})

    def _send(self, claimed: ClaimedDelivery) -> AttemptResult:
        body = json.dumps(claimed.payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
        timestamp = int(self._clock().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"edgetrust/{__version__}",
            EVENT_HEADER: str(claimed.payload.get("type", EVENT_TYPE)),
            IDEMPOTENCY_HEADER: claimed.event_id,
            ATTEMPT_HEADER: str(claimed.attempts + 1),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(claimed.secret, timestamp, body),
        }
        timeout = self.options.timeout
        try:
            response = requests.post(claimed.url, data=body, headers=headers, timeout=(timeout, timeout),
                                     allow_redirects=False)
        except requests.Timeout:
            return AttemptResult(None, f"timed out after {timeout:g} s")
        except requests.RequestException as error:
            return AttemptResult(None, f"{type(error).__name__}: {error}"[:_ERROR_TEXT_LENGTH])
        if 200 <= response.status_code < 300:
            return AttemptResult(response.status_code, None)
        text = response.text.strip()[:_ERROR_TEXT_LENGTH]
        return AttemptResult(response.status_code, f"HTTP {response.status_code}: {text}")

    def _record(self, claimed: ClaimedDelivery, result: AttemptResult) -> None:
        now = self._clock()
        attempts = claimed.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "claim_id": None,
                                  "last_status_code": result.status_code, "last_error": result.error}
        if result.delivered:
            values.update(status="delivered", delivered_at=now, next_attempt_at=now)
        elif attempts >= self.options.max_attempts:
            values.update(status="failed", next_attempt_at=now)
        else:
            values.update(next_attempt_at=now + timedelta(seconds=self.options.retry_delay(attempts)))

        with transaction(self._sessions) as session:
            updated = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == claimed.delivery_id,
                       WebhookDelivery.claim_id == claimed.claim_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            lost = updated.rowcount != 1  # type: ignore[attr-defined] # CursorResult of an UPDATE
        self._report(claimed, result, values, lost)

    def _report(self, claimed: ClaimedDelivery, result: AttemptResult, values: Mapping[str, Any],
                lost: bool) -> None:
        extra = {"device_id": claimed.device_id}
        attempt = claimed.attempts + 1
        if lost:
            log.warning("webhook delivery %d to %s: the claim expired before the outcome was stored; "
                        "another worker may send it again", claimed.delivery_id, claimed.url, extra=extra)
        elif result.delivered:
            log.info("webhook event %s delivered to %s (attempt %d, HTTP %s)", claimed.event_id,
                     claimed.url, attempt, result.status_code, extra=extra)
        elif values.get("status") == "failed":
            log.warning("webhook event %s to %s failed after %d attempts, giving up: %s",
                        claimed.event_id, claimed.url, attempt, result.error, extra=extra)
        else:
            log.info("webhook event %s to %s failed (attempt %d of %d), retrying at %s: %s",
                     claimed.event_id, claimed.url, attempt, self.options.max_attempts,
                     as_utc(values["next_attempt_at"]).isoformat(), result.error, extra=extra)


def _claimed(delivery: WebhookDelivery, webhook: Webhook, claim_id: str) -> ClaimedDelivery:
    return ClaimedDelivery(
        delivery_id=delivery.id, claim_id=claim_id, webhook_id=webhook.id, url=webhook.url,
        secret=webhook.secret, event_id=delivery.event_id, device_id=delivery.device_id,
        payload=dict(delivery.payload), attempts=delivery.attempts,
    )


def start_delivery_worker(settings: Settings) -> threading.Event:
    """Start a delivery worker thread on its own engine; return the event that stops it.

    Meant for each worker process of ``edgetrust serve`` and for ``edgetrust poll``, which
    may run any number of workers against one database.
    """
    options = DeliveryOptions.from_settings(settings)
    engine = make_engine(settings.effective_database_url, pool_size=options.threads + 2)
    deliverer = WebhookDeliverer(make_session_factory(engine), options)
    stop = threading.Event()

    def run() -> None:
        try:
            deliverer.run(stop)
        finally:
            engine.dispose()

    threading.Thread(target=run, name="webhook-delivery", daemon=True).start()
    return stop


# --- Admin routes ------------------------------------------------------------------------------

_EXTENSION_KEY: Final = "webhooks"
DEFAULT_DELIVERY_LIMIT: Final = 50
MAX_DELIVERY_LIMIT: Final = 1000

blueprint = Blueprint("webhooks", __name__)


class WebhookService:
    """Add, list and remove webhook receivers."""

    def __init__(self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime] = utc_now) -> None:
        self._sessions = sessions
        self.clock = clock

    def add(self, url: str, secret: str) -> Webhook:
        try:
            with transaction(self._sessions) as session:
                webhook = Webhook(url=url, secret=secret, created_at=self.clock())
                session.add(webhook)
        except IntegrityError:
            raise WebhookError(f"a webhook for {url!r} exists already; delete it first to change its "
                               "secret", code="webhook-exists", field="url") from None
        log.info("webhook %d added for %s", webhook.id, url)
        return webhook

    def summaries(self) -> list[dict[str, Any]]:
        with self._sessions() as session:
            counts: dict[tuple[int, str], int] = {
                (webhook_id, status): count for webhook_id, status, count in session.execute(
                    select(WebhookDelivery.webhook_id, WebhookDelivery.status, func.count())
                    .group_by(WebhookDelivery.webhook_id, WebhookDelivery.status))
            }
            webhooks = session.scalars(select(Webhook).order_by(Webhook.id)).all()
            return [{**webhook_json(webhook),
                     "deliveries": {status: counts.get((webhook.id, status), 0)
                                    for status in DELIVERY_STATUSES}}
                    for webhook in webhooks]

    def deliveries(self, webhook_id: int, status: str | None, limit: int) -> list[WebhookDelivery]:
        with self._sessions() as session:
            _webhook(session, webhook_id)
            query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
            if status is not None:
                query = query.where(WebhookDelivery.status == status)
            return list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))

    def remove(self, webhook_id: int) -> None:
        with transaction(self._sessions) as session:
            session.delete(_webhook(session, webhook_id))
        log.info("webhook %d removed with its deliveries", webhook_id)


def _webhook(session: Session, webhook_id: int) -> Webhook:
    webhook = session.get(Webhook, webhook_id)
    if webhook is None:
        raise WebhookError(f"no webhook has id {webhook_id}", code="webhook-not-found")
    return webhook


def webhook_json(webhook: Webhook) -> dict[str, Any]:
    return {"id": webhook.id, "url": webhook.url, "created_at": _iso(webhook.created_at)}


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id, "event_id": delivery.event_id, "device_id": delivery.device_id,
        "status": delivery.status, "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "created_at": _iso(delivery.created_at), "delivered_at": _iso(delivery.delivered_at),
        "last_status_code": delivery.last_status_code, "last_error": delivery.last_error,
        "payload": delivery.payload,
    }


def parse_webhook_url(unverified_url: str) -> str:
    if len(unverified_url) > WEBHOOK_URL_MAX_LENGTH:
        raise RequestError("invalid-field", f"field 'url' has {len(unverified_url)} characters, at "
                           f"most {WEBHOOK_URL_MAX_LENGTH} are allowed", field="url")
    parts = urlsplit(unverified_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("invalid-field", f"field 'url' is {unverified_url[:80]!r}; expected an "
                           "http:// or https:// URL with a host", field="url")
    if parts.username is not None or parts.password is not None:
        raise RequestError("invalid-field", "field 'url' must not carry a user name or password, "
                           "which GET /v1/webhooks would show; authenticate with the signature",
                           field="url")
    return unverified_url


def parse_webhook_secret(unverified_secret: str | None) -> str:
    """Return the secret given, or a new random one when none was given."""
    if unverified_secret is None:
        return secrets.token_urlsafe(32)
    if not MIN_SECRET_LENGTH <= len(unverified_secret) <= WEBHOOK_SECRET_MAX_LENGTH:
        raise RequestError("invalid-field", f"field 'secret' has {len(unverified_secret)} characters, "
                           f"expected {MIN_SECRET_LENGTH} to {WEBHOOK_SECRET_MAX_LENGTH}", field="secret")
    return unverified_secret


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Add the /v1/webhooks routes to ``app``; return the error classes they raise."""
    app_services.extras[_EXTENSION_KEY] = WebhookService(app_services.sessions)
    app.register_blueprint(blueprint)
    return (VerifierError,)


def _service() -> WebhookService:
    service = services().extras[_EXTENSION_KEY]
    assert isinstance(service, WebhookService)
    return service


@blueprint.post("/v1/webhooks")
def add_webhook() -> tuple[Response, int]:
    body = json_body()
    url = parse_webhook_url(require_str(body, "url") or "")
    secret = parse_webhook_secret(require_str(body, "secret", optional=True))

    webhook = _service().add(url, secret)

    return jsonify({**webhook_json(webhook), "secret": secret}), 201


@blueprint.get("/v1/webhooks")
def list_webhooks() -> Response:
    return jsonify({"webhooks": _service().summaries()})


@blueprint.get("/v1/webhooks/<int:webhook_id>/deliveries")
def list_deliveries(webhook_id: int) -> Response:
    status = request.args.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise RequestError("invalid-field", f"query parameter 'status' is {status[:20]!r}, expected "
                           "pending, delivered or failed", field="status")
    limit = _limit()

    deliveries = _service().deliveries(webhook_id, status, limit)

    return jsonify({"webhook_id": webhook_id, "deliveries": [delivery_json(d) for d in deliveries]})


@blueprint.delete("/v1/webhooks/<int:webhook_id>")
def remove_webhook(webhook_id: int) -> tuple[str, int]:
    _service().remove(webhook_id)
    return "", 204


def _limit() -> int:
    text = request.args.get("limit")
    if text is None:
        return DEFAULT_DELIVERY_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_DELIVERY_LIMIT:
        raise RequestError("invalid-field", f"query parameter 'limit' is {text[:20]!r}, expected an "
                           f"integer from 1 to {MAX_DELIVERY_LIMIT}", field="limit")
    return int(text)
