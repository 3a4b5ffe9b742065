"""The verification engine: one pure function from evidence to a verdict.

``verify(unverified_evidence, enrollment, policies, previous_state, *, challenge, now,
poll_interval, options) -> VerificationResult(verdict, findings, next_state)`` touches no
database and no network; the poller, the push endpoint and the stateless verify endpoint all
call it. It runs these steps, in this order, and reports each failure as a finding with a
stable code:

1. AK pin: the enrolled AK is the one that signed the quotes accepted so far
   (``ak-changed``: the device was enrolled again and must be added to the verifier again).
2. Quote: parse the Keylime quote string (``quote-malformed``) and check that its PCR bank is
   one the verifier accepts (``quote-bank-not-accepted``). Then ``evidence.quote.verify_quote``
   checks it with the enrolled AK, the nonce sent, the PCR selection requested and the
   counters of the last accepted quote. A signature that does not verify, from a quote whose qualifiedSigner
   is not the enrolled AK, is reported as ``ak-changed`` (re-enrollment needed), not as
   tampering. A larger resetCount starts a new boot session: IMA state and learned keys
   start from scratch and the list is replayed from entry 0, without a false alarm.
   Later steps run only on a quote that passed, because only then are its PCR values trusted.
3. IMA measurement list, when a runtime policy applies: the list continues where the last
   attestation ended, or starts again at entry 0; it replays to the quoted PCR 10 after some
   prefix (a list ahead of the quote passes); PCR 10 keeps up with the list (progress); the
   first entry of a list from 0 is the boot_aggregate of the quoted PCRs
   (``evidence.ima.verify_measurement_list``).
4. Runtime policy: the entries that the quote covers and that were not verified before are
   evaluated against the runtime policy (``policies.runtime.evaluate_incremental``).
5. UEFI event log, when the device sent one or a measured-boot policy applies: it replays to
   the quoted PCRs (``evidence.eventlog.verify_event_log``), then the measured-boot policy
   evaluates it (``policies.measured_boot.evaluate_measured_boot``).
6. PCR policy: each PCR it names was quoted with one of the values it allows
   (``policies.pcr.evaluate_pcrs``).
7. Verdict: untrusted on any error finding, unknown on an inconclusive finding, else trusted
   until ``options.verdict_lifetime_intervals`` poll intervals from ``now``.

The next state advances only as far as the evidence passed: entries that failed the runtime
policy are verified again next time, so a device stays untrusted until the policy allows them
or the device reboots.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Generic, NamedTuple, TypeVar

from evidence.errors import ImaParseError, ParseError
from evidence.eventlog import parse_event_log, verify_event_log
from evidence.findings import Finding, Severity, is_failure
from evidence.ima import (
    BOOT_AGGREGATE_NAME,
    ImaReplayState,
    ImaVerification,
    boot_aggregate_pcrs,
    compute_boot_aggregate,
    parse_ascii_list,
    verify_measurement_list,
)
from evidence.quote import QuoteResult, verify_quote
from evidence.tpm import (
    KeylimeQuote,
    PcrBank,
    PcrSelection,
    PublicArea,
    TpmAlg,
    parse_keylime_quote,
    parse_tpms_attest,
)
from policies.measured_boot import MeasuredBootPolicy, evaluate_measured_boot
from policies.pcr import PcrPolicy, evaluate_pcrs
from policies.runtime import EMPTY_KEYRING_STATE, RuntimePolicy, evaluate_incremental
from verifier.state import BootSession, DeviceState
from verifier.verdicts import (
    AppliedPolicy,
    Verdict,
    VerdictStatus,
    new_verdict,
    reasons_of,
    status_of_findings,
    trusted_until,
)

# Finding codes of the engine's own checks; the evidence and policies packages add theirs.
AK_CHANGED: Final = "ak-changed"
QUOTE_MALFORMED: Final = "quote-malformed"
QUOTE_BANK_NOT_ACCEPTED: Final = "quote-bank-not-accepted"
IMA_LIST_MISSING: Final = "ima-list-missing"
IMA_LIST_MALFORMED: Final = "ima-list-malformed"
IMA_LIST_RESTART_NEEDED: Final = "ima-list-restart-needed"
IMA_LIST_REPLAYED_FROM_START: Final = "ima-list-replayed-from-start"
IMA_BOOT_AGGREGATE_NOT_CHECKED: Final = "ima-boot-aggregate-not-checked"
EVENTLOG_MISSING: Final = "eventlog-missing"

# Findings that make a verdict unknown rather than trusted: the evidence could not be judged.
INCONCLUSIVE_CODES: Final = frozenset({IMA_LIST_RESTART_NEEDED})

# PCR that the Keylime agent always adds to a quote (it carries the payload key).
KEYLIME_AGENT_PCR: Final = 16
IMA_PCR: Final = 10

_BANKS: Final = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384,
                 "sha512": TpmAlg.SHA512}

QuotedPcrs = dict[str, dict[int, bytes]]
PolicyT = TypeVar("PolicyT")


# --- Inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """The quote request the verifier sent. The verifier made it, so it is trusted."""

    nonce: bytes
    """ASCII bytes of the nonce, which the quote must carry as qualifying data (extraData)."""
    pcrs: frozenset[int]
    """PCR indexes of the mask sent, with PCR 16 that the Keylime agent always adds."""
    ima_offset: int
    """The ``ima_ml_entry`` sent: the first IMA entry requested."""
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class Evidence:
    """A Keylime agent's quote response, split into fields but not checked."""

    quote: str
    hash_alg: str
    ima_measurement_list: str | None = None
    ima_start_index: int = 0
    """``ima_measurement_list_entry``: index of the list's first line (Keylime's default 0)."""
    mb_measurement_list: bytes | None = None
    """The binary UEFI event log."""
    boottime: int | None = None


