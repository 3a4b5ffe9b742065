"""Replaying IMA measurement lists into PCR 10 and verifying them against quoted values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from evidence.errors import EvidenceError, ParseError
from evidence.findings import Severity, is_failure
from evidence.ima import (
    ImaReplayState,
    check_template_hashes,
    extend_value,
    parse_ascii_list,
    parse_binary_list,
    replay_pcr10,
    verify_measurement_list,
)
from tests.support.ima import ImaListBuilder, fake_boot_pcrs

BANKS = ["sha1", "sha256", "sha384", "sha512"]


def _codes(findings: object) -> list[str]:
    return [finding.code for finding in findings]  # type: ignore[attr-defined]


def _list_of(count: int, *, template_hash_algorithm: str = "sha1") -> ImaListBuilder:
    ima = ImaListBuilder(template_hash_algorithm=template_hash_algorithm)
    ima.boot_aggregate(fake_boot_pcrs())
    for number in range(1, count):
        ima.ima_ng(f"/usr/lib/file{number}", b"content %d" % number)
    return ima


@pytest.mark.parametrize("bank", BANKS)
def test_replay_every_bank_matches_builder(bank: str) -> None:
    built = _list_of(20)
    built.violation("/var/log/messages")
    built.ima_sig("/usr/bin/env", b"env", signature=b"\x03\x02")
    built.ima_buf("kernel_version", b"6.1.0")
    built.ima("/sbin/init", b"init")

    parsed = parse_ascii_list(built.ascii())

    assert replay_pcr10(parsed, bank) == built.pcr10(bank)


def test_replay_extends_template_data_hash_not_template_hash() -> None:
    built = _list_of(1)
    entry = parse_ascii_list(built.ascii())[0]

    expected = hashlib.sha256(bytes(32) + hashlib.sha256(entry.template_data).digest()).digest()

    assert extend_value("sha256", entry) == hashlib.sha256(entry.template_data).digest()
    assert replay_pcr10([entry], "sha256") == expected


def test_replay_from_initial_value() -> None:
    built = _list_of(10)
    parsed = parse_ascii_list(built.ascii())
    middle = replay_pcr10(parsed[:4], "sha256")

    assert replay_pcr10(parsed[4:], "sha256", initial=middle) == built.pcr10("sha256")


def test_replay_skips_entries_of_other_pcrs() -> None:
    built = _list_of(3)
    built.ima_ng("/firmware/blob", b"blob", pcr=11)

    parsed = parse_ascii_list(built.ascii())

    assert replay_pcr10(parsed, "sha256") == built.pcr10("sha256", 3)


def test_replay_rejects_unknown_bank() -> None:
    parsed = parse_ascii_list(_list_of(2).ascii())

    with pytest.raises(EvidenceError) as raised:
        replay_pcr10(parsed, "sm3_256")

    assert raised.value.code == "ima-bank-unsupported"


def test_real_list_replays_into_sha1_and_sha256(fixtures_dir: Path) -> None:
    parsed = parse_ascii_list((fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_bytes())

    sha1 = replay_pcr10(parsed, "sha1")
    sha256 = replay_pcr10(parsed, "sha256")

    # Reference values from an independent replay of the same file, which Keylime 7.14.3's
    # process_measurement_list accepted as PCR 10 of each bank.
    assert sha1.hex() == "82231c67a69da98dc5b3aa10f6343d33109225fc"
    assert sha256.hex() == "c4a065637fc6a7c55f2811dd06cb45dd037133be2b3dc5c3e6fbe6bf061db724"
    assert check_template_hashes(parsed.entries, "sha1") == []


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_real_list_verifies_against_its_pcr10(fixtures_dir: Path, bank: str) -> None:
    parsed = parse_ascii_list((fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_bytes())
    quoted = replay_pcr10(parsed, bank)

    result = verify_measurement_list(parsed, {bank: quoted})

    assert not is_failure(result.findings)
    assert len(result.verified_entries) == 826
    assert result.next_state.next_index == 826
    assert result.next_state.pcr10 == {bank: quoted}


def test_verify_full_list_passes_with_no_findings() -> None:
    built = _list_of(30)
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert result.findings == ()
    assert result.verified_entries == parsed.entries
    assert result.pending_entries == ()
    assert result.next_state == ImaReplayState(
        next_index=30, pcr10={"sha256": built.pcr10("sha256")}, seen_entries=30
    )


def test_verify_several_banks_at_once() -> None:
    built = _list_of(12)
    parsed = parse_ascii_list(built.ascii())
    quoted = {bank: built.pcr10(bank) for bank in BANKS}

    result = verify_measurement_list(parsed, quoted)

    assert not is_failure(result.findings)
    assert dict(result.next_state.pcr10) == quoted


def test_verify_tracks_unquoted_bank_of_the_state() -> None:
    built = _list_of(12)
    first = parse_ascii_list(built.ascii_bytes().split(b"\n", 6)[-1], start_index=6)
    state = ImaReplayState(
        next_index=6,
        pcr10={"sha1": built.pcr10("sha1", 6), "sha256": built.pcr10("sha256", 6)},
        seen_entries=6,
    )

    result = verify_measurement_list(first, {"sha256": built.pcr10("sha256")}, state)

    assert not is_failure(result.findings)
    assert result.next_state.pcr10["sha1"] == built.pcr10("sha1")


def test_verify_wrong_pcr_is_mismatch_with_values() -> None:
    built = _list_of(5)
    parsed = parse_ascii_list(built.ascii())
    wrong = b"\x01" * 32

    result = verify_measurement_list(parsed, {"sha256": wrong})

    assert _codes(result.findings) == ["ima-pcr-mismatch"]
    finding = result.findings[0]
    assert finding.severity == Severity.ERROR
    assert finding.context["quoted"] == wrong.hex()
    assert finding.context["replayed"] == built.pcr10("sha256").hex()
    assert result.verified_entries == ()
    assert result.next_state == ImaReplayState()


def test_verify_banks_must_match_same_prefix() -> None:
    built = _list_of(6)
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(
        parsed, {"sha1": built.pcr10("sha1", 4), "sha256": built.pcr10("sha256", 5)}
    )

    assert sorted(_codes(result.findings)) == ["ima-pcr-mismatch", "ima-pcr-mismatch"]


def test_verify_incremental_resumes_from_state() -> None:
    built = _list_of(40)
    first = parse_ascii_list(b"".join(line + b"\n" for line in built.lines()[:25]))
    state = verify_measurement_list(first, {"sha256": built.pcr10("sha256", 25)}).next_state
    stored = ImaReplayState.from_json(state.to_json())
    rest = parse_ascii_list(
        b"".join(line + b"\n" for line in built.lines()[stored.next_index :]),
        start_index=stored.next_index,
    )

    result = verify_measurement_list(rest, {"sha256": built.pcr10("sha256")}, stored)

    assert not is_failure(result.findings)
    assert [entry.index for entry in result.verified_entries] == list(range(25, 40))
    assert result.next_state.next_index == 40
    assert result.next_state.pcr10["sha256"] == built.pcr10("sha256")


def test_verify_rejects_list_not_starting_at_state() -> None:
    built = _list_of(10)
    state = ImaReplayState(next_index=4, pcr10={"sha256": built.pcr10("sha256", 4)})
    parsed = parse_ascii_list(built.ascii(), start_index=0)

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")}, state)

    assert _codes(result.findings) == ["ima-list-offset-mismatch"]
    assert result.next_state == state


def test_verify_requires_a_quoted_bank() -> None:
    parsed = parse_ascii_list(_list_of(3).ascii())

    result = verify_measurement_list(parsed, {})

    assert _codes(result.findings) == ["ima-pcr10-not-quoted"]


def test_verify_rejects_unsupported_quoted_bank() -> None:
    parsed = parse_ascii_list(_list_of(3).ascii())

    result = verify_measurement_list(parsed, {"sm3_256": bytes(32)})

    assert _codes(result.findings) == ["ima-bank-unsupported"]


def test_verify_state_without_quoted_bank_needs_new_session() -> None:
    built = _list_of(10)
    state = ImaReplayState(next_index=5, pcr10={"sha1": built.pcr10("sha1", 5)}, seen_entries=5)
    rest = parse_ascii_list(b"".join(line + b"\n" for line in built.lines()[5:]), start_index=5)

    result = verify_measurement_list(rest, {"sha256": built.pcr10("sha256")}, state)

    assert _codes(result.findings) == ["ima-bank-not-replayed"]


def test_verify_template_hash_mismatch_fails_though_pcr_matches() -> None:
    built = _list_of(6)
    built.replace_entry(3, template_hash=b"\x11" * 20)
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert _codes(result.findings) == ["ima-template-hash-mismatch"]
    assert result.findings[0].context["entries"] == [3]
    assert "first entry 3: got 1111" in result.findings[0].message
    assert result.next_state == ImaReplayState()


def test_verify_template_hash_checked_with_sha256_column() -> None:
    built = _list_of(4, template_hash_algorithm="sha256")
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha1": built.pcr10("sha1")})

    assert parsed.template_hash_algorithm == "sha256"
    assert result.findings == ()


def test_verify_ima_buf_digest_must_hash_buffer() -> None:
    built = _list_of(2)
    entry = built.ima_buf("kernel_version", b"6.1.0")
    wrong = b"\x22" * 32
    data = entry.template_data.replace(entry.digest, wrong)
    built.replace_entry(2, digest=wrong, template_data=data, template_hash=hashlib.sha1(data).digest())
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert _codes(result.findings) == ["ima-buffer-digest-mismatch"]


def test_verify_reports_entries_of_other_pcrs() -> None:
    built = _list_of(3)
    built.ima_ng("/firmware/blob", b"blob", pcr=11)
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert _codes(result.findings) == ["ima-entry-pcr-unexpected"]
    assert result.findings[0].severity == Severity.WARNING
    assert len(result.verified_entries) == 4


def test_state_json_round_trip() -> None:
    state = ImaReplayState(
        next_index=826,
        pcr10={"sha256": b"\x12" * 32, "sha1": b"\x34" * 20},
        seen_entries=829,
        lagging_rounds=1,
    )

    data = state.to_json()

    assert data == {
        "next_index": 826,
        "pcr10": {"sha1": "34" * 20, "sha256": "12" * 32},
        "seen_entries": 829,
        "lagging_rounds": 1,
    }
    assert ImaReplayState.from_json(data) == state


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"next_index": -1, "pcr10": {}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": "5", "pcr10": {}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": True, "pcr10": {}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": 1, "pcr10": {"sha256": "ab"}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": 1, "pcr10": {"md5": "ab" * 16}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": 1, "pcr10": {"sha1": "AB" * 20}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": 1, "pcr10": {"sha1": 5}, "seen_entries": 0, "lagging_rounds": 0},
        {"next_index": 1, "pcr10": [], "seen_entries": 0, "lagging_rounds": 0},
    ],
)
def test_state_from_json_rejects_malformed(data: dict[str, object]) -> None:
    with pytest.raises(ParseError) as raised:
        ImaReplayState.from_json(data)

    assert raised.value.code == "ima-state-invalid"


def _flip_variants(line: bytes) -> list[bytes]:
    return [
        line[:position] + bytes([line[position] ^ (1 << bit)]) + line[position + 1 :]
        for position in range(len(line))
        for bit in range(8)
    ]


def test_flipped_bit_in_any_line_is_caught() -> None:
    # Every line but a violation's: see test_violation_fields_not_covered_by_pcr10.
    built = ImaListBuilder()
    pcrs = fake_boot_pcrs()
    built.boot_aggregate(pcrs)
    built.ima_ng("/usr/bin/bash", b"bash")
    built.ima_ng("/usr/lib/libc.so.6", b"libc", algorithm="sha1")
    built.ima_sig("/usr/bin/env", b"env", signature=bytes.fromhex("0302041234abcd0002beef"))
    built.ima_sig("/usr/bin/true", b"true")
    built.ima_buf("kernel_version", b"6.1.0")
    built.ima("/sbin/init", b"init")
    built.ima_ng("/tmp/caf\u00e9 menu", b"menu", algorithm="sha512")
    lines = built.lines()
    quoted = {"sha256": built.pcr10("sha256")}
    passed = []

    for number, line in enumerate(lines):
        for flipped in _flip_variants(line + b"\n"):
            data = (
                b"".join(other + b"\n" for other in lines[:number])
                + flipped
                + b"".join(other + b"\n" for other in lines[number + 1 :])
            )
            try:
                parsed = parse_ascii_list(data)
            except ParseError:
                continue
            result = verify_measurement_list(parsed, quoted, boot_pcrs=pcrs)
            if not is_failure(result.findings):
                passed.append((number, flipped))

    assert passed == []


def test_flipped_bit_in_binary_list_is_caught() -> None:
    built = ImaListBuilder()
    built.boot_aggregate(fake_boot_pcrs())
    built.ima_ng("/usr/bin/bash", b"bash")
    built.ima_sig("/usr/bin/env", b"env", signature=b"\x03\x02\x04")
    built.ima_buf("kernel_version", b"6.1.0")
    built.ima("/sbin/init", b"init")
    data = built.binary()
    quoted = {"sha256": built.pcr10("sha256")}
    passed = []

    for flipped in _flip_variants(data):
        try:
            parsed = parse_binary_list(flipped)
        except ParseError:
            continue
        if not is_failure(verify_measurement_list(parsed, quoted).findings):
            passed.append(flipped)

    assert passed == []


def test_violation_fields_not_covered_by_pcr10() -> None:
    # A violation extends 0xff bytes instead of a hash of its template data, so nothing
    # covers its name or digest: the kernel's design, not a gap of the replay.
    built = _list_of(3)
    built.violation("/var/log/messages")
    quoted = {"sha256": built.pcr10("sha256")}
    renamed = built.ascii().replace("/var/log/messages", "/var/log/anything")

    result = verify_measurement_list(parse_ascii_list(renamed), quoted)

    assert not is_failure(result.findings)
    assert result.verified_entries[-1].path == "/var/log/anything"
