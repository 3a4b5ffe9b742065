"""Parsing IMA measurement lists: the ASCII and binary forms, and every template."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from evidence.errors import ImaParseError, ParseError
from evidence.ima import (
    ImaEntry,
    format_ascii_list,
    format_binary_list,
    is_binary_list,
    parse_ascii_list,
    parse_binary_list,
    parse_measurement_list,
    replay_pcr10,
)
from tests.support.ima import ImaListBuilder, fake_boot_pcrs


def _mixed_list() -> ImaListBuilder:
    ima = ImaListBuilder()
    ima.boot_aggregate(fake_boot_pcrs())
    ima.ima_ng("/usr/bin/bash", b"bash")
    ima.ima_ng("/usr/lib/libc.so.6", b"libc", algorithm="sha1")
    ima.ima_ng("/etc/ssl/openssl.cnf", b"cnf", algorithm="sha512")
    ima.ima_sig("/usr/bin/env", b"env", signature=bytes.fromhex("030204aabbccdd0002beef"))
    ima.ima_sig("/usr/bin/true", b"true")
    ima.ima_buf("kernel_version", b"6.1.0-rpi7-rpi-v8")
    ima.ima("/sbin/init", b"init")
    ima.violation("/var/log/messages")
    return ima


def _assert_matches_built(entry: ImaEntry, index: int, built: ImaListBuilder) -> None:
    expected = built.entries[index]
    assert entry.index == index
    assert entry.pcr == expected.pcr
    assert entry.template == expected.template
    assert entry.template_hash == expected.template_hash
    assert entry.digest_algorithm == expected.digest_algorithm
    assert entry.digest == expected.digest
    assert entry.path_bytes == expected.name
    assert entry.signature == expected.signature
    assert entry.buffer == expected.buffer
    assert entry.template_data == expected.template_data


def test_parse_ascii_every_template() -> None:
    built = _mixed_list()

    parsed = parse_ascii_list(built.ascii())

    assert len(parsed) == len(built.entries)
    assert parsed.form == "ascii"
    assert parsed.template_hash_algorithm == "sha1"
    for index, entry in enumerate(parsed):
        _assert_matches_built(entry, index, built)


def test_parse_ascii_accepts_bytes_and_text_alike() -> None:
    built = _mixed_list()

    assert parse_ascii_list(built.ascii_bytes()) == parse_ascii_list(built.ascii())


def test_parse_ascii_start_index_numbers_entries() -> None:
    built = _mixed_list()

    parsed = parse_ascii_list(built.ascii(), start_index=40)

    assert [entry.index for entry in parsed] == list(range(40, 40 + len(built.entries)))
    assert parsed.end_index == 40 + len(built.entries)


def test_parse_ascii_empty_list_has_no_entries() -> None:
    parsed = parse_ascii_list("", start_index=7)

    assert len(parsed) == 0
    assert parsed.end_index == 7


def test_parse_ascii_last_line_without_newline() -> None:
    built = _mixed_list()

    parsed = parse_ascii_list(built.ascii().rstrip("\n"))

    assert len(parsed) == len(built.entries)
    assert parsed[-1].path == "/var/log/messages"


def test_parse_ascii_sha256_template_hash_column() -> None:
    built = ImaListBuilder(template_hash_algorithm="sha256")
    built.ima_ng("/usr/bin/bash", b"bash")

    parsed = parse_ascii_list(built.ascii())

    assert parsed.template_hash_algorithm == "sha256"
    assert parsed[0].template_hash == hashlib.sha256(parsed[0].template_data).digest()


def test_named_template_hash_algorithm_checked() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/bash", b"bash")

    with pytest.raises(ImaParseError) as raised:
        parse_ascii_list(built.ascii(), template_hash_algorithm="sha256")

    assert raised.value.code == "ima-template-hash-invalid"
    assert raised.value.line == 1
    assert "20 bytes, expected 32" in raised.value.message


def test_parse_ascii_pcr_below_10_has_leading_space() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/bash", b"bash", pcr=9)

    line = built.ascii()
    parsed = parse_ascii_list(line)

    assert line.startswith(" 9 ")
    assert parsed[0].pcr == 9


def test_parse_ascii_name_keeps_leading_and_trailing_spaces() -> None:
    built = ImaListBuilder()
    built.ima_ng(" /tmp/odd name ", b"x")
    built.ima_sig("/tmp/with space", b"y")

    parsed = parse_ascii_list(built.ascii())

    assert parsed[0].path == " /tmp/odd name "
    assert parsed[1].path == "/tmp/with space"
    assert parsed[1].signature == b""


def test_parse_ascii_non_utf8_name_round_trips() -> None:
    built = ImaListBuilder()
    built.ima_ng(b"/tmp/latin1-\xe9t\xe9", b"x")

    parsed = parse_ascii_list(built.ascii_bytes())

    assert parsed[0].path_bytes == b"/tmp/latin1-\xe9t\xe9"
    assert parsed[0].template_data == built.entries[0].template_data


def test_parse_ascii_violation_keeps_zero_digest() -> None:
    built = ImaListBuilder()
    built.violation("/var/log/messages", algorithm="sha256")

    parsed = parse_ascii_list(built.ascii())

    assert parsed[0].is_violation
    assert parsed[0].digest_algorithm == "sha256"
    assert parsed[0].digest == bytes(20)


def test_ima_sig_missing_separator_empty() -> None:
    built = ImaListBuilder()
    built.ima_sig("/usr/bin/true", b"true")
    stripped = built.ascii().rstrip("\n").rstrip(" ")

    parsed = parse_ascii_list(stripped)

    assert parsed[0].signature == b""
    assert parsed[0].template_data == built.entries[0].template_data


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        ("10 abc", "ima-line-malformed", "line has 2 of the columns"),
        ("", "ima-line-malformed", "line is empty"),
        ("x0 {th} ima-ng sha256:{d256} /a", "ima-pcr-invalid", "PCR 'x0' is not a decimal"),
        ("24 {th} ima-ng sha256:{d256} /a", "ima-pcr-invalid", "PCR '24'"),
        ("+10 {th} ima-ng sha256:{d256} /a", "ima-pcr-invalid", "PCR '+10'"),
        (" 10 {th} ima-ng sha256:{d256} /a", "ima-pcr-invalid", "not a single digit"),
        ("10 {th_upper} ima-ng sha256:{d256} /a", "ima-template-hash-invalid", "not lowercase"),
        ("10 {th}zz ima-ng sha256:{d256} /a", "ima-template-hash-invalid", "not hexadecimal"),
        ("10 {th} ima-ngv2 sha256:{d256} /a", "ima-template-unsupported", "'ima-ngv2'"),
        ("10 {th} ima-ng {d256} /a", "ima-digest-invalid", "is not '<algorithm>:<hex>'"),
        ("10 {th} ima-ng md6:{d256} /a", "ima-digest-algorithm-unknown", "'md6'"),
        ("10 {th} ima-ng sha256:{d256}00 /a", "ima-digest-invalid", "33 bytes, expected 32"),
        ("10 {th} ima-ng sha256:{d256_upper} /a", "ima-digest-invalid", "not lowercase"),
        ("10 {th} ima-ng sha256:{d256}", "ima-line-malformed", "no file name"),
        ("10 {th} ima-sig sha256:{d256} /a 03zz", "ima-signature-invalid", "signature '03zz'"),
        ("10 {th} ima-buf sha256:{d256} name 0", "ima-buffer-invalid", "buffer '0'"),
        ("10 {th} ima {d256} /a", "ima-digest-invalid", "32 bytes, expected 20"),
        ("10 {th} ima {th} /" + "a" * 255, "ima-name-too-long", "256 bytes, expected at most 255"),
        ("10 {th} ima-ng sha256:{d256} /a\0b", "ima-name-invalid", "NUL"),
        ("10 {th} ima-ng sha256:{d256} /a\ud800", "ima-name-invalid", "not valid UTF-8"),
    ],
)
def test_parse_ascii_rejects_malformed_line(line: str, code: str, message: str) -> None:
    th = "ab" * 20
    d256 = "cd" * 32
    first = "10 " + th + " ima-ng sha256:" + d256 + " /first"
    bad = line.format(th=th, th_upper=th.upper(), d256=d256, d256_upper=d256.upper())

    with pytest.raises(ImaParseError) as raised:
        parse_ascii_list(first + "\n" + bad + "\n")

    assert raised.value.code == code
    assert raised.value.line == 2
    assert raised.value.message.startswith("line 2: ")
    assert message in raised.value.message


def test_parse_ascii_error_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as raised:
        parse_ascii_list("garbage\n")

    assert raised.value.code == "ima-line-malformed"


def test_parse_ascii_first_line_template_hash_length_checked() -> None:
    with pytest.raises(ImaParseError) as raised:
        parse_ascii_list("10 abcd ima-ng sha256:00 /a\n")

    assert raised.value.code == "ima-template-hash-invalid"
    assert raised.value.line == 1


def test_format_ascii_reproduces_built_list() -> None:
    built = _mixed_list()

    assert format_ascii_list(parse_ascii_list(built.ascii()).entries) == built.ascii()


def test_parse_binary_every_template() -> None:
    built = _mixed_list()

    parsed = parse_binary_list(built.binary())

    assert parsed.form == "binary"
    assert len(parsed) == len(built.entries)
    for index, entry in enumerate(parsed):
        _assert_matches_built(entry, index, built)


def test_binary_round_trip_equals_ascii_entries() -> None:
    built = _mixed_list()
    from_ascii = parse_ascii_list(built.ascii())

    binary = format_binary_list(from_ascii.entries)

    assert binary == built.binary()
    assert parse_binary_list(binary).entries == from_ascii.entries


def test_parse_binary_sha256_template_hashes() -> None:
    built = ImaListBuilder(template_hash_algorithm="sha256")
    built.ima_ng("/usr/bin/bash", b"bash")

    parsed = parse_binary_list(built.binary(), template_hash_algorithm="sha256")

    assert parsed[0].template_hash == built.entries[0].template_hash


def test_parse_binary_truncated_record_names_offset() -> None:
    built = _mixed_list()
    data = built.binary()
    second_record = len(built.entries[0].binary_record())

    with pytest.raises(ImaParseError) as raised:
        parse_binary_list(data[: second_record + 30])

    assert raised.value.code == "ima-list-truncated"
    assert raised.value.offset == second_record
    assert "entry 1 at byte offset" in raised.value.message


# Offsets in a one-entry ima-ng record: PCR 0-3, template hash 4-23, name length 24-27,
# "ima-ng" 28-33, template data length 34-37, d-ng field length 38-41.
@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda record: b"\x30" + record[1:], "ima-pcr-invalid"),
        (lambda record: record[:24] + b"\x40" + record[25:], "ima-template-unsupported"),
        (lambda record: record[:28] + b"ima-xx" + record[34:], "ima-template-unsupported"),
        (lambda record: record[:-1], "ima-list-truncated"),
        (lambda record: record[:38] + b"\xe8\x03\0\0" + record[42:], "ima-template-data-malformed"),
    ],
)
def test_parse_binary_rejects_malformed_record(mutate: object, code: str) -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/bash", b"bash")
    record = built.binary()

    with pytest.raises(ImaParseError) as raised:
        parse_binary_list(mutate(record))  # type: ignore[operator]

    assert raised.value.code == code
    assert raised.value.offset == 0


def test_parse_binary_trailing_bytes_are_a_truncated_record() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/bash", b"bash")
    record = built.binary()

    with pytest.raises(ImaParseError) as raised:
        parse_binary_list(record + b"\0\0")

    assert raised.value.code == "ima-list-truncated"
    assert raised.value.offset == len(record)


def test_parse_binary_rejects_d_ng_without_nul() -> None:
    built = ImaListBuilder()
    entry = built.ima_ng("/usr/bin/bash", b"bash")
    broken = entry.template_data.replace(b"sha256:\0", b"sha256:x", 1)
    built.replace_entry(0, template_data=broken)

    with pytest.raises(ImaParseError) as raised:
        parse_binary_list(built.binary())

    assert raised.value.code == "ima-digest-invalid"


def test_parse_binary_rejects_name_without_nul() -> None:
    built = ImaListBuilder()
    entry = built.ima_ng("/usr/bin/bash", b"bash")
    built.replace_entry(0, template_data=entry.template_data[:-1] + b"h")

    with pytest.raises(ImaParseError) as raised:
        parse_binary_list(built.binary())

    assert raised.value.code == "ima-name-invalid"


def test_detect_binary_and_ascii_forms() -> None:
    built = _mixed_list()

    assert is_binary_list(built.binary())
    assert not is_binary_list(built.ascii_bytes())
    assert parse_measurement_list(built.binary()).form == "binary"
    assert parse_measurement_list(built.ascii_bytes()).form == "ascii"
    assert parse_measurement_list(built.ascii()).form == "ascii"


def test_real_rust_keylime_list_parses(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_bytes()

    parsed = parse_ascii_list(data)

    assert len(parsed) == 826
    assert parsed[0].path == "boot_aggregate"
    assert parsed[1].path == "/init"
    assert {entry.template for entry in parsed} == {"ima-ng"}
    assert all(entry.digest_algorithm == "sha1" for entry in parsed)
    assert format_ascii_list(parsed.entries).encode() == data


def test_real_rust_keylime_list_binary_round_trip(fixtures_dir: Path) -> None:
    parsed = parse_ascii_list((fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_bytes())

    again = parse_measurement_list(format_binary_list(parsed.entries))

    assert again.entries == parsed.entries
    assert replay_pcr10(again, "sha256") == replay_pcr10(parsed, "sha256")


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_keylime_fixture_lists_parse(fixtures_dir: Path, algorithm: str) -> None:
    data = (fixtures_dir / "ima" / f"keylime-ima-log-{algorithm}").read_text()

    parsed = parse_ascii_list(data)

    assert len(parsed) == 2
    assert [entry.path for entry in parsed] == ["boot_aggregate", "/data"]
    assert parsed[1].digest_algorithm == algorithm
    assert parsed[1].template_hash == hashlib.sha1(parsed[1].template_data).digest()


def test_keylime_fixture_unknown_algorithm_rejected(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "ima" / "keylime-ima-log-unknown").read_text()

    with pytest.raises(ImaParseError) as raised:
        parse_ascii_list(data)

    assert raised.value.code == "ima-digest-algorithm-unknown"
    assert raised.value.line == 1
    assert "'unknown'" in raised.value.message