@dataclass(frozen=True, slots=True)
class Enrollment:
    """The registrar's record of the device: an AK proven to live in the TPM with its EK."""

    device_id: str
    ak: PublicArea
    ak_qualified_name: bytes | None = None
    """qualifiedSigner that the AK's quotes carry; None when the EK public area is unknown."""


@dataclass(frozen=True, slots=True)
class Loaded(Generic[PolicyT]):
    """A policy as stored (kind, name, version, content hash) and in its compiled form."""

    applied: AppliedPolicy
    policy: PolicyT


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The policies that apply to one device; None where the device has none of a kind."""

    runtime: Loaded[RuntimePolicy] | None = None
    measured_boot: Loaded[MeasuredBootPolicy] | None = None
    pcr: Loaded[PcrPolicy] | None = None

    @property
    def applied(self) -> tuple[AppliedPolicy, ...]:
        loaded = (self.runtime, self.measured_boot, self.pcr)
        return tuple(item.applied for item in loaded if item is not None)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Verifier-wide choices; each one is a setting (see docs/configuration.md)."""

    accepted_banks: tuple[str, ...] = ("sha512", "sha384", "sha256")
    """PCR banks a quote may use, as Keylime's ``accept_tpm_hash_algs``."""
    verdict_lifetime_intervals: int = 3
    """A trusted verdict expires after this many poll intervals without a newer one."""
    allow_ima_violations: bool = False
    allow_zero_boot_aggregate: bool = False


class VerificationResult(NamedTuple):
    verdict: Verdict
    findings: tuple[Finding, ...]
    next_state: DeviceState


def requested_pcrs(policies: PolicySet) -> frozenset[int]:
    """Return the PCRs to quote for these policies.

    PCRs 0-10 when a runtime policy applies: PCR 10 for the IMA list, PCRs 0-9 to recompute
    the boot_aggregate whenever the list starts again at entry 0 after a reboot. PCRs 0-9 and
    14 for a measured-boot policy; the PCRs a PCR policy names; and PCR 16, which the Keylime
    agent always adds.
    """
    pcrs = {KEYLIME_AGENT_PCR}
    if policies.runtime is not None:
        pcrs.add(IMA_PCR)
        pcrs.update(boot_aggregate_pcrs("sha256"))
    if policies.measured_boot is not None:
        pcrs.update((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14))
    if policies.pcr is not None:
        for indexes in policies.pcr.policy.selection().values():
            pcrs.update(indexes)
    return frozenset(pcrs)


