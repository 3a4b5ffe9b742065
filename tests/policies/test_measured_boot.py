"""Measured-boot policies: loading errors that name the field, and each finding code on real
event logs (Secure Boot on: Keylime's and tpm2-tools' captures)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from evidence.eventlog import EventLog, parse_event_log
from policies.errors import PolicyError
from policies.measured_boot import (
    MB_DB_MISMATCH,
    MB_DBX_MISSING_ENTRIES,
    MB_EVENT_UNEXPECTED,
    MB_INITRD_NOT_ALLOWED,
    MB_KEK_MISMATCH,
    MB_KERNEL_CMDLINE_NOT_ALLOWED,
    MB_KERNEL_NOT_ALLOWED,
    MB_MOKLIST_NOT_ALLOWED,
    MB_MOKLISTX_NOT_ALLOWED,
    MB_PCR_NOT_QUOTED,
    MB_PK_MISMATCH,
    MB_PLATFORM_FIRMWARE_NOT_ALLOWED,
    MB_SCRTM_NOT_ALLOWED,
    MB_SECUREBOOT_DISABLED,
    MB_SECUREBOOT_ENABLED,
    MB_VENDOR_DB_MISMATCH,
    evaluate_measured_boot,
    parse_measured_boot_policy,
)
from policies.measured_boot_generate import create_measured_boot_policy
from tests.support.eventlog import encode_event2

SECUREBOOT_LOG = "keylime-binary_bios_measurements-secureboot"
MOK_LOG = "tpm2-tools-event-moklisttrusted.bin"
ALL_PCRS = range(24)
OTHER_DIGEST = "0x" + "ab" * 32


def load_log(fixtures_dir: Path, name: str) -> EventLog:
    return parse_event_log((fixtures_dir / "eventlog" / name).read_bytes())


@pytest.fixture(scope="module")
def secureboot_log(fixtures_dir: Path) -> EventLog:
    return load_log(fixtures_dir, SECUREBOOT_LOG)


@pytest.fixture(scope="module")
def secureboot_policy(secureboot_log: EventLog) -> dict[str, Any]:
    return create_measured_boot_policy(secureboot_log)


def codes(policy_document: dict[str, Any], log: EventLog) -> list[str]:
    policy = parse_measured_boot_policy(policy_document)
    return [finding.code for finding in evaluate_measured_boot(policy, log, quoted_pcrs=ALL_PCRS)]


# --- Loading ----------------------------------------------------------------------------------


def test_load_round_trips_canonical_json(secureboot_policy: dict[str, Any]) -> None:
    policy = parse_measured_boot_policy(secureboot_policy)

    again = parse_measured_boot_policy(policy.canonical_json())

    assert again.content_hash == policy.content_hash
    assert json.loads(policy.canonical_json()) == secureboot_policy


def test_load_accepts_missing_vendor_db(secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    del document["vendor_db"]

    policy = parse_measured_boot_policy(document)

    assert policy.vendor_db == ()
    assert policy.has_secureboot


def test_load_defaults_has_secureboot_true(secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    del document["has_secureboot"]

    assert parse_measured_boot_policy(document).has_secureboot


def test_load_normalises_upper_case_hex(secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    digest = document["kernels"][0]["initrd_plain_sha256"]
    document["kernels"][0]["initrd_plain_sha256"] = "0x" + digest[2:].upper()

    policy = parse_measured_boot_policy(document)

    assert policy.content_hash == parse_measured_boot_policy(secureboot_policy).content_hash


def mutate(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    target: Any = changed
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


DELETE = object()

INVALID_CASES = [
    # (path to change, new value, expected code, expected field)
    (("kernels",), DELETE, "policy-field-missing", "kernels"),
    (("kernels",), {}, "policy-field-invalid", "kernels"),
    (("kernels", 0, "initrd_plain_sha256"), DELETE, "policy-field-missing",
     "kernels[0].initrd_plain_sha256"),
    (("kernels", 0, "kernel_authcode_sha256"), DELETE, "policy-field-missing",
     "kernels[0].kernel_authcode_sha256"),
    (("kernels", 0, "shim_authcode_sha256"), "ab" * 32, "policy-digest-invalid",
     "kernels[0].shim_authcode_sha256"),
    (("kernels", 0, "grub_authcode_sha256"), "0x" + "ab" * 31, "policy-digest-invalid",
     "kernels[0].grub_authcode_sha256"),
    (("kernels", 0, "kernel_cmdline"), "(unclosed", "policy-field-invalid",
     "kernels[0].kernel_cmdline"),
    (("kernels", 0, "kernel_cmdline"), 7, "policy-field-invalid", "kernels[0].kernel_cmdline"),
    (("kernels", 0, "kernal_cmdline"), ".*", "policy-field-invalid", "kernels[0].kernal_cmdline"),
    (("has_secureboot",), "yes", "policy-field-invalid", "has_secureboot"),
    (("pk",), DELETE, "policy-field-missing", "pk"),
    (("db", 0, "SignatureOwner"), "not-a-guid", "policy-field-invalid", "db[0].SignatureOwner"),
    (("db", 0, "SignatureData"), "0xabc", "policy-digest-invalid", "db[0].SignatureData"),
    (("dbx", 0, "SignatureData"), DELETE, "policy-field-missing", "dbx[0].SignatureData"),
    (("scrtm_and_bios", 0, "scrtm"), {}, "policy-field-invalid", "scrtm_and_bios[0].scrtm"),
    (("scrtm_and_bios", 0, "scrtm"), {"md5": "0x00"}, "policy-field-invalid",
     "scrtm_and_bios[0].scrtm.md5"),
    (("scrtm_and_bios", 0, "platform_firmware", 1), {"sha256": "0x00"},
     "policy-digest-invalid", "scrtm_and_bios[0].platform_firmware[1].sha256"),
    (("mokdig",), "0x00", "policy-field-invalid", "mokdig"),
    (("meta",), {}, "policy-field-invalid", "meta"),
]


@pytest.mark.parametrize(("path", "value", "code", "field"), INVALID_CASES)
def test_load_rejects_invalid_field(secureboot_policy: dict[str, Any], path: tuple[Any, ...],
                                    value: Any, code: str, field: str) -> None:
    document = mutate(secureboot_policy, path, value)

    with pytest.raises(PolicyError) as raised:
        parse_measured_boot_policy(document)

    assert raised.value.code == code
    assert raised.value.field == field


def test_load_without_secureboot_needs_vmlinuz(secureboot_policy: dict[str, Any]) -> None:
    document = mutate(secureboot_policy, ("has_secureboot",), False)

    with pytest.raises(PolicyError) as raised:
        parse_measured_boot_policy(document)

    assert raised.value.field == "kernels[0].vmlinuz_plain_sha256"


@pytest.mark.parametrize("text", [b"{not json", b"[" * 100_000 + b"]" * 100_000])
def test_load_rejects_non_json(text: bytes) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_measured_boot_policy(text)

    assert raised.value.code == "policy-not-json"


# --- Evaluation -------------------------------------------------------------------------------


def test_generated_policy_passes_own_log(secureboot_log: EventLog,
                                         secureboot_policy: dict[str, Any]) -> None:
    assert codes(secureboot_policy, secureboot_log) == []


def test_generated_policy_passes_mok_log(fixtures_dir: Path) -> None:
    log = load_log(fixtures_dir, MOK_LOG)

    assert codes(create_measured_boot_policy(log), log) == []


FINDING_CASES = [
    # (path to change, new value, the one finding code expected)
    (("kernels", 0, "kernel_authcode_sha256"), OTHER_DIGEST, MB_KERNEL_NOT_ALLOWED),
    (("kernels", 0, "shim_authcode_sha256"), OTHER_DIGEST, MB_KERNEL_NOT_ALLOWED),
    (("kernels", 0, "initrd_plain_sha256"), OTHER_DIGEST, MB_INITRD_NOT_ALLOWED),
    (("kernels", 0, "kernel_cmdline"), "quiet", MB_KERNEL_CMDLINE_NOT_ALLOWED),
    (("scrtm_and_bios", 0, "scrtm", "sha256"), OTHER_DIGEST, MB_SCRTM_NOT_ALLOWED),
    (("scrtm_and_bios", 0, "platform_firmware", 0, "sha256"), OTHER_DIGEST,
     MB_PLATFORM_FIRMWARE_NOT_ALLOWED),
    (("pk",), [], MB_PK_MISMATCH),
    (("kek", 0, "SignatureOwner"), "00000000-0000-0000-0000-000000000000", MB_KEK_MISMATCH),
    (("db", 0), DELETE, MB_DB_MISMATCH),
    (("vendor_db",), [], MB_VENDOR_DB_MISMATCH),
    (("mokdig", 0, "sha256"), OTHER_DIGEST, MB_MOKLIST_NOT_ALLOWED),
    (("mokxdig",), [], MB_MOKLISTX_NOT_ALLOWED),
]


@pytest.mark.parametrize(("path", "value", "code"), FINDING_CASES)
def test_mutated_policy_gives_finding(secureboot_log: EventLog, secureboot_policy: dict[str, Any],
                                      path: tuple[Any, ...], value: Any, code: str) -> None:
    document = mutate(secureboot_policy, path, value)

    assert codes(document, secureboot_log) == [code]


def test_dbx_entry_missing_from_log(secureboot_log: EventLog,
                                    secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    document["dbx"].append({"SignatureOwner": "77fa9abd-0359-4d32-bd60-28f4e78f784b",
                            "SignatureData": OTHER_DIGEST})

    assert codes(document, secureboot_log) == [MB_DBX_MISSING_ENTRIES]


def test_policy_with_secureboot_on_log_without(fixtures_dir: Path) -> None:
    secureboot_off = load_log(fixtures_dir, "keylime-binary_bios_measurements")
    document = create_measured_boot_policy(secureboot_off, allow_without_secureboot=True)
    document["has_secureboot"] = True
    document["kernels"][0]["kernel_authcode_sha256"] = OTHER_DIGEST

    found = codes(document, secureboot_off)

    assert MB_SECUREBOOT_DISABLED in found


def test_policy_without_secureboot_on_log_with(secureboot_log: EventLog,
                                                secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    document["has_secureboot"] = False
    kernel = document["kernels"][0]
    kernel["vmlinuz_plain_sha256"] = kernel.pop("kernel_authcode_sha256")

    found = codes(document, secureboot_log)

    assert MB_SECUREBOOT_ENABLED in found
    # Without Secure Boot the chain is shim and GRUB only, so the kernel application is extra.
    assert MB_KERNEL_NOT_ALLOWED in found


def test_second_kernel_entry_may_match(secureboot_log: EventLog,
                                       secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    wrong = dict(document["kernels"][0], kernel_authcode_sha256=OTHER_DIGEST)
    document["kernels"].insert(0, wrong)

    assert codes(document, secureboot_log) == []


def test_kernel_parts_from_different_entries(secureboot_log: EventLog,
                                             secureboot_policy: dict[str, Any]) -> None:
    document = copy.deepcopy(secureboot_policy)
    right = document["kernels"][0]
    document["kernels"] = [dict(right, initrd_plain_sha256=OTHER_DIGEST),
                           dict(right, kernel_cmdline="quiet")]

    found = evaluate_measured_boot(parse_measured_boot_policy(document), secureboot_log,
                                   quoted_pcrs=ALL_PCRS)

    assert [finding.code for finding in found] == [MB_KERNEL_NOT_ALLOWED]
    assert "no single entry" in found[0].message


def test_missing_pcr_in_quote(secureboot_log: EventLog, secureboot_policy: dict[str, Any]) -> None:
    policy = parse_measured_boot_policy(secureboot_policy)

    found = evaluate_measured_boot(policy, secureboot_log, quoted_pcrs=[0, 1, 2, 3, 4, 5, 6, 7, 10])

    assert [finding.code for finding in found] == [MB_PCR_NOT_QUOTED]
    assert found[0].context["missing_pcrs"] == [8, 9, 14]


def test_unexpected_event_type(fixtures_dir: Path) -> None:
    # A firmware that measures POST codes into PCR 0: the reference state has no value for them.
    log = load_log(fixtures_dir, "tpm2-tools-event-postcode.bin")
    document = create_measured_boot_policy(log)

    found = evaluate_measured_boot(parse_measured_boot_policy(document), log, quoted_pcrs=ALL_PCRS)

    unexpected = [f for f in found if f.code == MB_EVENT_UNEXPECTED]
    assert unexpected
    assert unexpected[0].context["event_type"] == "EV_POST_CODE"
    assert unexpected[0].context["pcr"] == 0


def with_startup_locality(raw: bytes) -> bytes:
    """Insert a StartupLocality EV_NO_ACTION event after the Spec ID event of a SHA-256 log."""
    spec_id_size = struct.unpack_from("<I", raw, 28)[0]
    end_of_spec_id = 32 + spec_id_size
    startup = encode_event2(0, 3, [(0x000B, bytes(32))], b"StartupLocality\x00\x03")
    return raw[:end_of_spec_id] + startup + raw[end_of_spec_id:]


def test_startup_locality_event_is_ignored(fixtures_dir: Path,
                                           secureboot_policy: dict[str, Any]) -> None:
    raw = (fixtures_dir / "eventlog" / SECUREBOOT_LOG).read_bytes()
    log = parse_event_log(with_startup_locality(raw))

    assert log.startup_locality == 3
    assert codes(secureboot_policy, log) == []


def test_findings_are_json(secureboot_log: EventLog, secureboot_policy: dict[str, Any]) -> None:
    document = mutate(secureboot_policy, ("kernels", 0, "kernel_cmdline"), "quiet")

    found = evaluate_measured_boot(parse_measured_boot_policy(document), secureboot_log)

    encoded = json.dumps([finding.to_json() for finding in found])
    assert MB_KERNEL_CMDLINE_NOT_ALLOWED in encoded


# --- Generation -------------------------------------------------------------------------------


def test_generate_rejects_secureboot_off_by_default(fixtures_dir: Path) -> None:
    log = load_log(fixtures_dir, "keylime-binary_bios_measurements")

    with pytest.raises(PolicyError) as raised:
        create_measured_boot_policy(log)

    assert raised.value.code == "policy-source-invalid"
    assert "Secure Boot disabled" in raised.value.message


@pytest.mark.parametrize(("name", "missing"), [
    ("go-attestation-crypto_agile_eventlog", "initrd"),
    ("tpm2-tools-event-uefi-sha1-log.bin", "SHA-256"),
    ("go-attestation-short_no_action_eventlog", "EV_S_CRTM_VERSION"),
])
def test_generate_names_missing_part(fixtures_dir: Path, name: str, missing: str) -> None:
    log = load_log(fixtures_dir, name)

    with pytest.raises(PolicyError, match=missing) as raised:
        create_measured_boot_policy(log, allow_without_secureboot=True)

    assert raised.value.code == "policy-source-invalid"


# --- Command line -----------------------------------------------------------------------------


def test_cli_creates_policy(fixtures_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main

    output = tmp_path / "mb.json"
    eventlog = fixtures_dir / "eventlog" / SECUREBOOT_LOG

    result = CliRunner().invoke(main, ["policy", "create", "measured-boot", "--eventlog",
                                       str(eventlog), "-o", str(output)])

    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    assert document == create_measured_boot_policy(load_log(fixtures_dir, SECUREBOOT_LOG))


def test_cli_secureboot_off_needs_flag(fixtures_dir: Path) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main

    eventlog = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements"
    arguments = ["policy", "create", "measured-boot", "--eventlog", str(eventlog)]

    rejected = CliRunner().invoke(main, arguments)
    allowed = CliRunner().invoke(main, [*arguments, "--without-secureboot"])

    assert rejected.exit_code == 2
    assert "--without-secureboot" in rejected.output
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.output)["has_secureboot"] is False


@pytest.mark.parametrize(("name", "message"), [
    ("keylime-binary_bios_measurements-empty", "no event log"),
    ("keylime-binary_bios_measurements-bogus", "malformed event log"),
])
def test_cli_rejects_bad_event_log(fixtures_dir: Path, name: str, message: str) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main

    eventlog = fixtures_dir / "eventlog" / name

    result = CliRunner().invoke(main, ["policy", "create", "measured-boot", "--eventlog",
                                       str(eventlog)])

    assert result.exit_code == 2
    assert message in result.output
