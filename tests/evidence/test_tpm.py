"""Tests for evidence.tpm: strict parsing of TPM 2.0 structures, names and AK attributes."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence import tpm as evidence_tpm
from evidence.errors import EvidenceError, ParseError, VerificationError
from evidence.tpm import (
    DEFAULT_AK_ALGORITHMS,
    TPM_GENERATED_VALUE,
    EccCurve,
    ObjectAttributes,
    PcrBank,
    PcrSelection,
    SigningAlgorithm,
    StructureTag,
    TpmAlg,
    ak_qualified_name,
    check_ak_attributes,
    format_keylime_quote,
    marshal_pcr_file,
    marshal_tpm2b_public,
    parse_keylime_quote,
    parse_pcr_file,
    parse_tpm2b_public,
    parse_tpml_pcr_selection,
    parse_tpms_attest,
    parse_tpmt_public,
    parse_tpmt_signature,
)
from tests.support.swtpm import SwtpmProcess, TpmDevice, require_tpm2_tools

AK_ATTRIBUTES = (
    ObjectAttributes.RESTRICTED | ObjectAttributes.SIGN_ENCRYPT | ObjectAttributes.FIXED_TPM
    | ObjectAttributes.FIXED_PARENT | ObjectAttributes.SENSITIVE_DATA_ORIGIN
    | ObjectAttributes.USER_WITH_AUTH
)


# --- structures built in the test, so property tests need no TPM -------------------------


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def rsa_tpmt_public(
    key: rsa.RSAPublicKey | None = None,
    attributes: int = AK_ATTRIBUTES,
    scheme: TpmAlg = TpmAlg.RSASSA,
    exponent: int = 0,
) -> bytes:
    """TPMT_PUBLIC of an RSA-2048 key with a NULL symmetric definition."""
    if key is None:
        key = rsa.generate_private_key(65537, 2048).public_key()
    modulus = key.public_numbers().n.to_bytes(256, "big")
    scheme_bytes = struct.pack(">H", TpmAlg.NULL) if scheme == TpmAlg.NULL else struct.pack(
        ">HH", scheme, TpmAlg.SHA256
    )
    return (
        struct.pack(">HHI", TpmAlg.RSA, TpmAlg.SHA256, attributes)
        + tpm2b(b"")
        + struct.pack(">H", TpmAlg.NULL)
        + scheme_bytes
        + struct.pack(">HI", 2048, exponent)
        + tpm2b(modulus)
    )


def ecc_tpmt_public(curve: EccCurve = EccCurve.NIST_P256, attributes: int = AK_ATTRIBUTES) -> bytes:
    crypto_curve, size = {
        EccCurve.NIST_P256: (ec.SECP256R1(), 32),
        EccCurve.NIST_P384: (ec.SECP384R1(), 48),
        EccCurve.NIST_P521: (ec.SECP521R1(), 66),
    }[curve]
    numbers = ec.generate_private_key(crypto_curve).public_key().public_numbers()
    return (
        struct.pack(">HHI", TpmAlg.ECC, TpmAlg.SHA256, attributes)
        + tpm2b(b"")
        + struct.pack(">H", TpmAlg.NULL)
        + struct.pack(">HH", TpmAlg.ECDSA, TpmAlg.SHA256)
        + struct.pack(">HH", curve, TpmAlg.NULL)
        + tpm2b(numbers.x.to_bytes(size, "big"))
        + tpm2b(numbers.y.to_bytes(size, "big"))
    )


def with_attributes(tpmt_public: bytes, attributes: int) -> bytes:
    """Replace objectAttributes (offset 4) of a TPMT_PUBLIC."""
    return tpmt_public[:4] + struct.pack(">I", attributes) + tpmt_public[8:]


RSA_AK = rsa_tpmt_public()
ECC_AK = ecc_tpmt_public()


@pytest.fixture(scope="module")
def keylime_quote_text(fixtures_dir: Path) -> str:
    return (fixtures_dir / "quote" / "rust-keylime-test-quote.txt").read_text()


# --- swtpm -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmProcess]:
    with SwtpmProcess(tmp_path_factory.mktemp("tpm")) as process:
        yield process


@pytest.fixture(scope="module")
def device(tpm: SwtpmProcess) -> Iterator[TpmDevice]:
    with TpmDevice(tpm) as dev:
        yield dev


@pytest.mark.swtpm
@pytest.mark.parametrize("ek_template", ["EK-RSA2048", "EK-ECC256"])
@pytest.mark.parametrize(
    "ak_kind", ["rsassa-sha256", "rsapss-sha256", "ecdsa-sha256", "ecdsa-sha384", "ecdsa-sha512"]
)
def test_public_area_matches_tpm_names(device: TpmDevice, ek_template: str, ak_kind: str) -> None:
    ek = device.create_ek(ek_template)
    try:
        ak = device.create_ak(ek, ak_kind)
        with device.loaded(ek, ak) as handle:
            public, name, qualified_name = device.read_public(handle)
    finally:
        device.esapi.flush_context(ek.handle)

    ek_public = parse_tpm2b_public(ek.public_bytes)
    ak_public = parse_tpm2b_public(public)

    assert ak_public.name == name
    assert ak_qualified_name(ek_public, ak_public) == qualified_name
    assert ak_public.to_tpm2b() == public
    assert parse_tpmt_public(public[2:]) == ak_public
    expected_pem = ak.public.to_pem()
    assert ak_public.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == expected_pem
    check_ak_attributes(ak_public)


@pytest.mark.swtpm
def test_ek_public_fields(device: TpmDevice) -> None:
    ek = device.create_ek("EK-RSA2048")
    device.esapi.flush_context(ek.handle)

    ek_public = parse_tpm2b_public(ek.public_bytes)

    assert ek_public.type == TpmAlg.RSA
    assert ek_public.key_bits == 2048
    assert ek_public.symmetric == TpmAlg.AES
    assert ek_public.symmetric_key_bits == 128
    assert ek_public.symmetric_mode == TpmAlg.CFB
    assert ek_public.scheme == TpmAlg.NULL
    assert ek_public.object_attributes & ObjectAttributes.DECRYPT
    assert len(ek_public.auth_policy) == 32
    assert isinstance(ek_public.public_key, rsa.RSAPublicKey)
    assert ek_public.public_key.public_numbers().e == 65537


@pytest.mark.swtpm
def test_ek_fails_ak_attribute_check(device: TpmDevice) -> None:
    ek = device.create_ek("EK-ECC256")
    device.esapi.flush_context(ek.handle)

    with pytest.raises(VerificationError) as caught:
        check_ak_attributes(parse_tpm2b_public(ek.public_bytes))

    assert caught.value.code == "ak-attributes-invalid"
    assert "sign" in caught.value.message


@pytest.mark.swtpm
def test_tpm2_tools_ak_name_matches(tmp_path: Path) -> None:
    require_tpm2_tools()
    # A separate swtpm: tpm2_flushcontext -t would also flush the module device's objects.
    with SwtpmProcess(tmp_path / "tools-tpm") as tools_tpm:
        tools_tpm.run_tool(
            "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=tmp_path
        )
        tools_tpm.run_tool(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
            "-s", "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv", cwd=tmp_path,
        )

    ak_public = parse_tpm2b_public((tmp_path / "ak.pub").read_bytes())

    assert ak_public.name == (tmp_path / "ak.name").read_bytes()
    check_ak_attributes(ak_public)


# --- TPMT_PUBLIC -------------------------------------------------------------------------


def test_rsa_exponent_zero_means_65537() -> None:
    public = parse_tpmt_public(rsa_tpmt_public(exponent=0))

    assert isinstance(public.public_key, rsa.RSAPublicKey)
    assert public.public_key.public_numbers().e == 65537


def test_rsa_explicit_exponent_kept() -> None:
    key = rsa.generate_private_key(3, 2048).public_key()

    public = parse_tpmt_public(rsa_tpmt_public(key, exponent=3))

    assert isinstance(public.public_key, rsa.RSAPublicKey)
    assert public.public_key.public_numbers().e == 3


@pytest.mark.parametrize("curve", list(EccCurve))
def test_ecc_curves_parse(curve: EccCurve) -> None:
    public = parse_tpmt_public(ecc_tpmt_public(curve))

    assert public.curve == curve
    assert public.signing_algorithm == SigningAlgorithm(TpmAlg.ECC, TpmAlg.ECDSA, TpmAlg.SHA256)


def test_tpm2b_public_round_trip() -> None:
    public = parse_tpm2b_public(marshal_tpm2b_public(RSA_AK))

    assert public.tpmt_public == RSA_AK
    assert public.name[:2] == b"\x00\x0b"


def test_qualified_name_folds_in_parent() -> None:
    public = parse_tpmt_public(RSA_AK)

    assert public.qualified_name(b"\x40\x00\x00\x0b") != public.name
    assert public.qualified_name(b"\x40\x00\x00\x0b") != public.qualified_name(b"\x40\x00\x00\x01")


@pytest.mark.parametrize("cut", [0, 1, 5, 9, 20, len(RSA_AK) - 1])
def test_tpmt_public_rejects_truncated(cut: int) -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpmt_public(RSA_AK[:cut])

    assert caught.value.code == "structure-truncated"
    assert "TPMT_PUBLIC" in caught.value.message


def test_tpmt_public_rejects_trailing_bytes() -> None:
    with pytest.raises(ParseError, match="1 trailing bytes") as caught:
        parse_tpmt_public(RSA_AK + b"\x00")

    assert caught.value.code == "trailing-bytes"


def test_tpm2b_public_rejects_trailing_bytes() -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpm2b_public(marshal_tpm2b_public(RSA_AK) + b"\x00")

    assert caught.value.code == "trailing-bytes"


def test_tpmt_public_rejects_unknown_type() -> None:
    with pytest.raises(ParseError, match="0x0099") as caught:
        parse_tpmt_public(b"\x00\x99" + RSA_AK[2:])

    assert caught.value.code == "algorithm-unknown"
    assert caught.value.field == "type"


def test_tpmt_public_rejects_keyedhash_type() -> None:
    with pytest.raises(ParseError, match="keyedhash") as caught:
        parse_tpmt_public(struct.pack(">H", TpmAlg.KEYEDHASH) + RSA_AK[2:])

    assert caught.value.code == "algorithm-unsupported"


def test_tpmt_public_rejects_unknown_name_alg() -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpmt_public(RSA_AK[:2] + b"\x00\x12" + RSA_AK[4:])

    assert caught.value.code == "algorithm-unsupported"
    assert caught.value.field == "nameAlg"


def test_tpmt_public_rejects_reserved_attribute_bits() -> None:
    with pytest.raises(ParseError, match="reserved bits 0x00000001") as caught:
        parse_tpmt_public(with_attributes(RSA_AK, AK_ATTRIBUTES | 0x1))

    assert caught.value.code == "reserved-bits-set"


def test_tpmt_public_rejects_unknown_curve() -> None:
    data = ecc_tpmt_public()
    curve_offset = 2 + 2 + 4 + 2 + 2 + 4
    bad = data[:curve_offset] + b"\x00\x20" + data[curve_offset + 2 :]

    with pytest.raises(ParseError, match="curve 0x0020") as caught:
        parse_tpmt_public(bad)

    assert caught.value.code == "curve-unsupported"


def test_tpmt_public_rejects_point_off_curve() -> None:
    data = ecc_tpmt_public()
    bad = data[:-1] + bytes([data[-1] ^ 1])

    with pytest.raises(ParseError) as caught:
        parse_tpmt_public(bad)

    assert caught.value.code == "public-key-invalid"


def test_tpmt_public_rejects_modulus_size_mismatch() -> None:
    data = rsa_tpmt_public()
    bits_offset = 2 + 2 + 4 + 2 + 2 + 4
    bad = data[:bits_offset] + struct.pack(">H", 3072) + data[bits_offset + 2 :]

    with pytest.raises(ParseError, match="keyBits 3072") as caught:
        parse_tpmt_public(bad)

    assert caught.value.code == "size-invalid"


# --- AK attributes -----------------------------------------------------------------------


def test_ak_attributes_accept_restricted_signing_key() -> None:
    check_ak_attributes(parse_tpmt_public(RSA_AK))
    check_ak_attributes(parse_tpmt_public(ECC_AK))


@pytest.mark.parametrize(
    ("attribute", "label"),
    [
        (ObjectAttributes.RESTRICTED, "restricted"),
        (ObjectAttributes.SIGN_ENCRYPT, "sign"),
        (ObjectAttributes.FIXED_TPM, "fixedTPM"),
        (ObjectAttributes.FIXED_PARENT, "fixedParent"),
        (ObjectAttributes.SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    ],
)
def test_ak_attributes_reject_missing(attribute: ObjectAttributes, label: str) -> None:
    public = parse_tpmt_public(with_attributes(RSA_AK, AK_ATTRIBUTES & ~attribute))

    with pytest.raises(VerificationError, match=f"lack {label};") as caught:
        check_ak_attributes(public)

    assert caught.value.code == "ak-attributes-invalid"
    assert caught.value.field == "objectAttributes"


def test_ak_attributes_reject_decrypt() -> None:
    public = parse_tpmt_public(with_attributes(RSA_AK, AK_ATTRIBUTES | ObjectAttributes.DECRYPT))

    with pytest.raises(VerificationError, match="decrypt") as caught:
        check_ak_attributes(public)

    assert caught.value.code == "ak-attribute-decrypt-set"


def test_ak_attributes_reject_algorithm() -> None:
    public = parse_tpmt_public(RSA_AK)
    only_ecdsa = {SigningAlgorithm(TpmAlg.ECC, TpmAlg.ECDSA, TpmAlg.SHA256)}

    with pytest.raises(VerificationError, match="rsa:rsassa-sha256") as caught:
        check_ak_attributes(public, only_ecdsa)

    assert caught.value.code == "ak-algorithm-not-allowed"


def test_ak_attributes_reject_null_scheme() -> None:
    public = parse_tpmt_public(rsa_tpmt_public(scheme=TpmAlg.NULL))

    with pytest.raises(VerificationError) as caught:
        check_ak_attributes(public, DEFAULT_AK_ALGORITHMS)

    assert caught.value.code == "ak-algorithm-not-allowed"


# --- TPMS_ATTEST, TPMT_SIGNATURE, TPML_PCR_SELECTION -------------------------------------


def make_attest(
    *,
    attest_type: int = StructureTag.ATTEST_QUOTE,
    safe: int = 1,
    selection: bytes | None = None,
) -> bytes:
    if selection is None:
        selection = PcrSelection.from_text("sha256:0,1,10").marshal()
    return (
        struct.pack(">IH", TPM_GENERATED_VALUE, attest_type)
        + tpm2b(b"\x00\x0b" + bytes(32))
        + tpm2b(b"nonce")
        + struct.pack(">QIIBQ", 1000, 2, 0, safe, 0x20191023)
        + selection
        + tpm2b(bytes(32))
    )


def test_attest_fields() -> None:
    attest = parse_tpms_attest(make_attest())

    assert attest.magic == TPM_GENERATED_VALUE
    assert attest.type == StructureTag.ATTEST_QUOTE
    assert attest.extra_data == b"nonce"
    assert attest.clock_info.clock == 1000
    assert attest.clock_info.reset_count == 2
    assert attest.clock_info.safe is True
    assert attest.firmware_version == 0x20191023
    assert str(attest.pcr_selection) == "sha256:0,1,10"


def test_attest_rejects_other_type() -> None:
    with pytest.raises(ParseError, match="0x8017") as caught:
        parse_tpms_attest(make_attest(attest_type=StructureTag.ATTEST_CERTIFY))

    assert caught.value.code == "attest-type-unsupported"


def test_attest_rejects_safe_not_yes_no() -> None:
    with pytest.raises(ParseError, match="got 2") as caught:
        parse_tpms_attest(make_attest(safe=2))

    assert caught.value.code == "value-invalid"


def test_attest_rejects_every_truncation() -> None:
    data = make_attest()
    for cut in range(len(data)):
        with pytest.raises(ParseError) as caught:
            parse_tpms_attest(data[:cut])
        assert caught.value.code == "structure-truncated", cut


def test_attest_rejects_trailing_bytes() -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpms_attest(make_attest() + b"\x00\x00")

    assert caught.value.code == "trailing-bytes"


def test_attest_rejects_oversized_extra_data() -> None:
    data = make_attest()
    signer_end = 6 + 2 + 34
    bad = data[:signer_end] + b"\x01\x00" + data[signer_end + 2 :]

    with pytest.raises(ParseError, match="extraData: size 256 exceeds the maximum 66") as caught:
        parse_tpms_attest(bad)

    assert caught.value.code == "size-invalid"


def test_attest_rejects_unknown_pcr_bank() -> None:
    selection = struct.pack(">IHB", 1, 0x0099, 3) + b"\x01\x00\x00"

    with pytest.raises(ParseError) as caught:
        parse_tpms_attest(make_attest(selection=selection))

    assert caught.value.code == "algorithm-unknown"


def test_signature_rsa_and_ecdsa() -> None:
    rsa_signature = parse_tpmt_signature(
        struct.pack(">HH", TpmAlg.RSAPSS, TpmAlg.SHA384) + tpm2b(b"s" * 256)
    )
    ecdsa_signature = parse_tpmt_signature(
        struct.pack(">HH", TpmAlg.ECDSA, TpmAlg.SHA256) + tpm2b(b"\x01" * 32) + tpm2b(b"\x02" * 32)
    )

    assert (rsa_signature.sig_alg, rsa_signature.hash_alg) == (TpmAlg.RSAPSS, TpmAlg.SHA384)
    assert rsa_signature.signature == b"s" * 256
    assert ecdsa_signature.sig_alg == TpmAlg.ECDSA
    assert ecdsa_signature.signature.startswith(b"\x30")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">HH", TpmAlg.HMAC, TpmAlg.SHA256) + bytes(32), "algorithm-unsupported"),
        (struct.pack(">HH", 0x7777, TpmAlg.SHA256), "algorithm-unknown"),
        (struct.pack(">HH", TpmAlg.RSASSA, TpmAlg.SM3_256) + tpm2b(b"s"), "algorithm-unsupported"),
        (struct.pack(">HH", TpmAlg.RSASSA, TpmAlg.SHA256) + b"\x01\x00", "structure-truncated"),
        (struct.pack(">HH", TpmAlg.RSASSA, TpmAlg.SHA256) + tpm2b(b"s") + b"x", "trailing-bytes"),
        (struct.pack(">HH", TpmAlg.ECDSA, TpmAlg.SHA256) + tpm2b(b"r"), "structure-truncated"),
        (struct.pack(">H", TpmAlg.RSASSA), "structure-truncated"),
    ],
)
def test_signature_rejects(data: bytes, code: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpmt_signature(data)

    assert caught.value.code == code
    assert "TPMT_SIGNATURE" in caught.value.message


def test_pcr_selection_round_trip() -> None:
    selection = PcrSelection.from_text("sha1:0,1,2,3+sha256:10,16,23")

    parsed = parse_tpml_pcr_selection(selection.marshal())

    assert parsed == selection
    assert parsed.pcr_count == 7
    assert str(parsed) == "sha1:0,1,2,3+sha256:10,16,23"


def test_pcr_selection_rejects_duplicate_bank() -> None:
    data = PcrSelection(
        (PcrBank(TpmAlg.SHA256, (0,)), PcrBank(TpmAlg.SHA256, (1,)))
    ).marshal()

    with pytest.raises(ParseError, match="more than once") as caught:
        parse_tpml_pcr_selection(data)

    assert caught.value.code == "pcr-selection-invalid"


def test_pcr_selection_rejects_large_size_of_select() -> None:
    with pytest.raises(ParseError) as caught:
        parse_tpml_pcr_selection(struct.pack(">IHB", 1, TpmAlg.SHA256, 5) + bytes(5))

    assert caught.value.code == "size-invalid"


@pytest.mark.parametrize("text", ["md5:0", "sha256", "sha256:a", "sha256:32"])
def test_pcr_selection_text_rejects(text: str) -> None:
    with pytest.raises(ParseError) as caught:
        PcrSelection.from_text(text)

    assert caught.value.code == "pcr-selection-invalid"


# --- PCR file ----------------------------------------------------------------------------


def sample_values(selection: PcrSelection) -> dict[TpmAlg, dict[int, bytes]]:
    sizes = {TpmAlg.SHA1: 20, TpmAlg.SHA256: 32, TpmAlg.SHA384: 48, TpmAlg.SHA512: 64}
    return {
        bank.hash_alg: {index: bytes([index]) * sizes[bank.hash_alg] for index in bank.pcrs}
        for bank in selection.banks
    }


@pytest.mark.parametrize(
    "text", ["sha256:10", "sha1:0,1,2,3,4,5,6,7,8,9+sha256:0,1,2,3,4,5,6,7,10,16", "sha512:23"]
)
def test_pcr_file_round_trip(text: str) -> None:
    selection = PcrSelection.from_text(text)
    values = sample_values(selection)

    parsed = parse_pcr_file(marshal_pcr_file(selection, values))

    assert parsed.selection.as_sets() == selection.as_sets()
    assert parsed.values == values


def test_pcr_file_rejects_truncated_and_trailing() -> None:
    selection = PcrSelection.from_text("sha256:0,1")
    data = marshal_pcr_file(selection, sample_values(selection))

    with pytest.raises(ParseError) as truncated:
        parse_pcr_file(data[:-1])
    with pytest.raises(ParseError) as trailing:
        parse_pcr_file(data + b"\x00")
    with pytest.raises(ParseError) as header_only:
        parse_pcr_file(data[:100])

    assert truncated.value.code == "structure-truncated"
    assert trailing.value.code == "trailing-bytes"
    assert header_only.value.code == "structure-truncated"


def test_pcr_file_rejects_value_count_mismatch() -> None:
    selection = PcrSelection.from_text("sha256:0,1")
    data = bytearray(marshal_pcr_file(selection, sample_values(selection)))
    struct.pack_into("<I", data, 136, 1)

    with pytest.raises(ParseError, match="1 PCR values for a selection of 2") as caught:
        parse_pcr_file(bytes(data))

    assert caught.value.code == "pcr-file-invalid"


def test_pcr_file_rejects_wrong_digest_size() -> None:
    selection = PcrSelection.from_text("sha256:0")
    data = bytearray(marshal_pcr_file(selection, sample_values(selection)))
    struct.pack_into("<H", data, 140, 20)

    with pytest.raises(ParseError, match="has 20 bytes, expected 32") as caught:
        parse_pcr_file(bytes(data))

    assert caught.value.code == "pcr-file-invalid"


def test_pcr_file_rejects_unknown_bank() -> None:
    selection = PcrSelection.from_text("sha256:0")
    data = bytearray(marshal_pcr_file(selection, sample_values(selection)))
    struct.pack_into("<H", data, 4, 0x0012)

    with pytest.raises(ParseError) as caught:
        parse_pcr_file(bytes(data))

    assert caught.value.code == "hash-algorithm-unsupported"


# --- Keylime quote string ----------------------------------------------------------------


def test_keylime_fixture_parses(keylime_quote_text: str) -> None:
    quote = parse_keylime_quote(keylime_quote_text)

    assert quote.attest.magic == TPM_GENERATED_VALUE
    assert quote.attest.extra_data == b"TEST"
    assert str(quote.attest.pcr_selection) == "sha1:16"
    assert quote.signature.sig_alg == TpmAlg.RSASSA
    assert quote.signature.hash_alg == TpmAlg.SHA1
    assert str(quote.pcr_file.selection) == "sha1:16"
    assert set(quote.pcr_file.values[TpmAlg.SHA1]) == {16}


def test_keylime_quote_format_round_trip(keylime_quote_text: str) -> None:
    quote = parse_keylime_quote(keylime_quote_text)

    text = format_keylime_quote(quote.attest_bytes, quote.signature_bytes, quote.pcr_file_bytes)

    assert text == keylime_quote_text.strip()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda text: "x" + text[1:], "keylime-quote-invalid"),
        (lambda text: text.rsplit(":", 1)[0], "keylime-quote-invalid"),
        (lambda text: text + ":AAAA", "keylime-quote-invalid"),
        (lambda text: text.replace(":", ":!", 1), "base64-invalid"),
        (
            lambda text: "r" + base64.b64encode(b"x").decode() + text[text.index(":") :],
            "structure-truncated",
        ),
    ],
)
def test_keylime_quote_rejects(
    keylime_quote_text: str, mutate: Callable[[str], str], code: str
) -> None:
    with pytest.raises(ParseError) as caught:
        parse_keylime_quote(mutate(keylime_quote_text.strip()))

    assert caught.value.code == code


# --- property tests: parsers raise only EvidenceError ------------------------------------

PARSERS: dict[str, Callable[[bytes], Any]] = {
    "tpm2b_public": parse_tpm2b_public,
    "tpmt_public": parse_tpmt_public,
    "tpms_attest": parse_tpms_attest,
    "tpmt_signature": parse_tpmt_signature,
    "tpml_pcr_selection": parse_tpml_pcr_selection,
    "pcr_file": parse_pcr_file,
}


def _valid_samples() -> dict[str, list[bytes]]:
    selection = PcrSelection.from_text("sha1:16+sha256:0,1,2,3,4,5,6,7,10")
    return {
        "tpm2b_public": [marshal_tpm2b_public(RSA_AK), marshal_tpm2b_public(ECC_AK)],
        "tpmt_public": [RSA_AK, ECC_AK, ecc_tpmt_public(EccCurve.NIST_P521)],
        "tpms_attest": [make_attest()],
        "tpmt_signature": [
            struct.pack(">HH", TpmAlg.RSASSA, TpmAlg.SHA256) + tpm2b(b"s" * 256),
            struct.pack(">HH", TpmAlg.ECDSA, TpmAlg.SHA256)
            + tpm2b(b"\x01" * 32)
            + tpm2b(b"\x02" * 32),
        ],
        "tpml_pcr_selection": [selection.marshal()],
        "pcr_file": [marshal_pcr_file(selection, sample_values(selection))],
    }


VALID_SAMPLES = _valid_samples()


def _call_expecting_only_evidence_errors(parser: Callable[[bytes], Any], data: bytes) -> None:
    try:
        parser(data)
    except EvidenceError as error:
        assert error.code
        assert error.message


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=800))
def test_parsers_reject_random_bytes(parser_name: str, data: bytes) -> None:
    _call_expecting_only_evidence_errors(PARSERS[parser_name], data)


@st.composite
def mutated(draw: st.DrawFn, parser_name: str) -> bytes:
    sample = bytearray(draw(st.sampled_from(VALID_SAMPLES[parser_name])))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        position = draw(st.integers(0, max(len(sample) - 1, 0)))
        if kind == "flip" and sample:
            sample[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and sample:
            sample[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif kind == "cut":
            del sample[position:]
        else:
            sample[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(sample)


@pytest.mark.parametrize("parser_name", sorted(PARSERS))
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_parsers_reject_mutated_input(
    parser_name: str, data: st.DataObject
) -> None:
    _call_expecting_only_evidence_errors(PARSERS[parser_name], data.draw(mutated(parser_name)))


@settings(max_examples=300)
@given(text=st.text(max_size=300))
def test_keylime_quote_rejects_random_text(text: str) -> None:
    try:
        parse_keylime_quote(text)
    except EvidenceError as error:
        assert error.code


@settings(max_examples=300)
@given(text=st.text(max_size=60))
def test_pcr_selection_text_rejects_random(text: str) -> None:
    try:
        PcrSelection.from_text(text)
    except EvidenceError as error:
        assert error.code


# --- fast paths agree with the field-by-field parsers ------------------------------------
#
# parse_tpms_attest, parse_tpmt_signature and parse_pcr_file first try a fast path for the
# usual shape. Each fast path must return None for anything else, and otherwise exactly what
# the field parser returns, so that malformed input gets the same ParseError either way.


def parse_outcome(parser: Callable[[bytes], Any], data: bytes) -> Any:
    """Return the parsed value's repr (which shows enum members), or the ParseError's fields."""
    try:
        return repr(parser(data))
    except ParseError as error:
        return (error.code, error.message, error.field)


ATTEST_FIELDS = ["type", "qualifiedSigner", "extraData", "safe", "count", "hash", "sizeofSelect",
                 "pcrDigest"]


@st.composite
def quote_attests(draw: st.DrawFn) -> bytes:
    """A quote TPMS_ATTEST with random values, usually with one field just out of range."""
    broken = draw(st.sampled_from([None, None, *ATTEST_FIELDS]))
    banks = draw(st.lists(
        st.sampled_from([TpmAlg.SHA1, TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512]),
        min_size=1, max_size=draw(st.sampled_from([1, 1, 3])), unique=True,
    ))
    if broken == "hash":
        banks[-1] = draw(st.sampled_from([TpmAlg.SM3_256, 0x9999]))

    # sizeofSelect 5 exceeds the maximum, so only inputs with a broken field may draw it.
    min_select = 5 if broken == "sizeofSelect" else 0
    max_select = 4 if broken is None else 5
    sizes = [draw(st.integers(min_select, max_select)) for _ in banks]
    selection = b"".join(
        struct.pack(">HB", bank, size) + draw(st.binary(min_size=size, max_size=size))
        for bank, size in zip(banks, sizes, strict=True)
    )

    def sized(name: str, maximum: int) -> bytes:
        if broken == name:
            return tpm2b(draw(st.binary(min_size=maximum + 1, max_size=maximum + 2)))
        return tpm2b(draw(st.binary(max_size=maximum)))

    attest_type = 0x8017 if broken == "type" else StructureTag.ATTEST_QUOTE
    if broken == "safe":
        safe = draw(st.sampled_from([2, 255]))
    else:
        safe = draw(st.integers(0, 1))
    count = len(banks)
    if broken == "count":
        count += draw(st.sampled_from([-1, 1, 16]))

    return (
        struct.pack(">I", draw(st.sampled_from([TPM_GENERATED_VALUE, 0])))
        + struct.pack(">H", attest_type)
        + sized("qualifiedSigner", 66)
        + sized("extraData", 66)
        + struct.pack(
            ">QIIBQ",
            draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 2**32 - 1)), safe, draw(st.integers(0, 2**64 - 1)),
        )
        + struct.pack(">I", count)
        + selection
        + sized("pcrDigest", 64)
    )


@st.composite
def rsa_signatures(draw: st.DrawFn) -> bytes:
    """A TPMT_SIGNATURE in the RSA layout, with schemes, hashes and sizes at and past the limits."""
    sig_alg = draw(st.sampled_from([TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.ECDSA]))
    hash_alg = draw(st.sampled_from([TpmAlg.SHA1, TpmAlg.SHA256, TpmAlg.SHA512, TpmAlg.SM3_256]))
    size = draw(st.sampled_from([0, 1, 256, 512, 513]))
    return struct.pack(">HHH", sig_alg, hash_alg, size) + bytes(size)


def mutate(draw: st.DrawFn, sample: bytes) -> bytes:
    """Apply up to four random edits (the same kinds as ``mutated``) to ``sample``, often none."""
    data = bytearray(sample)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x03, 0x05, 0x42, 0x80, 0xFF]))
        elif kind == "cut":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=1500)
@given(data=st.data())
def test_attest_fast_path_matches_field_parser(data: st.DataObject) -> None:
    attest = mutate(data.draw, data.draw(st.one_of(quote_attests(), st.binary(max_size=200))))
    expected = parse_outcome(evidence_tpm._parse_tpms_attest_fields, attest)

    fast = evidence_tpm._parse_single_bank_quote(attest)

    if fast is not None:
        assert repr(fast) == expected
    assert parse_outcome(parse_tpms_attest, attest) == expected


def test_attest_fast_path_takes_one_bank_quotes() -> None:
    one_bank = make_attest()
    two_banks = make_attest(selection=PcrSelection.from_text("sha1:10+sha256:0").marshal())

    assert evidence_tpm._parse_single_bank_quote(one_bank) == evidence_tpm._parse_tpms_attest_fields(one_bank)
    assert evidence_tpm._parse_single_bank_quote(two_banks) is None
    assert parse_tpms_attest(two_banks).pcr_selection.pcr_count == 2


@settings(max_examples=1000)
@given(data=st.data())
def test_signature_fast_path_matches_field_parser(data: st.DataObject) -> None:
    signature = mutate(data.draw, data.draw(st.one_of(rsa_signatures(), st.binary(max_size=40))))
    expected = parse_outcome(evidence_tpm._parse_tpmt_signature_fields, signature)

    fast = evidence_tpm._parse_rsa_signature(signature)

    if fast is not None:
        assert repr(fast) == expected
    assert parse_outcome(parse_tpmt_signature, signature) == expected


def write_pcr_file(
    selection: PcrSelection, values: dict[TpmAlg, dict[int, bytes]], list_sizes: list[int]
) -> bytes:
    """Write a PCR file whose digest lists contain ``list_sizes`` values each (at most 8)."""
    header = marshal_pcr_file(selection, values)[: evidence_tpm._FILE_SELECTION.size]
    ordered = [values[bank.hash_alg][index] for bank in selection.banks for index in bank.pcrs]
    parts = [header, struct.pack("<I", len(list_sizes))]
    for size in list_sizes:
        chunk, ordered = ordered[:size], ordered[size:]
        entries: list[Any] = [len(chunk)]
        for digest in chunk + [b""] * (8 - len(chunk)):
            entries += [len(digest), digest]
        parts.append(struct.pack("<I" + "H64s" * 8, *entries))
    return b"".join(parts)


@st.composite
def pcr_files(draw: st.DrawFn) -> bytes:
    """A PCR file over one to three banks, in the packed layout or split another way."""
    banks = draw(st.lists(
        st.sampled_from(["sha1", "sha256", "sha384", "sha512"]), min_size=1, max_size=3, unique=True,
    ))
    text = "+".join(
        f"{bank}:{','.join(map(str, draw(st.lists(st.integers(0, 23), max_size=12, unique=True))))}"
        for bank in banks
    )
    selection = PcrSelection.from_text(text)
    values = sample_values(selection)
    if draw(st.booleans()):
        return marshal_pcr_file(selection, values)
    list_sizes: list[int] = []
    remaining = selection.pcr_count
    while remaining:
        list_sizes.append(draw(st.integers(1, min(8, remaining))))
        remaining -= list_sizes[-1]
    return write_pcr_file(selection, values, list_sizes)


@settings(max_examples=1000)
@given(data=st.data())
def test_pcr_file_fast_path_matches_field_reader(data: st.DataObject) -> None:
    pcr_file = mutate(data.draw, data.draw(pcr_files()))
    with mock.patch.object(evidence_tpm, "_read_packed_values", return_value=None):
        expected = parse_outcome(parse_pcr_file, pcr_file)

    assert parse_outcome(parse_pcr_file, pcr_file) == expected
    try:
        file_selection = evidence_tpm._read_file_selection(pcr_file[: evidence_tpm._FILE_SELECTION.size])
    except (ParseError, struct.error):
        return
    fast = evidence_tpm._read_packed_values(pcr_file, file_selection)
    if fast is not None:
        assert fast == evidence_tpm._read_values(pcr_file, file_selection)


def test_pcr_file_fast_path_takes_packed_layout() -> None:
    selection = PcrSelection.from_text("sha1:16+sha256:0,1,2,3,4,5,6,7,10")
    values = sample_values(selection)
    packed = marshal_pcr_file(selection, values)
    split = write_pcr_file(selection, values, [5, 5])
    file_selection = evidence_tpm._read_file_selection(packed[: evidence_tpm._FILE_SELECTION.size])

    assert evidence_tpm._read_packed_values(packed, file_selection) == values
    assert evidence_tpm._read_packed_values(split, file_selection) is None
    assert parse_pcr_file(split).values == values