def pcr_mask(pcrs: frozenset[int]) -> str:
    """Return the Keylime ``mask`` parameter for a set of PCR indexes, such as ``0x10400``."""
    return hex(sum(1 << index for index in pcrs))


# --- The engine -----------------------------------------------------------------------------


def verify(
    unverified_evidence: Evidence,
    enrollment: Enrollment,
    policies: PolicySet,
    previous_state: DeviceState | None,
    *,
    challenge: Challenge,
    now: datetime,
    poll_interval: float,
    options: EngineOptions,
) -> VerificationResult:
    """Verify one attestation; see the module docstring for the steps."""
    run = _Run(enrollment, policies, options, now)

    # 1. AK pin.
    if previous_state is not None and previous_state.ak_name != enrollment.ak.name:
        run.add(_ak_repinned(previous_state.ak_name, enrollment.ak.name))
        return run.finish(previous_state, poll_interval)
    state = previous_state or DeviceState(ak_name=enrollment.ak.name)

    # 2. Quote.
    quoted = _check_quote(run, unverified_evidence, state, challenge)
    if quoted is None:
        return run.finish(state, poll_interval)
    state, pcrs, new_session = _advance_session(state, quoted, now)

    # 3 and 4. IMA measurement list and runtime policy.
    if policies.runtime is not None:
        state = _check_ima(run, unverified_evidence, state, pcrs, new_session, policies.runtime.policy)

    # 5. UEFI event log and measured-boot policy.
    _check_event_log(run, unverified_evidence, pcrs, policies.measured_boot)

    # 6. PCR policy.
    if policies.pcr is not None:
        run.extend(evaluate_pcrs(policies.pcr.policy, pcrs))

    # 7. Verdict.
    return run.finish(state, poll_interval)


@dataclass
class _Run:
    """Findings collected by one call of ``verify``."""

    enrollment: Enrollment
    policies: PolicySet
    options: EngineOptions
    now: datetime
    findings: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def extend(self, findings: Sequence[Finding]) -> None:
        self.findings.extend(findings)

    @property
    def failed(self) -> bool:
        return is_failure(self.findings)

    def finish(self, next_state: DeviceState, poll_interval: float) -> VerificationResult:
        status = status_of_findings(self.findings, INCONCLUSIVE_CODES)
        expires_at = None
        if status is VerdictStatus.TRUSTED:
            expires_at = trusted_until(self.now, poll_interval, self.options.verdict_lifetime_intervals)
        verdict = new_verdict(
            self.enrollment.device_id,
            status,
            reasons_of(self.findings, status, INCONCLUSIVE_CODES),
            issued_at=self.now,
            attested_at=self.now,
            expires_at=expires_at,
            policies=self.policies.applied,
        )
        return VerificationResult(verdict, tuple(self.findings), next_state)


@dataclass(frozen=True, slots=True)
class _QuotedEvidence:
    quote: KeylimeQuote
    result: QuoteResult
    bank: str


def _check_quote(
    run: _Run, unverified_evidence: Evidence, state: DeviceState, challenge: Challenge
) -> _QuotedEvidence | None:
    """Run step 2; return the verified quote, or None after adding the findings that failed it."""
    try:
        unverified_quote = parse_keylime_quote(unverified_evidence.quote)
    except ParseError as error:
        run.add(_error(QUOTE_MALFORMED, f"quote: {error.message}", parse_code=error.code))
        return None

    bank = unverified_evidence.hash_alg
    if bank not in run.options.accepted_banks or bank not in _BANKS:
        run.add(_error(
            QUOTE_BANK_NOT_ACCEPTED,
            f"quote uses the PCR bank {bank!r}, expected one of {', '.join(run.options.accepted_banks)}",
            bank=bank,
        ))
        return None

    requested = PcrSelection((PcrBank(_BANKS[bank], tuple(sorted(challenge.pcrs))),))
    result = verify_quote(
        run.enrollment.ak,
        unverified_quote.attest_bytes,
        unverified_quote.signature_bytes,
        nonce=challenge.nonce,
        pcr_selection=requested,
        pcr_values=unverified_quote.pcr_file.values,
        ak_qualified_name=run.enrollment.ak_qualified_name,
        previous=state.counters,
    )
    findings = list(result.findings)
    ak_changed = _ak_change_behind(findings, unverified_quote.attest_bytes, run.enrollment)
    run.extend([ak_changed] if ak_changed else findings)
    if not result.valid:
        return None
    return _QuotedEvidence(unverified_quote, result, bank)


