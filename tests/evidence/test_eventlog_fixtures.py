"""UEFI event logs captured on real machines: every one parses, and the PCR values edgetrust
replays equal those that tpm2-tools' ``tpm2_eventlog`` prints for the same file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from evidence.errors import ParseError
from evidence.eventlog import (
    EventLog,
    FirmwareBlob,
    GuidData,
    ImageLoadEvent,
    Text,
    UefiVariable,
    check_event_data,
    parse_event_log,
    read_event_log,
    replay_event_log,
)

LOGS = [
    "go-attestation-crypto_agile_eventlog",
    "go-attestation-ebs_event_missing_eventlog",
    "go-attestation-short_no_action_eventlog",
    "keylime-binary_bios_measurements",
    "keylime-binary_bios_measurements-secureboot",
    "rust-keylime-uefi_log.bin",
    "tpm2-tools-event-arch-linux.bin",
    "tpm2-tools-event-moklisttrusted.bin",
    "tpm2-tools-event-postcode.bin",
    "tpm2-tools-event-uefi-sha1-log.bin",
]
# tpm2_eventlog rejects this one: it takes any first EV_NO_ACTION event for a Spec ID event.
TPM2_TOOLS_REJECTS = {"go-attestation-short_no_action_eventlog"}

needs_tpm2_eventlog = pytest.mark.skipif(
    shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog (tpm2-tools) is not installed"
)


def _load(fixtures_dir: Path, name: str) -> EventLog:
    return parse_event_log(read_event_log(fixtures_dir / "eventlog" / name))


def _tpm2_eventlog_pcrs(path: Path) -> dict[str, dict[int, str]]:
    """Run ``tpm2_eventlog`` and read the ``pcrs:`` section at the end of its YAML output:
    a line ``  <bank>:`` per bank, then ``    <index> : 0x<hex>`` per PCR."""
    result = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    section = result.stdout.split("\npcrs:\n", 1)[1]
    pcrs: dict[str, dict[int, str]] = {}
    bank = ""
    for line in section.splitlines():
        bank_line = re.fullmatch(r"  (\w+):", line)
        value_line = re.fullmatch(r"\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)", line)
        if bank_line:
            bank = bank_line.group(1)
            pcrs[bank] = {}
        elif value_line:
            pcrs[bank][int(value_line.group(1))] = value_line.group(2).lower()
        else:
            raise AssertionError(f"unexpected line in tpm2_eventlog pcrs section: {line!r}")
    return pcrs


def _replay_like_tpm2_tools_before_fix(log: EventLog, bank: str, pcr: int) -> str:
    """Replay one PCR the way tpm2-tools 5.4 does: from zeros, and extending
    EV_NO_ACTION events too. tpm2-tools fixed both in 2023, after 5.4."""
    value = bytes(hashlib.new(bank).digest_size)
    for event in log.events[1:] if log.crypto_agile else log.events:
        if event.pcr == pcr:
            value = hashlib.new(bank, value + event.digests[bank]).digest()
    return value.hex()


def _replay_with_startup_locality(log: EventLog, bank: str, pcr: int) -> str:
    """Replay one PCR by the PFP: PCR 0 starts with the StartupLocality in its last byte and
    EV_NO_ACTION events extend nothing."""
    size = hashlib.new(bank).digest_size
    value = bytes(size)
    for event in log.events:
        if event.pcr == 0 == pcr and event.data.startswith(b"StartupLocality\x00"):
            value = bytes(size - 1) + event.data[16:17]
    for event in log.events:
        if event.pcr == pcr and event.type_name != "EV_NO_ACTION":
            value = hashlib.new(bank, value + event.digests[bank]).digest()
    return value.hex()


@pytest.mark.parametrize("name", LOGS)
def test_fixture_log_parses(fixtures_dir: Path, name: str) -> None:
    log = _load(fixtures_dir, name)

    assert log.events
    assert [event.index for event in log.events] == list(range(len(log.events)))
    assert all(set(event.digests) == set(log.bank_names) or not event.extends_pcr
               for event in log.events)
    json.dumps(log.to_json())


@needs_tpm2_eventlog
@pytest.mark.parametrize("name", [name for name in LOGS if name not in TPM2_TOOLS_REJECTS])
def test_fixture_replay_matches_tpm2_eventlog(fixtures_dir: Path, name: str) -> None:
    path = fixtures_dir / "eventlog" / name
    log = parse_event_log(read_event_log(path))
    ours = {bank: {pcr: value.hex() for pcr, value in values.items()}
            for bank, values in replay_event_log(log).items()}

    theirs = _tpm2_eventlog_pcrs(path)

    assert set(ours) == set(theirs)
    for bank in theirs:
        assert set(ours[bank]) == set(theirs[bank]), bank
        for pcr, value in theirs[bank].items():
            has_no_action = any(
                event.pcr == pcr and not event.extends_pcr for event in log.events[1:]
            )
            if ours[bank][pcr] != value and has_no_action:
                # Old tpm2-tools extends EV_NO_ACTION events; the difference must be exactly
                # that bug, and edgetrust's value follows the PFP's StartupLocality rule.
                assert value == _replay_like_tpm2_tools_before_fix(log, bank, pcr), (bank, pcr)
                assert ours[bank][pcr] == _replay_with_startup_locality(log, bank, pcr)
                continue
            assert ours[bank][pcr] == value, (bank, pcr)


def test_short_no_action_log_parses_as_sha1_format(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "go-attestation-short_no_action_eventlog")

    assert not log.crypto_agile
    assert len(log.events) == 1
    assert log.events[0].type_name == "EV_NO_ACTION"
    assert log.startup_locality == 3
    assert replay_event_log(log) == {"sha1": {0: bytes(19) + b"\x03"}}


def test_bogus_fixture_is_malformed(fixtures_dir: Path) -> None:
    raw = read_event_log(fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-bogus")

    with pytest.raises(ParseError, match=r"malformed event log: event 0 at byte offset 0") as caught:
        parse_event_log(raw)

    assert caught.value.code == "eventlog-malformed"


def test_empty_fixture_is_no_event_log(fixtures_dir: Path) -> None:
    raw = read_event_log(fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-empty")

    with pytest.raises(ParseError, match="no event log") as caught:
        parse_event_log(raw)

    assert caught.value.code == "eventlog-empty"


def test_secureboot_fixture_reference_values(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "keylime-binary_bios_measurements-secureboot")

    assert log.secure_boot_enabled is True
    pk, kek, db, dbx = (log.secure_boot_variable(name) for name in ("PK", "KEK", "db", "dbx"))
    assert pk is not None
    assert kek is not None
    assert db is not None
    assert dbx is not None
    assert [entry.is_x509 for entry in pk.signatures] == [True]
    assert len(kek.signatures) == 3
    assert all(entry.is_x509 for entry in db.signatures)
    assert all(entry.is_sha256 and len(entry.data) == 32 for entry in dbx.signatures)
    assert len(dbx.signatures) == 371
    certificate = db.signatures[0].certificate()
    assert isinstance(certificate, x509.Certificate)

    firmware = log.firmware_events
    assert firmware[0].decoded == Text("edk2-20240524-7.el9", "utf-16-le")
    assert isinstance(firmware[1].decoded, FirmwareBlob)

    applications = log.boot_applications
    assert len(applications) == 3
    shim = applications[0].decoded
    assert isinstance(shim, ImageLoadEvent)
    assert shim.device_path_text == (
        "PciRoot(0x0)/Pci(0x2,0x3)/Pci(0x0,0x0)/"
        "HD(1,GPT,a88ed452-9a52-45c4-91ce-3da7707caaab,0x800,0x12c000)/\\EFI\\redhat\\shimx64.efi"
    )
    assert all(len(event.digests["sha256"]) == 32 for event in applications)

    assert len(log.kernel_command_lines) == 1
    assert log.kernel_command_lines[0].startswith("(hd0,gpt2)/vmlinuz-5.14.0-503.11.1.el9_5")
    assert [event.index for event in log.mok_events("MokList")] == [30]
    assert [event.index for event in log.mok_events("MokListX")] == [31]
    assert [authority.name for authority in log.authorities] == ["db", "SbatLevel", "vendor_db"]
    assert log.authorities[0].signature is not None
    assert check_event_data(log) == []


def test_keylime_fixture_secure_boot_off(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "keylime-binary_bios_measurements")

    assert log.secure_boot_enabled is False
    assert log.firmware_events[0].decoded == Text("Boot Guard Measured S-CRTM", "utf-8")
    nvme_shim = log.boot_applications[1].decoded
    assert isinstance(nvme_shim, ImageLoadEvent)
    assert nvme_shim.device_path_text is not None
    assert "NVMe(0x1,00-25-38-B2-21-D1-37-50)" in nvme_shim.device_path_text


def test_moklisttrusted_fixture_keeps_one_byte_raw(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "tpm2-tools-event-moklisttrusted.bin")

    by_name = {authority.name: authority for authority in log.authorities}
    mok_trusted = by_name["MokListTrusted"]
    assert mok_trusted.data == b"\x01"
    assert mok_trusted.signature is None
    assert mok_trusted.signature_lists is None
    assert by_name["SbatLevel"].data.startswith(b"sbat,1,")
    assert by_name["Shim"].signature is None
    events = [event for event in log.events if event.decoded is mok_trusted]
    assert events[0].pcr == 7


def test_postcode_fixture_decodes_firmware_blobs(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "tpm2-tools-event-postcode.bin")

    post_codes = [event for event in log.events if event.type_name == "EV_POST_CODE"]
    assert post_codes
    assert all(isinstance(event.decoded, FirmwareBlob) for event in post_codes)
    assert all(len(event.data) == 16 for event in post_codes)
    assert isinstance(log.events[1].decoded, GuidData)


def test_arch_linux_fixture_ipl_digest_mismatch_warns(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "tpm2-tools-event-arch-linux.bin")

    findings = check_event_data(log)

    assert [(f.code, f.severity.name, f.context["event_index"]) for f in findings] == [
        ("eventlog-digest-data-mismatch", "WARNING", 24)
    ]
    assert log.kernel_command_lines[0].startswith("initrd=\\intel-ucode.img")
    assert re.search(r"l1tf=off$", log.kernel_command_lines[0])


def test_sha1_fixture_variables_decode(fixtures_dir: Path) -> None:
    log = _load(fixtures_dir, "tpm2-tools-event-uefi-sha1-log.bin")

    assert not log.crypto_agile
    secure_boot = log.secure_boot_variable("SecureBoot")
    assert isinstance(secure_boot, UefiVariable)
    assert str(secure_boot.vendor_guid) == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert secure_boot.data == b""
