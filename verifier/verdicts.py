"""Verdicts: what the verifier concluded about a device, tri-state and time-bounded.

| status      | meaning                                                                 |
|-------------|-------------------------------------------------------------------------|
| `trusted`   | the last attestation passed and ``expires_at`` has not passed           |
| `untrusted` | the last attestation failed a policy, or its evidence was forged or inconsistent |
| `unknown`   | never attested, unreachable, inconclusive, or a trusted verdict expired |

A trusted verdict always carries ``expires_at``: ``attested_at`` plus a number of poll
intervals. ``effective_verdict(verdict, at)`` turns it into ``unknown`` from then on, so the
expiry needs no writer and a stopped poller can never leave a device looking trusted.
Untrusted and unknown verdicts do not expire: only a new attestation changes them.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from evidence.findings import Finding, Severity

# Reason of a trusted verdict read after its expiry.
VERDICT_EXPIRED = "verdict-expired"
# Reason of a device that has not been attested since it was added.
NOT_ATTESTED = "not-attested-yet"


class VerdictStatus(enum.StrEnum):
    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Reason:
    """One finding behind a verdict: its stable code and its message."""

    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class AppliedPolicy:
    """A policy that an attestation was evaluated against, by kind, name and version."""

    kind: str
    name: str
    version: int
    content_hash: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "version": self.version,
                "content_hash": self.content_hash}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AppliedPolicy:
        return cls(str(data["kind"]), str(data["name"]), int(data["version"]),
                   str(data["content_hash"]))


@dataclass(frozen=True, slots=True)
class Verdict:
    """A verdict as issued; use ``effective_verdict`` to read it at a later time."""

    verdict_id: uuid.UUID
    device_id: str
    status: VerdictStatus
    reasons: tuple[Reason, ...]
    issued_at: datetime
    # Time of the attestation the verdict rests on; None when there was none (unreachable).
    attested_at: datetime | None
    # Set exactly when the status is trusted.
    expires_at: datetime | None
    policies: tuple[AppliedPolicy, ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.status is VerdictStatus.TRUSTED) != (self.expires_at is not None):
            raise ValueError("a trusted verdict needs expires_at, and only a trusted one has it")

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict_id": str(self.verdict_id),
            "device_id": self.device_id,
            "status": self.status.value,
            "reasons": [reason.to_json() for reason in self.reasons],
            "issued_at": _iso(self.issued_at),
            "attested_at": _iso(self.attested_at),
            "expires_at": _iso(self.expires_at),
            "policies": [policy.to_json() for policy in self.policies],
        }


def effective_verdict(verdict: Verdict, at: datetime) -> Verdict:
    """Return the verdict as it stands at time ``at``.

    A trusted verdict whose ``expires_at`` is not after ``at`` reads as unknown with the
    reason ``verdict-expired``; every other verdict is returned unchanged.
    """
    if verdict.status is not VerdictStatus.TRUSTED or verdict.expires_at is None:
        return verdict
    if at < verdict.expires_at:
        return verdict
    reason = Reason(
        VERDICT_EXPIRED,
        f"the last passing attestation at {_iso(verdict.attested_at)} expired at "
        f"{_iso(verdict.expires_at)} without a newer one",
    )
    return replace(verdict, status=VerdictStatus.UNKNOWN, reasons=(reason,), expires_at=None)


def effective_status(verdict: Verdict | None, at: datetime) -> VerdictStatus:
    """Return the status of ``verdict`` at time ``at``; no verdict at all is unknown."""
    if verdict is None:
        return VerdictStatus.UNKNOWN
    return effective_verdict(verdict, at).status


def trusted_until(attested_at: datetime, poll_interval: float, expiry_intervals: int) -> datetime:
    """Return when a trusted verdict from ``attested_at`` expires without a newer attestation."""
    return attested_at + timedelta(seconds=poll_interval * expiry_intervals)


def status_of_findings(findings: Iterable[Finding], inconclusive_codes: Iterable[str] = ()) -> VerdictStatus:
    """Return untrusted if any finding is an error, unknown if one is inconclusive, else trusted."""
    inconclusive = frozenset(inconclusive_codes)
    status = VerdictStatus.TRUSTED
    for finding in findings:
        if finding.severity >= Severity.ERROR:
            return VerdictStatus.UNTRUSTED
        if finding.code in inconclusive:
            status = VerdictStatus.UNKNOWN
    return status


def reasons_of(
    findings: Iterable[Finding], status: VerdictStatus, inconclusive_codes: Iterable[str] = ()
) -> tuple[Reason, ...]:
    """Return the findings that explain ``status``: the errors of an untrusted verdict, the
    inconclusive findings of an unknown one, and the warnings of a trusted one."""
    inconclusive = frozenset(inconclusive_codes)
    if status is VerdictStatus.UNTRUSTED:
        chosen = [f for f in findings if f.severity >= Severity.ERROR]
    elif status is VerdictStatus.UNKNOWN:
        chosen = [f for f in findings if f.code in inconclusive]
    else:
        chosen = [f for f in findings if f.severity >= Severity.WARNING]
    return tuple(Reason(f.code, f.message) for f in chosen)


def new_verdict(
    device_id: str,
    status: VerdictStatus,
    reasons: Sequence[Reason],
    *,
    issued_at: datetime,
    attested_at: datetime | None,
    expires_at: datetime | None = None,
    policies: Sequence[AppliedPolicy] = (),
) -> Verdict:
    """Issue a verdict with a fresh ``verdict_id``."""
    return Verdict(
        verdict_id=uuid.uuid4(),
        device_id=device_id,
        status=status,
        reasons=tuple(reasons),
        issued_at=issued_at,
        attested_at=attested_at,
        expires_at=expires_at if status is VerdictStatus.TRUSTED else None,
        policies=tuple(policies),
    )


def unknown_verdict(device_id: str, code: str, message: str, *, issued_at: datetime) -> Verdict:
    """Issue an unknown verdict for one reason, such as an unreachable agent."""
    return new_verdict(device_id, VerdictStatus.UNKNOWN, (Reason(code, message),),
                       issued_at=issued_at, attested_at=None)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
