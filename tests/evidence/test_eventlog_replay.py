"""Replay of event logs and comparison with quoted PCRs."""

from __future__ import annotations

from evidence.eventlog import (
    EVENT_LOG_PCRS,
    check_event_data,
    compare_replayed_pcrs,
    event_data_matches_digests,
    parse_event_log,
    replay_event_log,
    verify_event_log,
)
from evidence.findings import Severity, is_failure
from tests.support.eventlog import (
    EFI_GLOBAL_VARIABLE,
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_S_CRTM_VERSION,
    EV_SEPARATOR,
    EventLogBuilder,
    encode_variable_data,
)


def _builder() -> EventLogBuilder:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.startup_locality(3)
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le"))
    builder.efi_variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "SecureBoot",
                         b"\x01")
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"shim")
    builder.grub_string("kernel_cmdline", "/vmlinuz root=/dev/sda1")
    builder.separator(range(8))
    return builder


def test_replay_equals_builder_expectation() -> None:
    builder = _builder()

    replayed = replay_event_log(parse_event_log(builder.build()))

    assert replayed == builder.expected_pcrs()
    assert sorted(replayed["sha256"]) == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_matching_quote_has_no_findings() -> None:
    builder = _builder()

    findings = verify_event_log(parse_event_log(builder.build()), builder.expected_pcrs())

    assert findings == []


def test_pcr_mismatch_finding_names_bank_pcr_and_values() -> None:
    builder = _builder()
    quoted = builder.expected_pcrs()
    quoted["sha1"][4] = b"\x44" * 20

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), quoted)

    assert [f.code for f in findings] == ["eventlog-pcr-mismatch"]
    finding = findings[0]
    assert finding.severity == Severity.ERROR
    assert finding.context["bank"] == "sha1"
    assert finding.context["pcr"] == 4
    assert finding.context["quoted"] == "44" * 20
    assert finding.context["replayed"] == builder.expected_pcrs()["sha1"][4].hex()
    assert "sha1 PCR 4" in finding.message


def test_quoted_pcr_without_events_must_be_zero() -> None:
    builder = _builder()
    quoted = builder.expected_pcrs()
    quoted["sha256"][9] = bytes(32)
    quoted["sha256"][14] = b"\x01" * 32

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), quoted)

    assert [(f.code, f.context["pcr"]) for f in findings] == [("eventlog-pcr-mismatch", 14)]
    assert findings[0].context["replayed"] == "00" * 32


def test_pcrs_outside_event_log_scope_are_not_compared() -> None:
    builder = _builder()
    quoted = builder.expected_pcrs()
    quoted["sha256"][10] = b"\x0a" * 32
    quoted["sha256"][16] = b"\x10" * 32

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), quoted)

    assert findings == []
    assert 10 not in EVENT_LOG_PCRS


def test_pcr_scope_can_be_chosen() -> None:
    builder = _builder()
    quoted = {"sha256": {7: b"\x07" * 32, 12: bytes(32)}}

    findings = compare_replayed_pcrs(
        replay_event_log(parse_event_log(builder.build())), quoted, pcr_indexes={12}
    )

    assert findings == []


def test_quoted_banks_by_tpm_alg_id() -> None:
    builder = _builder()
    expected = builder.expected_pcrs()
    quoted = {0x0004: expected["sha1"], 0x000B: dict(expected["sha256"]), 0x000C: {0: bytes(48)}}
    quoted[0x000B][5] = b"\x05" * 32

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), quoted)

    assert [(f.code, f.context["bank"]) for f in findings] == [
        ("eventlog-bank-missing", "sha384"),
        ("eventlog-pcr-mismatch", "sha256"),
    ]


def test_bank_missing_is_a_warning() -> None:
    builder = _builder()
    quoted = {**builder.expected_pcrs(), "sha384": {0: bytes(48)}}

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), quoted)

    assert [(f.code, f.severity) for f in findings] == [("eventlog-bank-missing", Severity.WARNING)]
    assert findings[0].context["log_banks"] == ["sha1", "sha256"]


def test_no_common_bank_is_an_error() -> None:
    builder = EventLogBuilder(banks=("sha1",), crypto_agile=False)
    builder.separator(range(8))

    findings = compare_replayed_pcrs(
        replay_event_log(parse_event_log(builder.build())), {"sha256": {0: bytes(32)}}
    )

    assert [f.code for f in findings] == ["eventlog-bank-missing", "eventlog-no-common-bank"]
    assert is_failure(findings)


def test_nothing_compared_is_an_error() -> None:
    builder = _builder()

    findings = compare_replayed_pcrs(
        replay_event_log(parse_event_log(builder.build())), {"sha256": {10: bytes(32)}}
    )

    assert [f.code for f in findings] == ["eventlog-nothing-compared"]
    assert is_failure(findings)


def test_empty_quote_is_an_error() -> None:
    builder = _builder()

    findings = compare_replayed_pcrs(replay_event_log(parse_event_log(builder.build())), {})

    assert [f.code for f in findings] == ["eventlog-no-common-bank"]


def test_tampered_variable_data_is_an_error() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(
        7,
        EV_EFI_VARIABLE_DRIVER_CONFIG,
        encode_variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01"),
        measured=encode_variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x00"),
    )

    log = parse_event_log(builder.build())
    findings = check_event_data(log)

    assert log.secure_boot_enabled is True
    assert event_data_matches_digests(log.events[1]) is False
    assert [(f.code, f.severity) for f in findings] == [
        ("eventlog-digest-data-mismatch", Severity.ERROR)
    ]


def test_informational_data_mismatch_is_a_warning() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(4, EV_EFI_ACTION, b"Calling EFI Application", measured=b"something else")
    builder.add(0, EV_SEPARATOR, b"\x00\x00\x00\x00", measured=b"\x01\x00\x00\x00")

    findings = check_event_data(parse_event_log(builder.build()))

    assert [(f.code, f.severity, f.context["event_index"]) for f in findings] == [
        ("eventlog-digest-data-mismatch", Severity.WARNING, 1),
        ("eventlog-digest-data-mismatch", Severity.WARNING, 2),
    ]


def test_ipl_digest_rules() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.grub_string("grub_cmd", "insmod gzio")
    builder.add(8, EV_IPL, b"grub_cmd: set x=1\x00", measured=b"set x=1\x00")
    builder.systemd_boot_command_line("quiet")
    builder.add(9, EV_IPL, b"(hd0,gpt2)/vmlinuz\x00", measured=b"kernel image bytes")
    builder.add(14, EV_IPL, b"MokList\x00", measured=b"MOK list contents")
    builder.add(12, EV_IPL, "quiet".encode("utf-16-le"), measured=b"other")

    events = parse_event_log(builder.build()).events[1:]

    assert [event_data_matches_digests(event) for event in events] == [
        True, True, True, None, None, False
    ]
