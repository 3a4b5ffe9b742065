"""Push mode: devices behind NAT ask the verifier for a challenge and post their evidence.

Routes (``{id}`` is the agent uuid):

    POST   /v1/push/{id}             admin: put a device of the verifier into push mode (201)
    GET    /v1/push/{id}             admin: its push schedule and verdict
    DELETE /v1/push/{id}             admin: back to pull mode; the poller attests it at once (204)
    POST   /v1/push/{id}/challenge   device: a challenge for its next quote (201)
    POST   /v1/push/{id}/evidence    device: the evidence for a challenge -> the verdict

One round:

1. The device requests a challenge. The response carries a fresh nonce, the PCR mask its
   policies need (``mask``), ``ima_ml_entry`` (the verifier's next IMA entry for the device)
   and ``deadline``. The challenge is stored, so a restarted verifier still accepts it.
2. The device quotes over the nonce and posts ``challenge_id`` with the fields of a Keylime
   quote response: ``quote``, ``hash_alg``, ``sign_alg``, ``ima_measurement_list`` from
   entry ``ima_ml_entry`` (or from entry 0, as an agent sends it after a reboot),
   ``ima_measurement_list_entry`` and, when the mask has PCR 0, ``mb_measurement_list``.
3. In one transaction, the verifier marks the challenge used (it must be unused, of this
   device and before its deadline), runs ``engine.verify`` as the poller does, and stores the
   attestation, the next state and the verdict, with its webhook events.
4. The response carries the verdict and ``next_challenge_in``: the device's poll interval, or 0
   when the verifier needs the IMA list again from entry 0 after a reboot.

Authentication: the quote must verify with the enrolled AK over the challenge's nonce. Evidence
that fails this (a forged or replayed quote, ``ak-changed`` from a foreign key) is rejected
with 403 ``push-evidence-not-authenticated``; nothing is stored and the challenge stays
unused, so nobody but the device can change its verdict. Authenticated evidence that fails a
policy is a result: stored as an untrusted verdict. Devices not added to the verifier, in pull
mode or paused are rejected before any of this.

Schedule: a device's ``poll_interval`` is its push interval. A trusted verdict from pushed
evidence expires at the attestation time plus the interval plus ``verifier_push_grace_seconds``,
so a device that misses its schedule reads as unknown from then on. The expiry is stored with
the verdict and compared at every read, so a verifier restart changes nothing about it.

NOTE: the poller knows nothing of push mode. Putting a device into push mode moves its
``next_poll_at`` to :data:`PUSH_MODE_NEXT_POLL_AT` so that no poller claims it, and
``POST /v1/devices/{id}/resume`` would undo that and make pollers pull the device too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from flask import Blueprint, Flask, Response, jsonify
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.context import AppServices, services
from edgetrust.db import transaction
from edgetrust.web import RequestError, json_body, require_str
from evidence.errors import EvidenceError
from evidence.findings import Finding
from registrar.models import RegisteredDevice
from verifier.api import parse_device_id, verdict_json
from verifier.engine import (
    AK_CHANGED,
    IMA_LIST_RESTART_NEEDED,
    QUOTE_BANK_NOT_ACCEPTED,
    QUOTE_MALFORMED,
    Challenge,
    EngineOptions,
    Enrollment,
    Evidence,
    PolicySet,
    VerificationResult,
    pcr_mask,
    requested_pcrs,
    verify,
)
from verifier.errors import DeviceNotActive, VerifierDeviceNotFound, VerifierError
from verifier.evidence_api import engine_options, parse_quote_response
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.notify import PreviousVerdict, enqueue_verdict_change
from verifier.outbox_models import PushChallenge, PushDevice
from verifier.poller import PolicyResolver, as_utc, enrollment_of, new_nonce, utc_now
from verifier.state import DeviceState
from verifier.verdicts import Verdict, VerdictStatus

log = logging.getLogger(__name__)

# next_poll_at of a push-mode device: never due for a poller.
PUSH_MODE_NEXT_POLL_AT: Final = datetime(9999, 1, 1, tzinfo=UTC)
# The poller column of attestations that came from pushed evidence.
PUSH_POLLER_NAME: Final = "push"
# Open challenges one device may hold; issuing another drops the oldest.
MAX_OPEN_CHALLENGES: Final = 8
_CHALLENGE_ID_LENGTH: Final = 36
_SIGN_ALGS: Final = ("rsassa", "rsapss", "ecdsa")
# Finding codes meaning that the quote was not signed by the enrolled AK over the challenge's
# nonce, or could not be read far enough to tell.
NOT_AUTHENTICATED_CODES: Final = frozenset({
    QUOTE_MALFORMED,
    QUOTE_BANK_NOT_ACCEPTED,
    "quote-signature-malformed",
    "quote-signature-algorithm-mismatch",
    "quote-signature-invalid",
    "quote-nonce-mismatch",
})


class PushError(VerifierError):
    """A push request the verifier rejects; ``code`` decides the HTTP status."""

    default_code = "push-request-invalid"


# --- Requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedEvidence:
    """The body of ``POST /v1/push/{id}/evidence``, checked for form only."""

    challenge_id: str
    evidence: Evidence
    sign_alg: str | None


def parse_pushed_evidence(unverified: Mapping[str, Any]) -> PushedEvidence:
    """Check the form of each field; raise RequestError naming the first one at fault."""
    challenge_id = require_str(unverified, "challenge_id") or ""
    try:
        challenge_id = str(uuid.UUID(challenge_id))
    except ValueError:
        raise RequestError("invalid-field", f"field 'challenge_id' is {challenge_id[:80]!r}, expected "
                           "the challenge_id of POST /v1/push/{id}/challenge", field="challenge_id") from None
    sign_alg = require_str(unverified, "sign_alg", optional=True)
    if sign_alg is not None and sign_alg not in _SIGN_ALGS:
        raise RequestError("invalid-field", f"field 'sign_alg' is {sign_alg[:20]!r}, expected one of "
                           f"{', '.join(_SIGN_ALGS)}", field="sign_alg")
    return PushedEvidence(challenge_id, parse_quote_response(unverified), sign_alg)


# --- Results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedChallenge:
    challenge_id: str
    nonce: str
    pcrs: frozenset[int]
    ima_offset: int
    issued_at: datetime
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "challenge_id": self.challenge_id,
            "nonce": self.nonce,
            "mask": pcr_mask(self.pcrs),
            "pcrs": sorted(self.pcrs),
            "ima_ml_entry": self.ima_offset,
            "issued_at": self.issued_at.isoformat(),
            "deadline": self.expires_at.isoformat(),
        }


@dataclass(frozen=True)
class PushReceipt:
    """The verdict on pushed evidence and when the device should ask for its next challenge."""

    verdict: Verdict
    next_challenge_at: datetime
    now: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.to_json(),
            "next_challenge_at": self.next_challenge_at.isoformat(),
            "next_challenge_in": max(0.0, (self.next_challenge_at - self.now).total_seconds()),
        }


@dataclass(frozen=True)
class AttestationRecord:
    """The columns of an attestation row other than the verdict and the findings."""

    poller: str
    nonce: str | None
    scheduled_at: datetime
    started_at: datetime
    finished_at: datetime
    ima_start_index: int | None
    evidence: dict[str, Any]


def store_attestation(session: Session, device: VerifierDevice, result: VerificationResult,
                      record: AttestationRecord) -> bool:
    """Store one attestation of ``device``, a row loaded for update in ``session``.

    Writes the next state and the verdict into the device row, adds the attestation row, adds
    a verdict-change row when the status or reason codes changed, and queues the webhook
    events. The caller sets the schedule columns (next_poll_at, lease) and commits. Returns
    whether the verdict changed.
    """
    verdict = result.verdict
    state = result.next_state
    reasons = [reason.to_json() for reason in verdict.reasons]
    previous = PreviousVerdict.of_device(device)

    device.state = state.to_json()
    device.verdict_id = str(verdict.verdict_id)
    device.verdict_status = verdict.status.value
    device.verdict_reasons = reasons
    device.verdict_policies = [policy.to_json() for policy in verdict.policies]
    device.verdict_issued_at = verdict.issued_at
    device.verdict_attested_at = verdict.attested_at
    device.verdict_expires_at = verdict.expires_at
    device.updated_at = record.finished_at

    attestation = Attestation(
        device_id=device.device_id,
        verdict_id=str(verdict.verdict_id),
        status=verdict.status.value,
        poller=record.poller,
        nonce=record.nonce,
        scheduled_at=record.scheduled_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        boot_session=state.boot.reset_count if state.boot else None,
        ima_start_index=record.ima_start_index,
        ima_next_index=state.ima.next_index,
        evidence=record.evidence,
        findings=[finding.to_json() for finding in result.findings],
    )
    session.add(attestation)
    session.flush()

    changed = (verdict.status.value, tuple(r["code"] for r in reasons)) != (previous.status,
                                                                             previous.reason_codes)
    if changed:
        session.add(VerdictRecord(
            verdict_id=str(verdict.verdict_id), device_id=device.device_id, status=verdict.status.value,
            reasons=reasons, policies=device.verdict_policies, issued_at=verdict.issued_at,
            attested_at=verdict.attested_at, expires_at=verdict.expires_at, attestation_id=attestation.id,
        ))
    enqueue_verdict_change(session, verdict, previous, now=record.finished_at)
    return changed


# --- The service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushOptions:
    challenge_seconds: float = 60.0
    grace_seconds: float = 30.0
    engine: EngineOptions = EngineOptions()


@dataclass(frozen=True)
class _Prepared:
    """The device rows, enrollment, policies and state that a submit loads in its transaction."""

    device: VerifierDevice
    push_device: PushDevice
    enrollment: Enrollment
    policies: PolicySet
    state: DeviceState | None


class PushService:
    """Push mode for the devices of the verifier (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], options: PushOptions, *,
                 clock: Callable[[], datetime] = utc_now,
                 nonce_source: Callable[[], str] = new_nonce) -> None:
        self._sessions = sessions
        self.options = options
        self.clock = clock
        self._new_nonce = nonce_source
        self._resolver = PolicyResolver()

    # --- admin ---

    def enable(self, device_id: str) -> bool:
        """Put a device of the verifier into push mode; return whether it was in pull mode."""
        now = self.clock()
        try:
            with transaction(self._sessions) as session:
                device = _verifier_device(session, device_id)
                if _push_device(session, device_id) is not None:
                    return False
                session.add(PushDevice(device_id=device_id, enabled_at=now, last_evidence_at=None))
                # A poll in flight loses its lease, so its result is discarded.
                device.next_poll_at = PUSH_MODE_NEXT_POLL_AT
                device.lease_owner = device.lease_id = device.lease_expires_at = None
                device.updated_at = now
        except IntegrityError:
            return False  # another request enabled it at the same time
        log.info("push mode on: the device pushes its evidence every %.1f s", device.poll_interval,
                 extra={"device_id": device_id})
        return True

    def disable(self, device_id: str) -> None:
        """Return a device to pull mode; it is due for the poller at once."""
        now = self.clock()
        with transaction(self._sessions) as session:
            device = _verifier_device(session, device_id)
            push_device = _require_push_device(session, device_id)
            session.delete(push_device)
            device.next_poll_at = now
            device.consecutive_failures = 0
            device.updated_at = now
        log.info("push mode off: the poller attests the device again", extra={"device_id": device_id})

    def status(self, device_id: str) -> dict[str, Any]:
        """Return the device's push schedule, open challenges and verdict."""
        now = self.clock()
        with self._sessions() as session:
            device = _verifier_device(session, device_id)
            push_device = _require_push_device(session, device_id)
            open_challenges = session.scalar(
                select(func.count()).select_from(PushChallenge)
                .where(PushChallenge.device_id == device_id, PushChallenge.used_at.is_(None),
                       PushChallenge.expires_at > now)) or 0
            return _status_json(device, push_device, self.options.grace_seconds, open_challenges,
                                verdict_json(device, now))

    # --- device ---

    def issue_challenge(self, device_id: str) -> IssuedChallenge:
        """Store and return a challenge for the device's next quote."""
        now = self.clock()
        with transaction(self._sessions) as session:
            device = _pushing_device(session, device_id)
            pcrs = self._requested_pcrs(session, device)
            state = _state_of(device)
            challenge = IssuedChallenge(
                challenge_id=str(uuid.uuid4()),
                nonce=self._new_nonce(),
                pcrs=pcrs,
                ima_offset=state.ima.next_index if state is not None else 0,
                issued_at=now,
                expires_at=now + timedelta(seconds=self.options.challenge_seconds),
            )
            _drop_stale_challenges(session, device_id, now)
            session.add(PushChallenge(
                challenge_id=challenge.challenge_id, device_id=device_id, nonce=challenge.nonce,
                pcrs=sorted(pcrs), ima_offset=challenge.ima_offset, issued_at=now,
                expires_at=challenge.expires_at, used_at=None,
            ))
        log.debug("challenge %s issued, IMA from entry %d", challenge.challenge_id, challenge.ima_offset,
                  extra={"device_id": device_id})
        return challenge

    def _requested_pcrs(self, session: Session, device: VerifierDevice) -> frozenset[int]:
        policies = self._resolver.load_many(session, [device])[device.device_id]
        # Policies that cannot be loaded fail the submit, so the challenge requests PCR 16 only.
        return requested_pcrs(policies if isinstance(policies, PolicySet) else PolicySet())

    def submit(self, device_id: str, pushed: PushedEvidence) -> PushReceipt:
        """Verify and store evidence for a challenge; see steps 3 and 4 of the module docstring."""
        received_at = self.clock()
        with transaction(self._sessions) as session:
            challenge = _use_challenge(session, device_id, pushed.challenge_id, received_at)
            _check_ima_offset(pushed.evidence, challenge)
            prepared = self._prepare(session, device_id)

            result = self._verify(pushed.evidence, prepared, challenge)
            _authenticate(result, prepared, device_id)

            finished_at = self.clock()
            changed = self._store(session, prepared, result, challenge, received_at, finished_at)
            next_challenge_at = self._next_challenge_at(prepared.device, result, finished_at)
        _report(device_id, result, prepared, changed)
        return PushReceipt(result.verdict, next_challenge_at, finished_at)

    def _prepare(self, session: Session, device_id: str) -> _Prepared:
        row = session.execute(
            select(VerifierDevice, RegisteredDevice)
            .join(RegisteredDevice, RegisteredDevice.device_id == VerifierDevice.device_id)
            .where(VerifierDevice.device_id == device_id)
            .with_for_update(of=VerifierDevice)
        ).one_or_none()
        if row is None:
            raise _not_in_verifier(device_id)
        device, registered = row
        push_device = _require_push_device(session, device_id)
        if device.paused:
            raise _paused(device_id)
        if not registered.active:
            raise DeviceNotActive(f"device {device_id!r} has a pending credential challenge in the "
                                  "registrar and no proven AK; push again after the agent activates")
        try:
            enrollment = enrollment_of(registered.device_id, registered.aik_tpm, registered.ek_tpm)
        except EvidenceError as error:
            log.error("the registrar's AK or EK of the device cannot be parsed: %s", error.message,
                      extra={"device_id": device_id})
            raise PushError("the registrar's AK or EK of this device cannot be parsed; delete the "
                            "device in the registrar and enroll it again",
                            code="enrollment-invalid") from None
        policies = self._resolver.load_many(session, [device])[device_id]
        if isinstance(policies, Finding):
            raise PushError(f"{policies.message}; push again later", code="policy-unavailable")
        return _Prepared(device, push_device, enrollment, policies, _state_of(device))

    def _verify(self, evidence: Evidence, prepared: _Prepared,
                challenge: PushChallenge) -> VerificationResult:
        # A pushed trusted verdict lasts one push interval and the grace, so a device that
        # misses its schedule turns unknown.
        lifetime = prepared.device.poll_interval + self.options.grace_seconds
        return verify(
            evidence, prepared.enrollment, prepared.policies, prepared.state,
            challenge=Challenge(challenge.nonce.encode("ascii"), frozenset(challenge.pcrs),
                                challenge.ima_offset, as_utc(challenge.issued_at)),
            now=self.clock(), poll_interval=lifetime,
            options=replace(self.options.engine, verdict_lifetime_intervals=1),
        )

    def _store(self, session: Session, prepared: _Prepared, result: VerificationResult,
               challenge: PushChallenge, received_at: datetime, finished_at: datetime) -> bool:
        record = AttestationRecord(
            poller=PUSH_POLLER_NAME,
            nonce=challenge.nonce,
            scheduled_at=as_utc(challenge.issued_at),
            started_at=received_at,
            finished_at=finished_at,
            ima_start_index=challenge.ima_offset,
            evidence=_evidence_summary(challenge, result),
        )
        changed = store_attestation(session, prepared.device, result, record)
        device = prepared.device
        device.next_poll_at = PUSH_MODE_NEXT_POLL_AT
        device.consecutive_failures = 0
        device.lease_owner = device.lease_id = device.lease_expires_at = None
        prepared.push_device.last_evidence_at = finished_at
        return changed

    def _next_challenge_at(self, device: VerifierDevice, result: VerificationResult,
                           now: datetime) -> datetime:
        if any(finding.code == IMA_LIST_RESTART_NEEDED for finding in result.findings):
            return now  # the next challenge requests the IMA list from entry 0
        return now + timedelta(seconds=device.poll_interval)


