"""IMA signature v2 as the runtime policy uses it: integer key ids, key loading, PolicyError."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from policies.errors import PolicyError
from policies.imasig import (
    key_id_v2,
    load_verification_key,
    parse_ima_signature,
    try_load_buffer_key,
    verify_ima_signature,
)
from tests.policies.keys import (
    certificate_der,
    ec_key,
    ecdsa_signature_of_length,
    ima_signature,
    raw_signature,
    rsa_key,
    sign_digest,
    spki_der,
)

DIGEST = hashlib.sha256(b"file content").digest()


def test_header_fields_are_parsed() -> None:
    parsed = parse_ima_signature(ima_signature(b"\x01\x02\x03", 0xDEADBEEF, "sha384"))

    assert parsed.key_id == 0xDEADBEEF
    assert parsed.parsed.key_id == b"\xde\xad\xbe\xef"
    assert parsed.parsed.hash_algorithm == "sha384"
    assert parsed.parsed.signature == b"\x01\x02\x03"


def test_portable_signature_type_is_unsupported() -> None:
    # Type 0x05 is an EVM portable signature over file metadata, not over the file digest.
    with pytest.raises(PolicyError) as caught:
        parse_ima_signature(ima_signature(b"\x01", 1, xattr_type=5))

    assert caught.value.code == "ima-signature-unsupported"
    assert "type 5" in caught.value.message


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"\x03\x02\x04", "ima-signature-malformed"),
        (ima_signature(b"\x01\x02", 1)[:-1], "ima-signature-malformed"),
        (ima_signature(b"\x01\x02", 1) + b"\x00", "ima-signature-malformed"),
        (ima_signature(b"\x01", 1, xattr_type=4), "ima-signature-unsupported"),
        (ima_signature(b"\x01", 1, version=1), "ima-signature-unsupported"),
        (struct.pack(">BBBIH", 3, 2, 1, 1, 1) + b"\x01", "ima-signature-unsupported"),
        (struct.pack(">BBBIH", 3, 2, 99, 1, 1) + b"\x01", "ima-signature-unsupported"),
    ],
)
def test_malformed_header_is_rejected(value: bytes, code: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_ima_signature(value)

    assert caught.value.code == code


def test_byte_swapped_size_is_malformed() -> None:
    good = sign_digest(ec_key(), DIGEST)
    swapped = good[:7] + good[8:9] + good[7:8] + good[9:]

    with pytest.raises(PolicyError) as caught:
        parse_ima_signature(swapped)

    assert caught.value.code == "ima-signature-malformed"
    assert "size" in caught.value.message


def test_rsa_key_id_is_sha1_of_pkcs1_key() -> None:
    key = rsa_key().public_key()
    pkcs1 = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)

    assert key_id_v2(key) == int.from_bytes(hashlib.sha1(pkcs1).digest()[-4:], "big")


def test_ec_key_id_is_sha1_of_uncompressed_point() -> None:
    key = ec_key().public_key()
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    assert key_id_v2(key) == int.from_bytes(hashlib.sha1(point).digest()[-4:], "big")
    assert key_id_v2(key) != int.from_bytes(hashlib.sha1(spki_der(key)).digest()[-4:], "big")


def test_certificate_key_id_comes_from_subject_key_identifier() -> None:
    private = ec_key()
    certificate = certificate_der(private, subject_key_id=b"\x11" * 16 + b"\xca\xfe\xba\xbe")

    assert load_verification_key(certificate).key_id == 0xCAFEBABE
    assert try_load_buffer_key(certificate).key_id == 0xCAFEBABE  # type: ignore[union-attr]


def test_certificate_without_subject_key_identifier_uses_computed_id() -> None:
    private = rsa_key()
    certificate = certificate_der(private, with_skid=False)

    assert load_verification_key(certificate).key_id == key_id_v2(private.public_key())
    buffer_key = try_load_buffer_key(certificate)
    assert buffer_key is not None
    assert buffer_key.key_id == key_id_v2(private.public_key())


def test_short_skid_uses_computed_id() -> None:
    private = ec_key()
    certificate = certificate_der(private, subject_key_id=b"\xca\xfe")

    assert load_verification_key(certificate).key_id == key_id_v2(private.public_key())


def test_explicit_key_id_wins() -> None:
    assert load_verification_key(spki_der(ec_key()), key_id=7).key_id == 7


def test_buffer_without_key_is_none() -> None:
    assert try_load_buffer_key(b"6.1.0-13-amd64") is None


def test_buffer_with_unsupported_key_is_rejected() -> None:
    der = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(PolicyError) as caught:
        try_load_buffer_key(der)

    assert caught.value.code == "ima-key-unsupported"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_rsa_signature_verifies(algorithm: str) -> None:
    private = rsa_key()
    digest = hashlib.new(algorithm, b"data").digest()
    key = load_verification_key(spki_der(private))

    verify_ima_signature(parse_ima_signature(sign_digest(private, digest, algorithm)), digest, algorithm, key)


@pytest.mark.parametrize("length", [70, 71, 72])
def test_ecdsa_signature_of_each_length_verifies(length: int) -> None:
    private = ec_key()
    key = load_verification_key(spki_der(private))
    signature = ecdsa_signature_of_length(private, DIGEST, length)

    parsed = parse_ima_signature(ima_signature(signature, key.key_id))

    assert len(parsed.parsed.signature) == length
    verify_ima_signature(parsed, DIGEST, "sha256", key)


def test_signature_over_other_digest_is_invalid() -> None:
    private = ec_key()
    key = load_verification_key(spki_der(private))
    parsed = parse_ima_signature(sign_digest(private, hashlib.sha256(b"other").digest()))

    with pytest.raises(PolicyError) as caught:
        verify_ima_signature(parsed, DIGEST, "sha256", key)

    assert caught.value.code == "ima-signature-invalid"


def test_signature_hash_must_match_digest_algorithm() -> None:
    private = rsa_key()
    key = load_verification_key(spki_der(private))
    parsed = parse_ima_signature(ima_signature(raw_signature(private, DIGEST), key.key_id, "sha256"))

    with pytest.raises(PolicyError) as caught:
        verify_ima_signature(parsed, DIGEST, "sha1", key)

    assert "sha1" in caught.value.message


def test_signature_naming_other_key_id_is_invalid() -> None:
    private = ec_key()
    key = load_verification_key(spki_der(private))
    parsed = parse_ima_signature(sign_digest(private, DIGEST, key_id=key.key_id ^ 1))

    with pytest.raises(PolicyError) as caught:
        verify_ima_signature(parsed, DIGEST, "sha256", key)

    assert caught.value.code == "ima-signature-invalid"
    assert f"key id {key.key_id ^ 1:08x}" in caught.value.message


def test_explicit_key_id_verifies() -> None:
    private = ec_key()
    key = load_verification_key(spki_der(private), key_id=0x1234ABCD)
    parsed = parse_ima_signature(sign_digest(private, DIGEST, key_id=0x1234ABCD))

    verify_ima_signature(parsed, DIGEST, "sha256", key)


def test_truncated_digest_is_invalid_not_a_crash() -> None:
    private = rsa_key()
    key = load_verification_key(spki_der(private))
    parsed = parse_ima_signature(sign_digest(private, DIGEST))

    with pytest.raises(PolicyError) as caught:
        verify_ima_signature(parsed, DIGEST[:20], "sha256", key)

    assert caught.value.code == "ima-signature-invalid"


@pytest.mark.parametrize("make_key", [ec_key, rsa_key])
def test_key_id_agrees_with_test_builder(make_key: object) -> None:
    # tests.support.ima computes the key id another way: the X.509 SKID method of RFC 5280.
    from tests.support.ima import key_id_of

    public_key = make_key().public_key()  # type: ignore[operator]

    assert key_id_v2(public_key).to_bytes(4, "big") == key_id_of(public_key)


def test_builder_signature_verifies() -> None:
    from tests.support.ima import sign_file_digest

    private = ec_key()
    key = load_verification_key(spki_der(private))

    verify_ima_signature(
        parse_ima_signature(sign_file_digest(private, "sha256", DIGEST)), DIGEST, "sha256", key
    )
