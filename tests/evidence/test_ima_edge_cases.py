"""Edge cases of IMA measurement lists that real attestation deployments ran into.

One test per case, each on an input made here with tests.support.ima. The runtime-policy
cases (big policies, exclude lists) belong with the policy tests.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from evidence.errors import ImaParseError, ParseError, VerificationError
from evidence.findings import Severity, is_failure
from evidence.ima import (
    ImaListReader,
    ImaReplayState,
    check_boot_aggregate,
    ima_key_id,
    parse_ascii_list,
    parse_ima_signature,
    replay_pcr10,
    verify_entry_signature,
    verify_measurement_list,
)
from tests.support.ima import (
    ImaListBuilder,
    digest_of,
    fake_boot_pcrs,
    ima_signature_header,
    key_id_of,
)


def _codes(findings: object) -> list[str]:
    return [finding.code for finding in findings]  # type: ignore[attr-defined]


def _lines_from(built: ImaListBuilder, start: int, stop: int | None = None) -> bytes:
    return b"".join(line + b"\n" for line in built.lines()[start:stop])


def test_path_with_utf8_and_underscored_spaces() -> None:
    built = ImaListBuilder()
    built.ima_ng("/home/pi/donkey car/caf\u00e9_\u65e5\u672c.py", b"model")
    built.ima_sig("/opt/m\u00fcnchen/run_me.sh", b"run", signature=b"\x03\x02")
    built.ima_ng("/usr/share/doc/kernel_writes_spaces_as_underscores", b"doc")

    parsed = parse_ascii_list(built.ascii_bytes())

    assert parsed[0].path == "/home/pi/donkey car/caf\u00e9_\u65e5\u672c.py"
    name_bytes = "/home/pi/donkey car/caf\u00e9_\u65e5\u672c.py".encode()
    assert struct.pack("<I", len(name_bytes) + 1) + name_bytes + b"\0" in parsed[0].template_data
    assert parsed[1].path == "/opt/m\u00fcnchen/run_me.sh"
    assert parsed[2].path == "/usr/share/doc/kernel_writes_spaces_as_underscores"
    assert replay_pcr10(parsed, "sha256") == built.pcr10("sha256")
    assert verify_measurement_list(parsed, {"sha1": built.pcr10("sha1")}).findings == ()


def test_empty_signature_is_zero_length_sig_field() -> None:
    built = ImaListBuilder()
    built.ima_sig("/usr/bin/true", b"true", signature=b"")

    text = built.ascii()
    parsed = parse_ascii_list(text)

    assert text.endswith("/usr/bin/true \n")
    assert parsed[0].signature == b""
    assert parsed[0].template_data.endswith(b"/usr/bin/true\0" + struct.pack("<I", 0))
    assert verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")}).findings == ()


def test_byte_swapped_signature_size_still_replays() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    digest = digest_of("sha256", b"swapped")
    raw = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    swapped_size = struct.unpack("<H", struct.pack(">H", len(raw)))[0]
    signature = ima_signature_header("sha256", key_id_of(key.public_key()), raw, size=swapped_size)
    built = ImaListBuilder()
    built.ima_sig("/usr/bin/swapped", digest=digest, signature=signature)

    parsed = parse_ascii_list(built.ascii())
    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert parsed[0].signature == signature
    assert result.findings == ()
    with pytest.raises(ParseError) as raised:
        verify_entry_signature(parsed[0], key.public_key())
    assert raised.value.code == "ima-signature-malformed"
    assert f"size field is {swapped_size}" in raised.value.message


def _ecdsa_signature_of_length(key: ec.EllipticCurvePrivateKey, digest: bytes, length: int) -> bytes:
    for _ in range(2000):
        raw = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        if len(raw) == length:
            return raw
    raise AssertionError(f"no {length}-byte ECDSA signature in 2000 tries")


@pytest.mark.parametrize("length", [70, 71, 72])
def test_variable_length_ecdsa_signatures_verify(length: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    digest = digest_of("sha256", b"content of length %d" % length)
    raw = _ecdsa_signature_of_length(key, digest, length)
    built = ImaListBuilder()
    built.ima_sig(
        "/usr/bin/signed",
        digest=digest,
        signature=ima_signature_header("sha256", key_id_of(key.public_key()), raw),
    )

    entry = parse_ascii_list(built.ascii())[0]

    assert len(entry.signature or b"") == 9 + length
    assert parse_ima_signature(entry.signature or b"").key_id == ima_key_id(key.public_key())
    verify_entry_signature(entry, key.public_key())


def test_wrong_ecdsa_signature_is_verification_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    digest = digest_of("sha256", b"content")
    raw = other.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    built = ImaListBuilder()
    built.ima_sig(
        "/usr/bin/forged",
        digest=digest,
        signature=ima_signature_header("sha256", key_id_of(key.public_key()), raw),
    )
    entry = parse_ascii_list(built.ascii())[0]

    with pytest.raises(VerificationError) as raised:
        verify_entry_signature(entry, key.public_key())

    assert raised.value.code == "ima-signature-invalid"


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384", "sha512"])
def test_violation_extends_ff_of_bank_size(bank: str) -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/a", b"a")
    built.violation("/var/log/messages")
    built.ima_ng("/usr/bin/b", b"b")
    parsed = parse_ascii_list(built.ascii())
    size = hashlib.new(bank).digest_size
    after_first = replay_pcr10(parsed[:1], bank)

    after_violation = replay_pcr10(parsed[:2], bank)
    result = verify_measurement_list(parsed, {bank: built.pcr10(bank)})

    assert parsed[1].template_hash == bytes(20)
    assert after_violation == hashlib.new(bank, after_first + b"\xff" * size).digest()
    assert _codes(result.findings) == ["ima-violation-logged"]
    assert result.findings[0].severity == Severity.INFO
    assert result.findings[0].context["entries"] == [1]


@pytest.mark.parametrize("extra", [0, 1, 2, 3])
def test_list_ahead_of_quote_matches_prefix(extra: int) -> None:
    built = ImaListBuilder()
    built.boot_aggregate(fake_boot_pcrs())
    for number in range(1, 10 + extra):
        built.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    quoted = {"sha256": built.pcr10("sha256", 10)}

    result = verify_measurement_list(parse_ascii_list(built.ascii()), quoted)

    assert not is_failure(result.findings)
    assert len(result.verified_entries) == 10
    assert [entry.index for entry in result.pending_entries] == list(range(10, 10 + extra))
    assert result.next_state.next_index == 10
    assert result.next_state.seen_entries == 10 + extra


def test_no_new_entries_matches_empty_prefix() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/a", b"a")
    built.ima_ng("/usr/bin/b", b"b")
    state = ImaReplayState(next_index=2, pcr10={"sha256": built.pcr10("sha256")}, seen_entries=2)

    result = verify_measurement_list(
        parse_ascii_list("", start_index=2), {"sha256": built.pcr10("sha256")}, state
    )

    assert result.findings == ()
    assert result.verified_entries == ()
    assert result.next_state == state


def test_resume_after_prefix_match_covers_pending_entries() -> None:
    built = ImaListBuilder()
    for number in range(12):
        built.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    first = verify_measurement_list(
        parse_ascii_list(_lines_from(built, 0, 12)), {"sha256": built.pcr10("sha256", 10)}
    )

    second = verify_measurement_list(
        parse_ascii_list(_lines_from(built, 10), start_index=10),
        {"sha256": built.pcr10("sha256")},
        first.next_state,
    )

    assert [entry.index for entry in second.verified_entries] == [10, 11]
    assert second.findings == ()


def test_progress_stalls_when_pcr10_is_frozen() -> None:
    built = ImaListBuilder()
    for number in range(30):
        built.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    frozen = {"sha256": built.pcr10("sha256", 10)}
    state = ImaReplayState()
    codes_per_round = []

    for listed_until in (12, 15, 20, 25):
        result = verify_measurement_list(
            parse_ascii_list(
                _lines_from(built, state.next_index, listed_until), start_index=state.next_index
            ),
            frozen,
            state,
        )
        codes_per_round.append(_codes(result.findings))
        state = result.next_state

    assert codes_per_round == [
        [],
        ["ima-progress-lagging"],
        ["ima-progress-stalled"],
        ["ima-progress-stalled"],
    ]
    assert state.next_index == 10
    assert state.lagging_rounds == 1


def test_progress_busy_device_never_stalls() -> None:
    built = ImaListBuilder()
    for number in range(40):
        built.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    state = ImaReplayState()

    for quoted_until, listed_until in ((8, 10), (13, 15), (19, 22), (24, 27), (35, 40)):
        result = verify_measurement_list(
            parse_ascii_list(
                _lines_from(built, state.next_index, listed_until), start_index=state.next_index
            ),
            {"sha256": built.pcr10("sha256", quoted_until)},
            state,
        )
        assert result.findings == ()
        state = result.next_state

    assert state.next_index == 35


def test_ima_buf_kernel_version_digest_is_buffer_hash() -> None:
    built = ImaListBuilder()
    built.ima_buf("kernel_version", b"6.1.0-rpi7-rpi-v8")

    entry = parse_ascii_list(built.ascii())[0]

    assert entry.buffer == b"6.1.0-rpi7-rpi-v8"
    assert entry.path == "kernel_version"
    assert entry.digest == hashlib.sha256(b"6.1.0-rpi7-rpi-v8").digest()


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IMA signing key")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2034, 1, 1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_ima_buf_keyring_key_verifies_later_ima_sig() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed_certificate(key)
    der = certificate.public_bytes(serialization.Encoding.DER)
    digest = digest_of("sha256", b"signed tool")
    raw = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    built = ImaListBuilder()
    built.ima_buf(".ima", der)
    built.ima_sig(
        "/usr/bin/signed-tool",
        digest=digest,
        signature=ima_signature_header("sha256", ima_key_id(certificate), raw),
    )

    parsed = parse_ascii_list(built.ascii())
    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})
    measured_key = x509.load_der_x509_certificate(parsed[0].buffer or b"")
    signature = parse_ima_signature(parsed[1].signature or b"")

    assert result.findings == ()
    assert parsed[0].digest == hashlib.sha256(der).digest()
    assert signature.key_id == ima_key_id(measured_key)
    verify_entry_signature(parsed[1], measured_key.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_boot_aggregate_recomputed_from_quoted_pcrs(bank: str) -> None:
    pcrs = fake_boot_pcrs()
    built = ImaListBuilder()
    built.boot_aggregate(pcrs, bank=bank)
    built.ima_ng("/init", b"init")
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")}, boot_pcrs=pcrs)

    covered = range(8) if bank == "sha1" else range(10)
    expected = hashlib.new(bank, b"".join(pcrs[bank][pcr] for pcr in covered)).digest()
    assert parsed[0].digest_algorithm == bank
    assert parsed[0].digest == expected
    assert result.findings == ()


def test_boot_aggregate_sha256_covers_pcr8_and_pcr9() -> None:
    pcrs = fake_boot_pcrs()
    built = ImaListBuilder()
    built.boot_aggregate(pcrs, bank="sha256")
    entry = parse_ascii_list(built.ascii())[0]
    changed_pcr9 = {**pcrs, "sha256": {**pcrs["sha256"], 9: b"\x09" * 32}}

    findings = check_boot_aggregate(entry, changed_pcr9)

    assert _codes(findings) == ["ima-boot-aggregate-mismatch"]


def test_boot_aggregate_sha1_ignores_pcr8_and_pcr9() -> None:
    pcrs = fake_boot_pcrs()
    built = ImaListBuilder()
    built.boot_aggregate(pcrs, bank="sha1")
    entry = parse_ascii_list(built.ascii())[0]
    changed_pcr9 = {**pcrs, "sha1": {**pcrs["sha1"], 9: b"\x09" * 20}}

    assert check_boot_aggregate(entry, changed_pcr9) == []


def test_boot_aggregate_legacy_ima_template() -> None:
    pcrs = fake_boot_pcrs()
    built = ImaListBuilder()
    built.boot_aggregate(pcrs, template="ima")

    entry = parse_ascii_list(built.ascii())[0]

    assert entry.template == "ima"
    assert check_boot_aggregate(entry, pcrs) == []


@pytest.mark.parametrize(("allow", "severity"), [(False, Severity.ERROR), (True, Severity.INFO)])
def test_boot_aggregate_zeros_only_when_allowed(allow: bool, severity: Severity) -> None:
    built = ImaListBuilder()
    built.boot_aggregate(None, bank="sha256")
    built.ima_ng("/init", b"init")
    parsed = parse_ascii_list(built.ascii())

    result = verify_measurement_list(
        parsed,
        {"sha256": built.pcr10("sha256")},
        boot_pcrs=fake_boot_pcrs(),
        allow_zero_boot_aggregate=allow,
    )

    assert _codes(result.findings) == ["ima-boot-aggregate-zero"]
    assert result.findings[0].severity == severity


def test_boot_aggregate_mismatch_and_missing_pcrs() -> None:
    pcrs = fake_boot_pcrs()
    built = ImaListBuilder()
    built.boot_aggregate(pcrs, bank="sha256")
    entry = parse_ascii_list(built.ascii())[0]

    other = check_boot_aggregate(entry, fake_boot_pcrs(b"other boot"))
    missing = check_boot_aggregate(entry, {"sha256": {pcr: pcrs["sha256"][pcr] for pcr in range(8)}})

    assert _codes(other) == ["ima-boot-aggregate-mismatch"]
    assert other[0].context["expected"] != entry.digest.hex()
    assert _codes(missing) == ["ima-boot-aggregate-pcrs-missing"]
    assert missing[0].context["missing_pcrs"] == [8, 9]


def test_boot_aggregate_must_be_first_entry() -> None:
    built = ImaListBuilder()
    built.ima_ng("/init", b"init")
    entry = parse_ascii_list(built.ascii())[0]

    assert _codes(check_boot_aggregate(entry, fake_boot_pcrs())) == ["ima-boot-aggregate-missing"]
    assert _codes(check_boot_aggregate(None, fake_boot_pcrs())) == ["ima-boot-aggregate-missing"]


def test_reboot_starts_new_session_without_false_alarm() -> None:
    before = ImaListBuilder()
    before.boot_aggregate(fake_boot_pcrs(b"boot 1"))
    for number in range(1, 50):
        before.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    old_state = verify_measurement_list(
        parse_ascii_list(before.ascii()), {"sha256": before.pcr10("sha256")}
    ).next_state
    after = ImaListBuilder()
    after.boot_aggregate(fake_boot_pcrs(b"boot 2"))
    for number in range(1, 5):
        after.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    quoted = {"sha256": after.pcr10("sha256")}

    with_old_state = verify_measurement_list(
        parse_ascii_list(after.ascii(), start_index=old_state.next_index), quoted, old_state
    )
    new_session = verify_measurement_list(
        parse_ascii_list(after.ascii()), quoted, ImaReplayState(), boot_pcrs=fake_boot_pcrs(b"boot 2")
    )

    assert _codes(with_old_state.findings) == ["ima-pcr-mismatch"]
    assert new_session.findings == ()
    assert new_session.next_state.next_index == 5


def test_half_written_line_is_not_read(tmp_path: Path) -> None:
    built = ImaListBuilder()
    for number in range(4):
        built.ima_ng(f"/usr/bin/tool{number}", b"tool %d" % number)
    data = built.ascii_bytes()
    cut = len(built.lines()[0]) + 1 + 17
    path = tmp_path / "ascii_runtime_measurements"
    path.write_bytes(data[:cut])

    with ImaListReader(path) as reader:
        first = reader.read_list()
        with path.open("ab") as appending:
            appending.write(data[cut:])
        second = reader.read_list()

    assert [entry.path for entry in first] == ["/usr/bin/tool0"]
    assert [entry.index for entry in second] == [1, 2, 3]
    assert second[0].template_data == built.entries[1].template_data


def test_newline_in_file_name_rejects_list_naming_line() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/a", b"a")
    built.ima_ng("/tmp/evil\nname", b"evil")
    built.ima_ng("/usr/bin/b", b"b")

    with pytest.raises(ImaParseError) as raised:
        parse_ascii_list(built.ascii())

    assert raised.value.code == "ima-line-malformed"
    assert raised.value.line == 3
    assert "newline" in raised.value.message


def test_newline_name_forging_a_line_fails_template_hash() -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/a", b"a")
    fake = ImaListBuilder()
    fake.ima_ng("/usr/bin/innocent", b"innocent")
    built.ima_ng(b"/tmp/x\n" + fake.lines()[0], b"evil")

    parsed = parse_ascii_list(built.ascii_bytes())
    result = verify_measurement_list(parsed, {"sha256": built.pcr10("sha256")})

    assert len(parsed) == 3
    assert is_failure(result.findings)
    assert "ima-template-hash-mismatch" in _codes(result.findings)


def test_zero_pcr10_beside_list_from_start_is_mismatch() -> None:
    built = ImaListBuilder()
    built.boot_aggregate(fake_boot_pcrs())
    built.ima_ng("/init", b"init")

    result = verify_measurement_list(parse_ascii_list(built.ascii()), {"sha256": bytes(32)})

    assert _codes(result.findings) == ["ima-pcr-mismatch"]
