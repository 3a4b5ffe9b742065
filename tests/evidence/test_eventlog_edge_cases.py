"""UEFI event log cases that attestation deployments met in the field, one test each, on logs
of our own making."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest

from evidence.errors import ParseError
from evidence.eventlog import (
    FirmwareBlob,
    IplText,
    SignatureData,
    Text,
    UefiVariable,
    check_event_data,
    compare_replayed_pcrs,
    parse_event_log,
    read_event_log,
    replay_event_log,
    verify_event_log,
)
from evidence.findings import Severity, is_failure
from tests.support.eventlog import (
    EFI_CERT_SHA256_GUID,
    EFI_CERT_X509_GUID,
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    EV_EFI_ACTION,
    EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_POST_CODE,
    EV_S_CRTM_VERSION,
    SHIM_LOCK_GUID,
    EventLogBuilder,
    encode_firmware_blob,
    encode_signature_data,
    encode_signature_list,
)

OWNER = UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b")


def _boot_log(builder: EventLogBuilder) -> EventLogBuilder:
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\x00\x00")
    builder.add(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option")
    builder.separator(range(8))
    return builder


def test_securityfs_file_read_to_eof_through_short_reads(tmp_path: Path) -> None:
    builder = _boot_log(EventLogBuilder())
    raw = builder.build()
    fifo = tmp_path / "binary_bios_measurements"
    os.mkfifo(fifo)

    def write_in_small_pieces() -> None:
        with open(fifo, "wb", buffering=0) as stream:
            for start in range(0, len(raw), 7):
                stream.write(raw[start : start + 7])
                time.sleep(0.001)

    writer = threading.Thread(target=write_in_small_pieces)
    writer.start()
    try:
        assert fifo.stat().st_size == 0
        data = read_event_log(fifo)
    finally:
        writer.join(timeout=10)

    assert data == raw
    assert replay_event_log(parse_event_log(data)) == builder.expected_pcrs()


def test_no_spec_id_event_parses_as_sha1_format() -> None:
    builder = _boot_log(EventLogBuilder(banks=("sha1",), crypto_agile=False))

    log = parse_event_log(builder.build())

    assert log.spec_id is None
    assert not log.crypto_agile
    assert log.bank_names == ("sha1",)
    assert len(log.events) == len(builder.events)
    assert [event.pcr for event in log.events] == [event.pcr for event in builder.events]
    assert all(set(event.digests) == {"sha1"} for event in log.events)
    assert replay_event_log(log) == builder.expected_pcrs()


def test_startup_locality_sets_pcr0_initial_value() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.startup_locality(3)
    _boot_log(builder)

    log = parse_event_log(builder.build())
    replayed = replay_event_log(log)

    assert log.startup_locality == 3
    assert not log.events[1].extends_pcr
    pcr0_digests = [event.digests for event in log.events if event.pcr == 0 and event.extends_pcr]
    for bank, initial in (("sha1", bytes(19) + b"\x03"), ("sha256", bytes(31) + b"\x03")):
        value = initial
        for digests in pcr0_digests:
            value = hashlib.new(bank, value + digests[bank]).digest()
        assert replayed[bank][0] == value
    assert replayed == builder.expected_pcrs()


def test_startup_locality_alone_gives_pcr0_locality_value() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.startup_locality(3)

    replayed = replay_event_log(parse_event_log(builder.build()))

    assert replayed == {"sha256": {0: bytes(31) + b"\x03"}}


def test_no_action_events_never_extend_a_pcr() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    _boot_log(builder)
    expected = builder.expected_pcrs()
    with_no_action = EventLogBuilder(banks=("sha1", "sha256"))
    with_no_action.no_action(b"SP800-155 Event\x00" + bytes(20), pcr=0, digest_fill=0x5A)
    _boot_log(with_no_action)
    with_no_action.no_action(b"NvIndexInstance\x00", pcr=5, digest_fill=0xFF)
    with_no_action.no_action(b"not a known layout", pcr=11, digest_fill=0x01)

    log = parse_event_log(with_no_action.build())
    replayed = replay_event_log(log)

    assert replayed == expected
    assert 11 not in replayed["sha256"]
    assert [event.extends_pcr for event in log.events if event.type_name == "EV_NO_ACTION"] == [
        False
    ] * 4


def test_post_code_text_blob_and_unknown_layouts() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(0, EV_POST_CODE, b"ACPI DATA")
    builder.add(0, EV_POST_CODE, encode_firmware_blob(0xFFD00000, 0x300000))
    builder.add(0, EV_POST_CODE, b"\x01\x02\x03\x04\xfe")

    log = parse_event_log(builder.build())
    text, blob, unknown = log.events[1:]

    assert text.decoded == Text("ACPI DATA", "utf-8")
    assert blob.decoded == FirmwareBlob(0xFFD00000, 0x300000)
    assert unknown.decoded is None
    assert unknown.data == b"\x01\x02\x03\x04\xfe"
    assert replay_event_log(log) == builder.expected_pcrs()


def test_shim_authorities_decode_only_signature_databases() -> None:
    certificate = b"\x30\x82\x01\x00" + bytes(256)
    builder = EventLogBuilder(banks=("sha256",))
    db = encode_signature_list(EFI_CERT_X509_GUID, [(OWNER, certificate)]) + encode_signature_list(
        EFI_CERT_SHA256_GUID, [(OWNER, b"\x11" * 32), (OWNER, b"\x22" * 32)]
    )
    builder.efi_variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_IMAGE_SECURITY_DATABASE, "db", db)
    builder.efi_variable(7, EV_EFI_VARIABLE_AUTHORITY, SHIM_LOCK_GUID, "SbatLevel",
                         b"sbat,1,2021030218\n")
    builder.efi_variable(7, EV_EFI_VARIABLE_AUTHORITY, SHIM_LOCK_GUID, "MokListTrusted", b"\x01")
    builder.efi_variable(7, EV_EFI_VARIABLE_AUTHORITY, SHIM_LOCK_GUID, "vendor_db",
                         encode_signature_data(OWNER, certificate))

    log = parse_event_log(builder.build())
    db_variable, sbat, mok_trusted, vendor_db = (event.decoded for event in log.events[1:])

    assert isinstance(db_variable, UefiVariable)
    assert db_variable.signature_lists is not None
    assert [entry.is_x509 for entry in db_variable.signatures] == [True, False, False]
    assert [entry.is_sha256 for entry in db_variable.signatures] == [False, True, True]
    assert db_variable.signatures[0].data == certificate
    assert db_variable.signatures[1].data == b"\x11" * 32
    assert log.secure_boot_variable("db") == db_variable

    assert isinstance(sbat, UefiVariable)
    assert sbat.name == "SbatLevel"
    assert sbat.data == b"sbat,1,2021030218\n"
    assert sbat.signature_lists is None
    assert sbat.signature is None

    assert isinstance(mok_trusted, UefiVariable)
    assert mok_trusted.data == b"\x01"
    assert mok_trusted.signature_lists is None
    assert mok_trusted.signature is None

    assert isinstance(vendor_db, UefiVariable)
    assert vendor_db.signature == SignatureData(OWNER, certificate)
    assert log.authorities == (sbat, mok_trusted, vendor_db)


def test_guid_prints_first_three_fields_little_endian() -> None:
    raw_guid = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
    builder = EventLogBuilder(banks=("sha256",))
    builder.efi_variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "SecureBoot",
                         b"\x01")

    raw = builder.build()
    log = parse_event_log(raw)
    variable = log.events[1].decoded

    assert raw_guid in raw
    assert isinstance(variable, UefiVariable)
    assert str(variable.vendor_guid) == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert variable.to_json()["vendor_guid"] == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert log.secure_boot_enabled is True


def test_ipl_strings_decode_and_replay_uses_logged_digest() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    grub = builder.grub_string("kernel_cmdline", "/vmlinuz-6.11 root=/dev/sda1 ro")
    systemd_boot = builder.systemd_boot_command_line("initrd=\\initrd.img quiet", pcr=12)
    older_systemd_boot = builder.add(
        8, EV_IPL, "console=ttyS0".encode("utf-16-le") + b"\x00\x00",
        digests={"sha1": b"\x01" * 20, "sha256": b"\x02" * 32},
    )

    log = parse_event_log(builder.build())
    findings = check_event_data(log)

    decoded = [event.decoded for event in log.events[1:]]
    assert decoded[0] == IplText(
        "kernel_cmdline: /vmlinuz-6.11 root=/dev/sda1 ro", "utf-8", "kernel_cmdline",
        "/vmlinuz-6.11 root=/dev/sda1 ro",
    )
    assert decoded[1] == IplText(
        "initrd=\\initrd.img quiet", "utf-16-le", None, "initrd=\\initrd.img quiet"
    )
    assert isinstance(decoded[2], IplText)
    assert decoded[2].text == "console=ttyS0"
    assert log.kernel_command_lines == (
        "/vmlinuz-6.11 root=/dev/sda1 ro",
        "initrd=\\initrd.img quiet",
        "console=ttyS0",
    )
    assert log.events[3].digests == older_systemd_boot.digests
    assert replay_event_log(log) == builder.expected_pcrs()
    assert [f.code for f in findings] == ["eventlog-digest-data-mismatch"]
    assert findings[0].severity == Severity.WARNING
    assert findings[0].context["event_index"] == 3
    assert grub.digests != systemd_boot.digests


def test_several_banks_each_digest_to_its_bank() -> None:
    builder = EventLogBuilder(banks=("sha256", "sha1"))
    builder.add(0, EV_S_CRTM_VERSION, b"v", digests={"sha1": b"\xaa" * 20, "sha256": b"\xbb" * 32})
    _boot_log(builder)
    expected = builder.expected_pcrs()
    quoted = {**expected, "sha384": {0: b"\x01" * 48, 7: b"\x02" * 48}}

    log = parse_event_log(builder.build())
    replayed = replay_event_log(log)
    findings = compare_replayed_pcrs(replayed, quoted)

    assert log.events[1].digests == {"sha256": b"\xbb" * 32, "sha1": b"\xaa" * 20}
    assert replayed == expected
    assert [f.code for f in findings] == ["eventlog-bank-missing"]
    assert findings[0].severity == Severity.WARNING
    assert findings[0].context["bank"] == "sha384"
    assert not is_failure(findings)


def test_empty_log_is_no_event_log() -> None:
    with pytest.raises(ParseError, match="no event log") as caught:
        parse_event_log(b"")

    assert caught.value.code == "eventlog-empty"


def test_short_text_is_malformed_event_log() -> None:
    with pytest.raises(ParseError, match=r"event 0 at byte offset 0") as caught:
        parse_event_log(b"hello\n")

    assert caught.value.code == "eventlog-malformed"


def test_replay_mismatch_is_finding() -> None:
    builder = _boot_log(EventLogBuilder(banks=("sha256",)))
    quoted = {"sha256": {**builder.expected_pcrs()["sha256"], 7: b"\x07" * 32}}

    findings = verify_event_log(parse_event_log(builder.build()), quoted)

    assert [f.code for f in findings] == ["eventlog-pcr-mismatch"]
    assert findings[0].context["pcr"] == 7
    assert is_failure(findings)
