"""IMA file signatures carried by ima-sig entries."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from evidence.errors import ParseError, VerificationError
from evidence.ima import (
    ImaSignature,
    PublicKey,
    ima_key_id,
    parse_ascii_list,
    parse_ima_signature,
    verify_entry_signature,
    verify_ima_signature,
)
from tests.support.ima import (
    ImaListBuilder,
    digest_of,
    ima_signature_header,
    key_id_of,
    sign_file_digest,
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_rsa_signature_verifies(rsa_key: rsa.RSAPrivateKey, algorithm: str) -> None:
    digest = digest_of(algorithm, b"rsa signed")
    built = ImaListBuilder()
    built.ima_sig(
        "/usr/bin/rsa",
        digest=digest,
        algorithm=algorithm,
        signature=sign_file_digest(rsa_key, algorithm, digest),
    )
    entry = parse_ascii_list(built.ascii())[0]

    signature = parse_ima_signature(entry.signature or b"")
    verify_entry_signature(entry, rsa_key.public_key())

    assert signature.hash_algorithm == algorithm
    assert signature.key_id == key_id_of(rsa_key.public_key())
    assert len(signature.signature) == 256


def test_rsa_signature_over_other_digest_fails(rsa_key: rsa.RSAPrivateKey) -> None:
    signature = parse_ima_signature(sign_file_digest(rsa_key, "sha256", digest_of("sha256", b"one")))

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, digest_of("sha256", b"two"), "sha256", rsa_key.public_key())

    assert raised.value.code == "ima-signature-invalid"


def test_signature_algorithm_must_match_entry_digest() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signature = parse_ima_signature(sign_file_digest(key, "sha256", digest_of("sha256", b"x")))

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, digest_of("sha512", b"x"), "sha512", key.public_key())

    assert raised.value.code == "ima-signature-algorithm-mismatch"


def test_signature_algorithm_without_support_is_reported() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signature = ImaSignature("md5", b"\0" * 4, b"\x30\x00")

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, bytes(16), "md5", key.public_key())

    assert raised.value.code == "ima-signature-algorithm-unsupported"


def test_signature_key_of_other_type_is_rejected() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signature = ImaSignature("sha256", b"\0" * 4, b"\x30\x00")

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, bytes(32), "sha256", key.public_key())  # type: ignore[arg-type]

    assert raised.value.code == "ima-signature-key-unsupported"


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (b"\x03\x02\x04", "ima-signature-malformed", "at least the 9-byte header"),
        (b"\x05\x02\x04abcd\x00\x00", "ima-signature-unsupported", "type 5 version 2"),
        (b"\x03\x03\x04abcd\x00\x00", "ima-signature-unsupported", "type 3 version 3"),
        (b"\x03\x02\x63abcd\x00\x00", "ima-signature-unsupported", "hash algorithm id 99 is not"),
        (b"\x03\x02\x01abcd\x00\x00", "ima-signature-unsupported", "hash algorithm 1 (md5) is not"),
        (b"\x03\x02\x11abcd\x00\x00", "ima-signature-unsupported", "hash algorithm 17 (sm3) is not"),
        (b"\x03\x02\x04abcd\x00\x03ab", "ima-signature-malformed", "size field is 3, but 2"),
        (b"\x03\x02\x63abcd\x00\x03ab", "ima-signature-malformed", "size field is 3, but 2"),
    ],
)
def test_parse_signature_rejects_malformed(data: bytes, code: str, message: str) -> None:
    with pytest.raises(ParseError) as raised:
        parse_ima_signature(data)

    assert raised.value.code == code
    assert message in raised.value.message


def test_entry_without_signature_is_reported() -> None:
    built = ImaListBuilder()
    built.ima_sig("/usr/bin/unsigned", b"x")
    built.ima_ng("/usr/bin/plain", b"y")
    parsed = parse_ascii_list(built.ascii())
    key = ec.generate_private_key(ec.SECP256R1()).public_key()

    for entry in parsed:
        with pytest.raises(ParseError) as raised:
            verify_entry_signature(entry, key)
        assert raised.value.code == "ima-signature-missing"


def _self_signed_certificate(
    key: ec.EllipticCurvePrivateKey, subject_key_id: bytes | None = None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IMA signing key")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2034, 1, 1))
    )
    if subject_key_id is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(subject_key_id), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_key_id_of_certificate_without_key_identifier() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed_certificate(key)

    assert ima_key_id(certificate) == key_id_of(key.public_key())
    assert ima_signature_header("sha256", ima_key_id(certificate), b"")[3:7] == ima_key_id(key.public_key())


_KERNEL_HASHES: dict[str, tuple[int, hashes.HashAlgorithm]] = {
    "sha224": (7, hashes.SHA224()),
    "sha3-256": (20, hashes.SHA3_256()),
    "sha3-384": (21, hashes.SHA3_384()),
    "sha3-512": (22, hashes.SHA3_512()),
}


@pytest.mark.parametrize("algorithm", sorted(_KERNEL_HASHES))
def test_sha224_and_sha3_signatures_verify(algorithm: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    hash_id, hash_algorithm = _KERNEL_HASHES[algorithm]
    digest = digest_of(algorithm, b"signed file")
    raw = key.sign(digest, ec.ECDSA(Prehashed(hash_algorithm)))
    key_id = key_id_of(key.public_key())

    signature = parse_ima_signature(bytes([3, 2, hash_id]) + key_id + len(raw).to_bytes(2, "big") + raw)
    verify_ima_signature(signature, digest, algorithm, key.public_key(), key_id=key_id)

    assert signature.hash_algorithm == algorithm


def test_signature_other_key_id_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    digest = digest_of("sha256", b"named key")
    signature = parse_ima_signature(sign_file_digest(rsa_key, "sha256", digest))

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, digest, "sha256", rsa_key.public_key(), key_id=b"\x01\x02\x03\x04")

    assert raised.value.code == "ima-signature-key-mismatch"
    assert f"names key id {key_id_of(rsa_key.public_key()).hex()}" in raised.value.message
    assert "has id 01020304" in raised.value.message


def test_truncated_digest_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    digest = digest_of("sha256", b"truncated")
    signature = parse_ima_signature(sign_file_digest(rsa_key, "sha256", digest))

    with pytest.raises(VerificationError) as raised:
        verify_ima_signature(signature, digest[:20], "sha256", rsa_key.public_key())

    assert raised.value.code == "ima-signature-invalid"
    assert "20 bytes, expected 32 bytes" in raised.value.message


def test_key_id_is_sha1_of_key_bits(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cases: list[tuple[PublicKey, serialization.Encoding, serialization.PublicFormat]] = [
        (rsa_key.public_key(), serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
        (ec_public_key, serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
    ]

    for public_key, encoding, key_format in cases:
        key_bits = public_key.public_bytes(encoding, key_format)
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert ima_key_id(public_key) == hashlib.sha1(key_bits).digest()[-4:]
        assert ima_key_id(public_key) != hashlib.sha1(spki).digest()[-4:]


@pytest.mark.parametrize(
    ("subject_key_id", "uses_extension"),
    [(b"\x11" * 16 + b"\xca\xfe\xba\xbe", True), (b"\xca\xfe", False)],
)
def test_certificate_key_id_from_skid(subject_key_id: bytes, uses_extension: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed_certificate(key, subject_key_id)

    expected = subject_key_id[-4:] if uses_extension else key_id_of(key.public_key())
    assert ima_key_id(certificate) == expected