def _ak_change_behind(findings: Sequence[Finding], attest: bytes, enrollment: Enrollment) -> Finding | None:
    """Return an ``ak-changed`` finding if a failed signature comes from another AK.

    The qualifiedSigner read here is not verified, so it only chooses how a failure is
    reported; the verdict is untrusted either way.
    """
    codes = {finding.code for finding in findings}
    if not codes & {"quote-signature-invalid", "quote-signature-algorithm-mismatch"}:
        return None
    expected = enrollment.ak_qualified_name
    if expected is None:
        return None
    try:
        unverified_signer = parse_tpms_attest(attest).qualified_signer
    except ParseError:
        return None
    if hmac.compare_digest(unverified_signer, expected):
        return None
    return _error(
        AK_CHANGED,
        "re-enrollment needed: the quote was signed by another AK than the enrolled one "
        f"(qualifiedSigner {unverified_signer.hex()}, enrolled {expected.hex()}); the agent "
        "probably made a new AK. Delete the device in the registrar, let the agent register "
        "again, then add it to the verifier again",
        qualified_signer=unverified_signer.hex(),
        expected=expected.hex(),
    )


def _ak_repinned(pinned: bytes, enrolled: bytes) -> Finding:
    return _error(
        AK_CHANGED,
        "re-enrollment needed: the registrar now holds another AK for this device "
        f"(name {enrolled.hex()}) than the one whose quotes the verifier accepted "
        f"({pinned.hex()}); remove the device from the verifier and add it again to trust "
        "the new AK",
        pinned=pinned.hex(),
        enrolled=enrolled.hex(),
    )


def _advance_session(
    state: DeviceState, quoted: _QuotedEvidence, now: datetime
) -> tuple[DeviceState, QuotedPcrs, bool]:
    """Store the verified quote's counters; start a boot session on a reboot or the first quote.

    Returns the state, the quoted PCR values by bank name and whether a session started.
    """
    counters = quoted.result.next_counters
    assert counters is not None  # a valid quote always carries its clockInfo
    pcrs = {alg.name.lower(): dict(values) for alg, values in quoted.result.pcr_values.items()}

    new_session = state.counters is None or quoted.result.new_boot_session
    if new_session:
        state = state.new_boot_session(counters, now)
    else:
        state = replace(state, counters=counters)
    if state.bank is not None and state.bank != quoted.bank:
        state = replace(state, ima=ImaReplayState(), keyrings=EMPTY_KEYRING_STATE)
    return replace(state, bank=quoted.bank), pcrs, new_session