# --- Steps of a submit -------------------------------------------------------------------------


def _use_challenge(session: Session, device_id: str, challenge_id: str, now: datetime) -> PushChallenge:
    """Mark the challenge used and return it; raise PushError saying why it cannot be used."""
    used = session.execute(
        update(PushChallenge)
        .where(PushChallenge.challenge_id == challenge_id, PushChallenge.device_id == device_id,
               PushChallenge.used_at.is_(None), PushChallenge.expires_at > now)
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    challenge = session.scalars(
        select(PushChallenge).where(PushChallenge.challenge_id == challenge_id,
                                    PushChallenge.device_id == device_id)
    ).one_or_none()
    if used.rowcount == 1 and challenge is not None:  # type: ignore[attr-defined] # CursorResult
        return challenge

    if challenge is None:
        _pushing_device(session, device_id)
        raise PushError(f"challenge {challenge_id} was not issued to device {device_id!r} or was "
                        "dropped; ask for a new one", code="push-challenge-not-found", field="challenge_id")
    if challenge.used_at is not None:
        log.warning("evidence for challenge %s rejected: the challenge was used at %s (a replay, or a "
                    "device that sent its evidence twice)", challenge_id,
                    as_utc(challenge.used_at).isoformat(), extra={"device_id": device_id})
        raise PushError(f"challenge {challenge_id} was used already; ask for a new one",
                        code="push-challenge-used", field="challenge_id")
    log.info("evidence for challenge %s rejected: its deadline %s has passed", challenge_id,
             as_utc(challenge.expires_at).isoformat(), extra={"device_id": device_id})
    raise PushError(f"challenge {challenge_id} expired at {as_utc(challenge.expires_at).isoformat()}; "
                    "ask for a new one and send the evidence before its deadline",
                    code="push-challenge-expired", field="challenge_id")


def _check_ima_offset(evidence: Evidence, challenge: PushChallenge) -> None:
    """Require the IMA list to start at the entry requested, or at entry 0 after a reboot."""
    if evidence.ima_measurement_list is None:
        return
    start = evidence.ima_start_index
    if start not in (challenge.ima_offset, 0):
        raise RequestError(
            "push-ima-offset-mismatch",
            f"field 'ima_measurement_list_entry' is {start}, but the challenge requested the IMA list "
            f"from entry {challenge.ima_offset} (or from entry 0 after a reboot)",
            field="ima_measurement_list_entry",
        )


def _authenticate(result: VerificationResult, prepared: _Prepared, device_id: str) -> None:
    """Raise PushError unless the quote verified with the enrolled AK over the challenge's nonce.

    One ``ak-changed`` finding needs no quote: the registrar has a new AK for the device. The
    verifier knows that itself, so that finding is stored like any other result.
    """
    state = prepared.state
    repinned = state is not None and state.ak_name != prepared.enrollment.ak.name
    codes = {finding.code for finding in result.findings}
    failed = codes & NOT_AUTHENTICATED_CODES or (AK_CHANGED in codes and not repinned)
    if not failed:
        return
    names = ", ".join(sorted(codes & (NOT_AUTHENTICATED_CODES | {AK_CHANGED})))
    log.warning("pushed evidence rejected: its quote is not signed by the enrolled AK over the "
                "challenge's nonce (%s)", names, extra={"device_id": device_id})
    raise PushError(f"the quote is not signed by the enrolled AK over the challenge's nonce ({names}); "
                    "nothing was stored", code="push-evidence-not-authenticated", field="quote")


def _report(device_id: str, result: VerificationResult, prepared: _Prepared, changed: bool) -> None:
    verdict = result.verdict
    codes = ", ".join(reason.code for reason in verdict.reasons) or "none"
    if not changed:
        log.debug("pushed evidence: verdict %s again (reasons: %s)", verdict.status.value, codes,
                  extra={"device_id": device_id})
        return
    level = logging.INFO if verdict.status is VerdictStatus.TRUSTED else logging.WARNING
    log.log(level, "pushed evidence: verdict %s (reasons: %s); verdict %s", verdict.status.value, codes,
            verdict.verdict_id, extra={"device_id": device_id})


def _evidence_summary(challenge: PushChallenge, result: VerificationResult) -> dict[str, Any]:
    counters = result.next_state.counters
    summary: dict[str, Any] = {
        "mode": "push",
        "challenge_id": challenge.challenge_id,
        "pcrs": sorted(challenge.pcrs),
        "ima_measurement_list_entry": challenge.ima_offset,
    }
    if counters is not None:
        summary["clock_info"] = {"clock": counters.clock, "reset_count": counters.reset_count,
                                 "restart_count": counters.restart_count, "safe": counters.safe}
    return summary


# --- Loading -----------------------------------------------------------------------------------


def _verifier_device(session: Session, device_id: str) -> VerifierDevice:
    query = select(VerifierDevice).where(VerifierDevice.device_id == device_id)
    device = session.scalars(query).one_or_none()
    if device is None:
        raise _not_in_verifier(device_id)
    return device


def _push_device(session: Session, device_id: str) -> PushDevice | None:
    return session.scalars(select(PushDevice).where(PushDevice.device_id == device_id)).one_or_none()


def _require_push_device(session: Session, device_id: str) -> PushDevice:
    push_device = _push_device(session, device_id)
    if push_device is None:
        raise PushError(f"device {device_id!r} is in pull mode: the verifier polls it and takes no pushed "
                        f"evidence; put it into push mode with POST /v1/push/{device_id}",
                        code="device-not-in-push-mode")
    return push_device


def _pushing_device(session: Session, device_id: str) -> VerifierDevice:
    """Return the device if it may push now: in the verifier, in push mode and not paused."""
    device = _verifier_device(session, device_id)
    _require_push_device(session, device_id)
    if device.paused:
        raise _paused(device_id)
    return device


def _not_in_verifier(device_id: str) -> VerifierDeviceNotFound:
    return VerifierDeviceNotFound(f"device {device_id!r} is not in the verifier; add it with POST "
                                  f"/v1/devices/{device_id}, then put it into push mode")


def _paused(device_id: str) -> PushError:
    return PushError(f"attestation of device {device_id!r} is paused; resume it with POST "
                     f"/v1/devices/{device_id}/resume", code="device-paused")


def _state_of(device: VerifierDevice) -> DeviceState | None:
    if device.state is None:
        return None
    try:
        return DeviceState.from_json(device.state)
    except VerifierError as error:
        # The next attestation starts a fresh session: IMA from entry 0, counters unknown.
        log.error("stored state is unusable, starting from scratch: %s", error,
                  extra={"device_id": device.device_id})
        return None


def _drop_stale_challenges(session: Session, device_id: str, now: datetime) -> None:
    """Delete the device's used and expired challenges, and the oldest open ones over the limit."""
    session.execute(delete(PushChallenge).where(
        PushChallenge.device_id == device_id,
        (PushChallenge.used_at.is_not(None)) | (PushChallenge.expires_at <= now)))
    keep = (select(PushChallenge.id).where(PushChallenge.device_id == device_id)
            .order_by(PushChallenge.issued_at.desc(), PushChallenge.id.desc())
            .limit(MAX_OPEN_CHALLENGES - 1))
    session.execute(delete(PushChallenge).where(PushChallenge.device_id == device_id,
                                                PushChallenge.id.not_in(keep)))


def _status_json(device: VerifierDevice, push_device: PushDevice, grace: float, open_challenges: int,
                 verdict: dict[str, Any]) -> dict[str, Any]:
    last = push_device.last_evidence_at
    due = as_utc(last or push_device.enabled_at) + timedelta(seconds=device.poll_interval)
    return {
        "device_id": device.device_id,
        "mode": "push",
        "push_interval": device.poll_interval,
        "grace_seconds": grace,
        "enabled_at": as_utc(push_device.enabled_at).isoformat(),
        "last_evidence_at": None if last is None else as_utc(last).isoformat(),
        "next_evidence_due_at": due.isoformat(),
        "late_after": (due + timedelta(seconds=grace)).isoformat(),
        "open_challenges": open_challenges,
        "paused": device.paused,
        "verdict": verdict,
    }


# --- Routes ------------------------------------------------------------------------------------

_EXTENSION_KEY: Final = "push"

blueprint = Blueprint("push", __name__)


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Build the push service and add its routes to ``app``."""
    settings = app_services.settings
    options = PushOptions(challenge_seconds=settings.verifier_push_challenge_seconds,
                          grace_seconds=settings.verifier_push_grace_seconds,
                          engine=engine_options(settings))
    app_services.extras[_EXTENSION_KEY] = PushService(app_services.sessions, options)
    app.register_blueprint(blueprint)
    return (VerifierError,)


def _service() -> PushService:
    service = services().extras[_EXTENSION_KEY]
    assert isinstance(service, PushService)
    return service


@blueprint.post("/v1/push/<device_id>")
def enable_push(device_id: str) -> tuple[Response, int]:
    device_id = parse_device_id(device_id)

    service = _service()
    created = service.enable(device_id)

    return jsonify(service.status(device_id)), 201 if created else 200


@blueprint.get("/v1/push/<device_id>")
def get_push(device_id: str) -> Response:
    return jsonify(_service().status(parse_device_id(device_id)))


@blueprint.delete("/v1/push/<device_id>")
def disable_push(device_id: str) -> tuple[str, int]:
    _service().disable(parse_device_id(device_id))
    return "", 204


@blueprint.post("/v1/push/<device_id>/challenge")
def issue_challenge(device_id: str) -> tuple[Response, int]:
    device_id = parse_device_id(device_id)

    challenge = _service().issue_challenge(device_id)

    return jsonify(challenge.to_json()), 201


@blueprint.post("/v1/push/<device_id>/evidence")
def submit_evidence(device_id: str) -> Response:
    device_id = parse_device_id(device_id)
    pushed = parse_pushed_evidence(json_body())

    receipt = _service().submit(device_id, pushed)

    return jsonify(receipt.to_json())
