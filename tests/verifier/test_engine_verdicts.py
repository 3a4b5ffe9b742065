"""Tests for verifier.verdicts: tri-state verdicts and their expiry without a writer."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from evidence.findings import Finding, Severity
from tests.verifier.conftest import START
from verifier.verdicts import (
    VERDICT_EXPIRED,
    Reason,
    Verdict,
    VerdictStatus,
    effective_status,
    effective_verdict,
    new_verdict,
    reasons_of,
    status_of_findings,
    trusted_until,
    unknown_verdict,
)


def trusted() -> Verdict:
    return new_verdict("device-1", VerdictStatus.TRUSTED, (), issued_at=START, attested_at=START,
                       expires_at=trusted_until(START, 10.0, 3))


def test_verdict_trusted_until_expiry() -> None:
    verdict = trusted()

    assert verdict.expires_at == START + timedelta(seconds=30)
    assert effective_status(verdict, START + timedelta(seconds=29)) is VerdictStatus.TRUSTED


def test_verdict_expired_reads_unknown() -> None:
    verdict = trusted()

    expired = effective_verdict(verdict, START + timedelta(seconds=30))

    assert expired.status is VerdictStatus.UNKNOWN
    assert [reason.code for reason in expired.reasons] == [VERDICT_EXPIRED]
    assert expired.verdict_id == verdict.verdict_id
    assert expired.attested_at == START
    assert expired.expires_at is None


def test_verdict_untrusted_never_expires() -> None:
    verdict = new_verdict("device-1", VerdictStatus.UNTRUSTED, (Reason("x", "y"),), issued_at=START,
                          attested_at=START)

    assert effective_verdict(verdict, START + timedelta(days=365)) is verdict


def test_verdict_missing_reads_unknown() -> None:
    assert effective_status(None, START) is VerdictStatus.UNKNOWN


def test_verdict_trusted_needs_expiry() -> None:
    with pytest.raises(ValueError, match="expires_at"):
        Verdict(uuid.uuid4(), "device-1", VerdictStatus.TRUSTED, (), START, START, None)


def test_verdict_unknown_has_no_expiry() -> None:
    verdict = unknown_verdict("device-1", "agent-unreachable", "timed out", issued_at=START)

    assert verdict.expires_at is None
    assert verdict.attested_at is None
    assert verdict.to_json()["reasons"] == [{"code": "agent-unreachable", "message": "timed out"}]


def test_verdict_status_from_findings() -> None:
    warning = Finding("w", Severity.WARNING, "warned")
    error = Finding("e", Severity.ERROR, "failed")
    pending = Finding("p", Severity.WARNING, "pending")

    assert status_of_findings([warning]) is VerdictStatus.TRUSTED
    assert status_of_findings([warning, pending], {"p"}) is VerdictStatus.UNKNOWN
    assert status_of_findings([pending, error], {"p"}) is VerdictStatus.UNTRUSTED
    assert reasons_of([warning, error], VerdictStatus.UNTRUSTED) == (Reason("e", "failed"),)
    assert reasons_of([warning, pending], VerdictStatus.UNKNOWN, {"p"}) == (Reason("p", "pending"),)
    assert reasons_of([warning], VerdictStatus.TRUSTED) == (Reason("w", "warned"),)