def _check_ima(
    run: _Run,
    unverified_evidence: Evidence,
    state: DeviceState,
    pcrs: QuotedPcrs,
    new_session: bool,
    policy: RuntimePolicy,
) -> DeviceState:
    """Run steps 3 and 4; return the state advanced past the entries that passed."""
    text = unverified_evidence.ima_measurement_list
    if text is None:
        run.add(_error(IMA_LIST_MISSING, "a runtime policy applies, but the device sent no IMA "
                       "measurement list; is IMA enabled in its kernel?"))
        return state

    start = unverified_evidence.ima_start_index
    if start == 0 and state.ima.next_index != 0:
        run.add(Finding(
            IMA_LIST_REPLAYED_FROM_START, Severity.INFO,
            f"the device sent its IMA measurement list from entry 0 instead of "
            f"{state.ima.next_index}; replaying it from the start",
        ))
        state = replace(state, ima=ImaReplayState(), keyrings=EMPTY_KEYRING_STATE)
    elif start != state.ima.next_index and new_session:
        # The list was requested for the previous boot; ask again from entry 0.
        run.add(Finding(
            IMA_LIST_RESTART_NEEDED, Severity.WARNING,
            f"the device rebooted, and its IMA measurement list starts at entry {start} as "
            "requested for the previous boot; it must be read again from entry 0",
            {"start_index": start},
        ))
        return state

    try:
        unverified_list = parse_ascii_list(text, start_index=start,
                                           template_hash_algorithm=policy.log_hash_alg)
    except ImaParseError as error:
        run.add(_error(IMA_LIST_MALFORMED, f"IMA measurement list: {error.message}",
                       parse_code=error.code, line=error.line))
        return state

    bank = state.bank
    assert bank is not None  # _advance_session sets it
    # Without PCR 10 in the quote, verify_measurement_list reports ima-pcr10-not-quoted.
    quoted_pcr10 = {bank: pcrs[bank][IMA_PCR]} if IMA_PCR in pcrs.get(bank, {}) else {}
    verification = verify_measurement_list(
        unverified_list,
        quoted_pcr10,
        state.ima,
        boot_pcrs=_boot_pcrs(run, pcrs, start),
        allow_zero_boot_aggregate=run.options.allow_zero_boot_aggregate,
    )
    run.extend(verification.findings)
    if is_failure(verification.findings):
        return state

    evaluation = evaluate_incremental(
        verification.verified_entries,
        policy,
        allow_violations=run.options.allow_ima_violations,
        boot_aggregates=_boot_aggregates(pcrs) if start == 0 else None,
        keyring_state=state.keyrings,
    )
    run.extend(evaluation.findings)
    if is_failure(evaluation.findings):
        return state
    return replace(
        state,
        ima=verification.next_state,
        keyrings=evaluation.keyring_state,
        boot=_with_boot_aggregate(state, verification),
    )


def _boot_pcrs(run: _Run, pcrs: QuotedPcrs, start: int) -> QuotedPcrs | None:
    """Return the quoted PCRs to check the boot_aggregate with, when the list starts at 0."""
    if start != 0:
        return None
    covered = {bank: values for bank, values in pcrs.items()
               if all(index in values for index in boot_aggregate_pcrs(bank))}
    if covered:
        return covered
    run.add(Finding(
        IMA_BOOT_AGGREGATE_NOT_CHECKED, Severity.WARNING,
        "the IMA measurement list starts at entry 0, but the quote lacks the PCRs its "
        "boot_aggregate covers, so the runtime policy's boot_aggregate digests decide",
    ))
    return None


def _boot_aggregates(pcrs: QuotedPcrs) -> dict[str, bytes] | None:
    aggregates = {
        bank: compute_boot_aggregate(bank, values)
        for bank, values in pcrs.items()
        if all(index in values for index in boot_aggregate_pcrs(bank))
    }
    return aggregates or None


def _with_boot_aggregate(state: DeviceState, verification: ImaVerification) -> BootSession | None:
    entries = verification.verified_entries
    if state.boot is None or not entries or entries[0].index != 0 or entries[0].path != BOOT_AGGREGATE_NAME:
        return state.boot
    return replace(state.boot, boot_aggregate=entries[0].digest_text)


def _check_event_log(
    run: _Run,
    unverified_evidence: Evidence,
    pcrs: QuotedPcrs,
    policy: Loaded[MeasuredBootPolicy] | None,
) -> None:
    """Run step 5."""
    raw = unverified_evidence.mb_measurement_list
    if raw is None:
        if policy is not None:
            run.add(_error(EVENTLOG_MISSING, "a measured-boot policy applies, but the device "
                           "sent no UEFI event log"))
        return
    try:
        unverified_log = parse_event_log(raw)
    except ParseError as error:
        run.add(_error(error.code, f"UEFI event log: {error.message}"))
        return

    findings = verify_event_log(unverified_log, pcrs)
    run.extend(findings)
    if policy is not None and not is_failure(findings):
        quoted = {index for values in pcrs.values() for index in values}
        run.extend(evaluate_measured_boot(policy.policy, unverified_log, quoted_pcrs=quoted))


def _error(code: str, message: str, **context: Any) -> Finding:
    return Finding(code, Severity.ERROR, message, {k: v for k, v in context.items() if v is not None})
