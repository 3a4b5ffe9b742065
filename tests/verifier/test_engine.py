"""Tests for verifier.engine.verify: each step's failure gives its finding code, and the state
carries incremental attestation across polls, reboots and lists ahead of the quote.

Evidence comes from verifier.fleet_sim: quotes signed by software AK keys over TPMS_ATTEST
structures built as a TPM builds them, and IMA lists whose entries extend the quoted PCR 10.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from evidence.eventlog import parse_event_log
from evidence.findings import Severity
from evidence.tpm import (
    ClockInfo,
    format_keylime_quote,
    marshal_pcr_file,
    parse_keylime_quote,
    parse_tpmt_signature,
)
from policies.measured_boot import MeasuredBootPolicy, parse_measured_boot_policy
from policies.measured_boot_generate import create_measured_boot_policy
from policies.pcr import parse_pcr_policy
from tests.verifier.conftest import (
    POLL_INTERVAL,
    START,
    Attester,
    enrollment_of,
    error_codes,
    new_nonce,
    runtime_policies,
)
from verifier.engine import (
    EngineOptions,
    Evidence,
    Loaded,
    PolicySet,
    verify,
)
from verifier.fleet_sim import SimulatedDevice, SoftwareTpm
from verifier.state import DeviceState
from verifier.verdicts import AppliedPolicy, VerdictStatus

# --- passing attestations --------------------------------------------------------------------


def test_engine_trusts_clean_first_attestation(attester: Attester, device: SimulatedDevice) -> None:
    result = attester.attest()

    assert error_codes(result) == []
    assert result.verdict.status is VerdictStatus.TRUSTED
    assert result.verdict.attested_at == START
    assert result.verdict.expires_at == START + timedelta(seconds=3 * POLL_INTERVAL)
    assert result.verdict.device_id == device.device_id
    assert [policy.name for policy in result.verdict.policies] == ["fleet"]
    assert result.next_state.ima.next_index == len(device.ima_lines)
    assert result.next_state.ak_name == device.tpm.ak_public.name
    assert result.next_state.boot is not None
    assert result.next_state.boot.reset_count == 0
    assert result.next_state.boot.boot_aggregate is not None
    assert result.next_state.boot.boot_aggregate.startswith("sha256:")


def test_engine_resumes_incrementally(attester: Attester, device: SimulatedDevice) -> None:
    first = attester.attest()
    challenge, results = attester.request()

    second = attester.verify(challenge, results)

    assert challenge.ima_offset == first.next_state.ima.next_index > 0
    assert results["ima_measurement_list_entry"] == challenge.ima_offset
    assert second.verdict.status is VerdictStatus.TRUSTED
    assert second.next_state.ima.next_index == len(device.ima_lines)
    assert second.next_state.counters is not None
    assert first.next_state.counters is not None
    assert second.next_state.counters.clock > first.next_state.counters.clock


def test_engine_accepts_list_ahead_of_quote(attester: Attester, device: SimulatedDevice) -> None:
    device.entries_after_quote = 3

    first = attester.attest()
    length_after_first = len(device.ima_lines)
    second = attester.attest()

    assert first.verdict.status is VerdictStatus.TRUSTED
    assert first.next_state.ima.next_index == length_after_first - 3
    assert first.next_state.ima.seen_entries == length_after_first
    assert second.verdict.status is VerdictStatus.TRUSTED
    assert second.next_state.ima.next_index == len(device.ima_lines) - 3
    assert second.next_state.ima.lagging_rounds == 0


def test_engine_state_survives_json_round_trip(attester: Attester) -> None:
    attester.attest()
    assert attester.state is not None
    attester.state = DeviceState.from_json(json.loads(json.dumps(attester.state.to_json())))

    result = attester.attest()

    assert result.verdict.status is VerdictStatus.TRUSTED
    assert result.next_state.ima.next_index > 0


# --- reboot -------------------------------------------------------------------------------------


def test_engine_reboot_starts_new_boot_session(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    attester.attest()
    device.reboot()
    # The agent sends the list from entry 0 because the requested entry is past its end.
    assert attester.state is not None
    assert attester.state.ima.next_index > len(device.ima_lines) + device.entries_per_quote

    result = attester.attest()

    assert error_codes(result) == []
    assert result.verdict.status is VerdictStatus.TRUSTED
    assert "quote-new-boot-session" in [finding.code for finding in result.findings]
    assert result.next_state.boot is not None
    assert result.next_state.boot.reset_count == 1
    assert result.next_state.boot.started_at == result.verdict.attested_at
    assert result.next_state.ima.next_index == len(device.ima_lines)


def test_engine_reboot_with_list_at_old_offset_is_unknown(
    attester: Attester, device: SimulatedDevice
) -> None:
    first = attester.attest()
    device.reboot()
    for path in list(device.files)[:6]:
        device.measure(path)
    assert len(device.ima_lines) > first.next_state.ima.next_index

    result = attester.attest()

    assert error_codes(result) == []
    assert result.verdict.status is VerdictStatus.UNKNOWN
    assert [reason.code for reason in result.verdict.reasons] == ["ima-list-restart-needed"]
    assert result.next_state.ima.next_index == 0
    assert result.next_state.boot is not None
    assert result.next_state.boot.reset_count == 1

    again = attester.attest()

    assert again.verdict.status is VerdictStatus.TRUSTED
    assert again.next_state.ima.next_index == len(device.ima_lines)


def test_engine_rejects_counters_going_back(attester: Attester) -> None:
    attester.attest()
    assert attester.state is not None and attester.state.counters is not None
    counters = attester.state.counters
    attester.state = replace(attester.state, counters=counters._replace(clock=counters.clock + 10**9))

    result = attester.attest()

    assert error_codes(result) == ["quote-counter-regressed"]
    assert result.verdict.status is VerdictStatus.UNTRUSTED


def test_engine_rejects_lower_reset_count(attester: Attester) -> None:
    attester.attest()
    assert attester.state is not None and attester.state.counters is not None
    attester.state = replace(attester.state, counters=ClockInfo(0, 5, 0, True))

    result = attester.attest()

    assert error_codes(result) == ["quote-counter-regressed"]


def test_engine_rejects_replayed_quote(attester: Attester) -> None:
    challenge, results = attester.request()
    attester.verify(challenge, results)

    replayed = attester.verify(challenge, results)

    assert "quote-replayed" in error_codes(replayed)
    assert replayed.verdict.status is VerdictStatus.UNTRUSTED


# --- quote failures -----------------------------------------------------------------------------


def test_engine_rejects_nonce_mismatch(attester: Attester) -> None:
    challenge, results = attester.request()
    challenge = replace(challenge, nonce=new_nonce().encode("ascii"))

    result = attester.verify(challenge, results)

    assert error_codes(result) == ["quote-nonce-mismatch"]
    assert result.verdict.status is VerdictStatus.UNTRUSTED
    assert result.next_state.counters is None


def test_engine_rejects_foreign_key_as_tampering(attester: Attester, device: SimulatedDevice) -> None:
    challenge, results = attester.request()
    quote = parse_keylime_quote(results["quote"])
    forger = SoftwareTpm()
    forged = format_keylime_quote(quote.attest_bytes, forger.sign(quote.attest_bytes), quote.pcr_file_bytes)

    result = attester.verify(challenge, {**results, "quote": forged})

    assert error_codes(result) == ["quote-signature-invalid"]


def test_engine_reports_new_ak_as_reenrollment_needed(attester: Attester, device: SimulatedDevice) -> None:
    enrollment = enrollment_of(device)
    attester.enrollment = enrollment
    attester.attest()
    device.tpm.replace_ak()

    result = attester.attest()

    assert error_codes(result) == ["ak-changed"]
    assert result.verdict.status is VerdictStatus.UNTRUSTED
    assert "re-enrollment needed" in result.verdict.reasons[0].message
    assert "quote-signature-invalid" not in [finding.code for finding in result.findings]


def test_engine_reports_reenrolled_ak_as_changed(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    device.tpm.replace_ak()
    attester.enrollment = enrollment_of(device)

    result = attester.attest()

    assert error_codes(result) == ["ak-changed"]
    assert "re-enrollment needed" in result.verdict.reasons[0].message
    assert result.next_state == attester.state


def test_engine_rejects_malformed_quote(attester: Attester) -> None:
    challenge, results = attester.request()

    result = attester.verify(challenge, {**results, "quote": "rnot-base64:x:y"})

    assert error_codes(result) == ["quote-malformed"]


def test_engine_rejects_bank_not_accepted(attester: Attester) -> None:
    attester.options = EngineOptions(accepted_banks=("sha384",))

    result = attester.attest()

    assert error_codes(result) == ["quote-bank-not-accepted"]


def test_engine_rejects_pcr_values_read_after_quote(attester: Attester, device: SimulatedDevice) -> None:
    challenge, results = attester.request()
    quote = parse_keylime_quote(results["quote"])
    values = {alg: dict(bank) for alg, bank in quote.pcr_file.values.items()}
    for bank in values.values():
        bank[10] = hashlib.sha256(b"later").digest()
    tampered = format_keylime_quote(
        quote.attest_bytes, quote.signature_bytes, marshal_pcr_file(quote.pcr_file.selection, values)
    )
    result = attester.verify(challenge, {**results, "quote": tampered})

    assert error_codes(result) == ["quote-pcr-digest-mismatch"]


def test_engine_rejects_selection_other_than_requested(attester: Attester) -> None:
    challenge, results = attester.request()
    challenge = replace(challenge, pcrs=challenge.pcrs | {20})

    result = attester.verify(challenge, results)

    assert "quote-pcr-selection-mismatch" in error_codes(result)


# --- IMA and runtime policy ---------------------------------------------------------------------


def test_engine_names_file_with_changed_digest(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    path = next(iter(device.files))
    device.measure(path, secrets.token_bytes(32))

    result = attester.attest()

    assert error_codes(result) == ["ima-digest-not-allowed"]
    finding = next(f for f in result.findings if f.code == "ima-digest-not-allowed")
    assert finding.context["path"] == path
    assert result.verdict.status is VerdictStatus.UNTRUSTED
    assert path in result.verdict.reasons[0].message


def test_engine_keeps_failing_entries_until_policy_allows(
    attester: Attester, device: SimulatedDevice, files: dict[str, bytes]
) -> None:
    first = attester.attest()
    new_digest = secrets.token_bytes(32)
    device.measure("/opt/new-tool", new_digest)

    failed = attester.attest()
    again = attester.attest()
    attester.policies = runtime_policies({**files, "/opt/new-tool": new_digest}, version=2)
    fixed = attester.attest()

    assert error_codes(failed) == ["ima-path-not-in-policy"]
    assert failed.next_state.ima == first.next_state.ima
    assert error_codes(again) == ["ima-path-not-in-policy"]
    assert fixed.verdict.status is VerdictStatus.TRUSTED
    assert [policy.version for policy in fixed.verdict.policies] == [2]


def test_engine_detects_progress_stall(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    device.freeze_pcr10 = True

    first = attester.attest()
    second = attester.attest()
    third = attester.attest()

    assert first.verdict.status is VerdictStatus.TRUSTED
    assert second.verdict.status is VerdictStatus.TRUSTED
    assert "ima-progress-lagging" in [finding.code for finding in second.findings]
    assert error_codes(third) == ["ima-progress-stalled"]
    assert third.verdict.status is VerdictStatus.UNTRUSTED


def test_engine_rejects_boot_aggregate_mismatch(attester: Attester, device: SimulatedDevice) -> None:
    device.tpm.extend(4, b"firmware changed after the boot_aggregate")

    result = attester.attest()

    assert error_codes(result) == ["ima-boot-aggregate-mismatch"]


def test_engine_rejects_pcr10_mismatch(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    device.tpm.extend(10, b"an entry missing from the list")

    result = attester.attest()

    assert error_codes(result) == ["ima-pcr-mismatch"]


def test_engine_rejects_missing_ima_list(attester: Attester) -> None:
    challenge, results = attester.request()
    del results["ima_measurement_list"]

    result = attester.verify(challenge, results)

    assert error_codes(result) == ["ima-list-missing"]


def test_engine_rejects_malformed_ima_list(attester: Attester) -> None:
    challenge, results = attester.request()

    result = attester.verify(challenge, {**results, "ima_measurement_list": "10 zz ima-ng\n"})

    assert error_codes(result) == ["ima-list-malformed"]


def test_engine_rejects_list_at_wrong_offset(attester: Attester) -> None:
    attester.attest()
    challenge, results = attester.request()

    result = attester.verify(challenge, {**results, "ima_measurement_list_entry": challenge.ima_offset + 1})

    assert error_codes(result) == ["ima-list-offset-mismatch"]


def test_engine_replays_list_sent_from_start(attester: Attester, device: SimulatedDevice) -> None:
    attester.attest()
    challenge, _ = attester.request()
    query = {"nonce": challenge.nonce.decode(), "mask": "0x7ff", "ima_ml_entry": "0"}
    status, body = device.answer_quote(query)
    assert status == 200
    results = body["results"]

    result = attester.verify(replace(challenge, pcrs=frozenset(range(11)) | {16}), results)

    assert error_codes(result) == []
    assert "ima-list-replayed-from-start" in [finding.code for finding in result.findings]
    assert result.next_state.ima.next_index == len(device.ima_lines)


# --- event log, PCR policy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def boot_log(fixtures_dir: Path) -> bytes:
    return (fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-secureboot").read_bytes()


def measured_boot(document: dict[str, Any]) -> Loaded[MeasuredBootPolicy]:
    policy = parse_measured_boot_policy(document)
    return Loaded(AppliedPolicy("measured-boot", "uefi", 1, policy.content_hash), policy)


def test_engine_passes_measured_boot_policy(boot_log: bytes, files: dict[str, bytes]) -> None:
    device = SimulatedDevice("device-mb", files=dict(files), event_log=boot_log)
    document = create_measured_boot_policy(parse_event_log(boot_log))
    attester = Attester(device, replace(runtime_policies(files), measured_boot=measured_boot(document)))

    challenge, _ = attester.request()
    result = attester.attest()

    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14} <= challenge.pcrs
    assert error_codes(result) == []
    assert result.verdict.status is VerdictStatus.TRUSTED
    assert [policy.kind for policy in result.verdict.policies] == ["runtime", "measured-boot"]


def test_engine_rejects_kernel_not_in_mb_policy(boot_log: bytes, files: dict[str, bytes]) -> None:
    device = SimulatedDevice("device-mb", files=dict(files), event_log=boot_log)
    document = create_measured_boot_policy(parse_event_log(boot_log))
    for kernel in document["kernels"]:
        kernel["kernel_authcode_sha256"] = "0x" + "ab" * 32
    attester = Attester(device, PolicySet(measured_boot=measured_boot(document)))

    result = attester.attest()

    assert error_codes(result) == ["mb-kernel-not-allowed"]


def test_engine_rejects_event_log_not_matching_quote(boot_log: bytes, files: dict[str, bytes]) -> None:
    device = SimulatedDevice("device-mb", files=dict(files), event_log=boot_log)
    device.tpm.extend(4, b"a boot application the event log does not show")
    document = create_measured_boot_policy(parse_event_log(boot_log))
    attester = Attester(device, PolicySet(measured_boot=measured_boot(document)))

    result = attester.attest()

    assert error_codes(result) == ["eventlog-pcr-mismatch"]


def test_engine_requires_event_log_for_measured_boot_policy(attester: Attester, boot_log: bytes) -> None:
    document = create_measured_boot_policy(parse_event_log(boot_log))
    attester.policies = replace(attester.policies, measured_boot=measured_boot(document))

    result = attester.attest()

    assert error_codes(result) == ["eventlog-missing"]


def test_engine_rejects_malformed_event_log(attester: Attester) -> None:
    challenge, results = attester.request()
    evidence = Evidence(results["quote"], results["hash_alg"], results["ima_measurement_list"],
                        results["ima_measurement_list_entry"], mb_measurement_list=b"short")

    result = verify(evidence, enrollment_of(attester.device), attester.policies, None,
                    challenge=challenge, now=START, poll_interval=POLL_INTERVAL, options=EngineOptions())

    assert error_codes(result) == ["eventlog-malformed"]


def test_engine_rejects_pcr_value_not_in_policy(attester: Attester, device: SimulatedDevice) -> None:
    good = device.tpm.read("sha256", [7])[7]
    policy = parse_pcr_policy({"pcrs": {"sha256": {"7": [good.hex()]}}})
    applied = AppliedPolicy("pcr", "firmware", 1, policy.content_hash)
    attester.policies = replace(attester.policies, pcr=Loaded(applied, policy))
    passed = attester.attest()
    device.tpm.extend(7, b"secure boot disabled")

    failed = attester.attest()

    assert error_codes(passed) == []
    assert error_codes(failed) == ["pcr-value-not-allowed"]
    finding = next(f for f in failed.findings if f.code == "pcr-value-not-allowed")
    assert finding.context["pcr"] == 7


def test_engine_quotes_pcrs_of_pcr_policy(device: SimulatedDevice) -> None:
    policy = parse_pcr_policy({"pcrs": {"sha256": {"15": ["00" * 32]}}})
    applied = AppliedPolicy("pcr", "p", 1, policy.content_hash)
    attester = Attester(device, PolicySet(pcr=Loaded(applied, policy)))

    challenge, _ = attester.request()
    result = attester.attest()

    assert challenge.pcrs == {15, 16}
    assert result.verdict.status is VerdictStatus.TRUSTED


def test_engine_without_policies_checks_quote_only(device: SimulatedDevice) -> None:
    attester = Attester(device, PolicySet())

    result = attester.attest()

    assert result.verdict.status is VerdictStatus.TRUSTED
    assert result.next_state.ima.next_index == 0


def test_engine_stored_state_keeps_bank_and_ak(attester: Attester, device: SimulatedDevice) -> None:
    result = attester.attest()

    stored = result.next_state.to_json()

    assert stored["bank"] == "sha256"
    assert stored["ak_name"] == device.tpm.ak_public.name.hex()
    assert DeviceState.from_json(stored) == result.next_state


def test_engine_findings_are_json(attester: Attester, device: SimulatedDevice) -> None:
    device.measure("/tmp/unknown", secrets.token_bytes(32))

    result = attester.attest()

    encoded = json.dumps([finding.to_json() for finding in result.findings])
    assert "ima-path-not-in-policy" in encoded
    assert all(finding.severity in Severity for finding in result.findings)


def test_software_tpm_signature_verifies_with_ak() -> None:
    tpm = SoftwareTpm()
    message = b"\xffTCG" + secrets.token_bytes(30)

    signature = parse_tpmt_signature(tpm.sign(message))

    public_key = tpm.ak_public.public_key
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature.signature, message, ec.ECDSA(hashes.SHA256()))
