"""Test CAs that mint EK certificates of every shape the EK certificate tests need.

Certificates are made with ``cryptography``. The shapes ``cryptography`` refuses to encode
(a multi-valued RDN out of DER order, a TBS changed after signing) are built from its output
with the small DER writer at the end of this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

KeyKind = Literal["rsa-2048", "ec-p256", "ec-p384"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
SigningHash: TypeAlias = hashes.SHA256 | hashes.SHA384

OID_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
OID_EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
ONE_DAY = dt.timedelta(days=1)

# RSA key generation is slow next to EC, so tests that need any RSA key share these.
_RSA_KEY_CACHE: dict[str, rsa.RSAPrivateKey] = {}


def generate_key(kind: KeyKind) -> PrivateKey:
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curve: ec.EllipticCurve = ec.SECP256R1() if kind == "ec-p256" else ec.SECP384R1()
    return ec.generate_private_key(curve)


def shared_rsa_key(label: str) -> rsa.RSAPrivateKey:
    """Return an RSA-2048 key generated once per ``label`` for this test process."""
    if label not in _RSA_KEY_CACHE:
        _RSA_KEY_CACHE[label] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_KEY_CACHE[label]


def _signing_hash(key: PrivateKey) -> SigningHash:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def common_name(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def tpm_directory_name(
    manufacturer: str = "id:4E544300", model: str = "NPCT75x", version: str = "id:00070002"
) -> x509.Name:
    """Return the SAN directoryName of the TCG EK profile, one attribute per RDN."""
    return x509.Name(
        [
            x509.NameAttribute(OID_TPM_MANUFACTURER, manufacturer),
            x509.NameAttribute(OID_TPM_MODEL, model),
            x509.NameAttribute(OID_TPM_VERSION, version),
        ]
    )


@dataclass
class TestCa:
    """A CA key and certificate that issues intermediates and EK certificates."""

    __test__ = False  # not a pytest test class

    key: PrivateKey
    certificate: x509.Certificate
    rsa_padding: padding.PSS | None = None
    signing_hash: SigningHash = field(default_factory=hashes.SHA256)

    @property
    def name(self) -> x509.Name:
        return self.certificate.subject

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, self.signing_hash, rsa_padding=self.rsa_padding)

    def issue_ca(
        self,
        subject: str | x509.Name,
        key_kind: KeyKind = "ec-p256",
        *,
        key: PrivateKey | None = None,
        basic_constraints: x509.BasicConstraints | None = None,
        key_usage: x509.KeyUsage | None = None,
        not_before: dt.datetime = NOW - ONE_DAY,
        not_after: dt.datetime = NOW + 3650 * ONE_DAY,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> TestCa:
        """Issue an intermediate CA. ``basic_constraints`` defaults to cA true, critical."""
        ca_key = key or generate_key(key_kind)
        name = common_name(subject) if isinstance(subject, str) else subject
        builder = _base_builder(name, self.name, ca_key.public_key(), not_before, not_after)
        builder = builder.add_extension(
            basic_constraints or x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        builder = builder.add_extension(key_usage or _CA_KEY_USAGE, critical=True)
        builder = _add_key_identifiers(builder, ca_key.public_key(), self.key.public_key())
        for extension, critical in extra_extensions:
            builder = builder.add_extension(extension, critical=critical)
        return TestCa(key=ca_key, certificate=self.sign(builder), signing_hash=_signing_hash(ca_key))

    def issue_ek_certificate(
        self,
        ek_public_key: PublicKey,
        *,
        subject: x509.Name | None = None,
        directory_name: x509.Name | None = None,
        not_before: dt.datetime = NOW - ONE_DAY,
        not_after: dt.datetime = NOW + 3650 * ONE_DAY,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> x509.Certificate:
        """Issue an EK certificate in the TCG EK profile.

        The profile has an empty subject, a critical SAN holding only a directoryName with the
        TPM manufacturer, model and version, EKU 2.23.133.8.1 and keyEncipherment (RSA EK) or
        keyAgreement (ECC EK).
        """
        builder = _base_builder(subject or x509.Name([]), self.name, ek_public_key, not_before, not_after)
        san = x509.SubjectAlternativeName([x509.DirectoryName(directory_name or tpm_directory_name())])
        builder = builder.add_extension(san, critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([OID_EK_CERTIFICATE_EKU]), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_ek_key_usage(ek_public_key), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
        )
        for extension, critical in extra_extensions:
            builder = builder.add_extension(extension, critical=critical)
        return self.sign(builder)


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ek_key_usage(ek_public_key: PublicKey) -> x509.KeyUsage:
    is_rsa = isinstance(ek_public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _add_key_identifiers(
    builder: x509.CertificateBuilder, subject_key: PublicKey, issuer_key: PublicKey
) -> x509.CertificateBuilder:
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    return builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
    )


def root_ca(
    subject: str | x509.Name = "Test EK Root CA",
    key_kind: KeyKind = "ec-p256",
    *,
    key: PrivateKey | None = None,
    use_pss: bool = False,
    not_before: dt.datetime = NOW - ONE_DAY,
    not_after: dt.datetime = NOW + 3650 * ONE_DAY,
) -> TestCa:
    """Make a self-signed root CA. ``use_pss`` signs everything it issues with RSA-PSS."""
    ca_key = key or generate_key(key_kind)
    name = common_name(subject) if isinstance(subject, str) else subject
    rsa_padding = None
    if use_pss:
        rsa_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    builder = _base_builder(name, name, ca_key.public_key(), not_before, not_after)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(_CA_KEY_USAGE, critical=True)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
    )
    signing_hash = _signing_hash(ca_key)
    certificate = builder.sign(ca_key, signing_hash, rsa_padding=rsa_padding)
    return TestCa(key=ca_key, certificate=certificate, rsa_padding=rsa_padding, signing_hash=signing_hash)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


# --- Hand-built DER -------------------------------------------------------------------------------


def encode_tlv(tag: int, content: bytes) -> bytes:
    """Encode one DER element with a definite, minimal length."""
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    length_bytes = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length_bytes)]) + length_bytes + content


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """Return (tag, content start, content end) of the element at ``offset``."""
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first < 0x80:
        return tag, start, start + first
    size = first & 0x7F
    length = int.from_bytes(data[start : start + size], "big")
    return tag, start + size, start + size + length


def children(data: bytes) -> list[bytes]:
    """Split the content of a constructed element into its encoded children."""
    parts: list[bytes] = []
    offset = 0
    while offset < len(data):
        _, _, end = read_tlv(data, offset)
        parts.append(data[offset:end])
        offset = end
    return parts


def split_certificate(certificate_der: bytes) -> tuple[bytes, bytes, bytes]:
    """Return the encoded tbsCertificate, signatureAlgorithm and signatureValue."""
    _, start, end = read_tlv(certificate_der)
    tbs, algorithm, signature = children(certificate_der[start:end])
    return tbs, algorithm, signature


def sign_tbs(tbs: bytes, algorithm: bytes, ca: TestCa) -> bytes:
    """Sign ``tbs`` with the CA's key, hash and padding, and assemble the certificate DER.

    ``algorithm`` is the encoded signatureAlgorithm and must name that same hash and padding.
    """
    if isinstance(ca.key, ec.EllipticCurvePrivateKey):
        signature = ca.key.sign(tbs, ec.ECDSA(ca.signing_hash))
    else:
        signature = ca.key.sign(tbs, ca.rsa_padding or padding.PKCS1v15(), ca.signing_hash)
    return encode_tlv(0x30, tbs + algorithm + encode_tlv(0x03, b"\x00" + signature))


def unsorted_rdn_name(name: x509.Name) -> bytes:
    """Encode ``name`` with the members of each RDN in the order ``name`` lists them.

    ``cryptography`` sorts SET OF members when it encodes, as DER demands. This keeps the order
    the RDN was built with, so an RDN built as CN, O, C is encoded as CN, O, C.
    """
    rdns = []
    for rdn in name.rdns:
        members = [_encode_attribute(attribute) for attribute in rdn]
        rdns.append(encode_tlv(0x31, b"".join(members)))
    return encode_tlv(0x30, b"".join(rdns))


def _encode_attribute(attribute: x509.NameAttribute) -> bytes:
    """Return the AttributeTypeAndValue encoding of one attribute, as ``cryptography`` makes it."""
    single = x509.Name([x509.RelativeDistinguishedName([attribute])]).public_bytes()
    _, set_start, _ = read_tlv(single)
    _, start, end = read_tlv(single, set_start)
    return single[start:end]


def with_unsorted_rdns(certificate: x509.Certificate, signer: TestCa, name: x509.Name) -> bytes:
    """Re-encode each occurrence of ``name`` in the TBS out of DER order, then sign it again.

    ``name`` must be the Name as built, because a Name read back from a certificate lists RDN
    members in their sorted order. An EK certificate gets an unsorted issuer, the shape some
    Nuvoton EK certificates have; a self-signed root gets an unsorted issuer and subject.
    """
    tbs, algorithm, _ = split_certificate(der(certificate))
    sorted_name = name.public_bytes()
    unsorted_name = unsorted_rdn_name(name)
    assert sorted_name != unsorted_name, "name has no multi-valued RDN out of DER order"
    assert sorted_name in tbs, "name does not occur in the certificate"
    # Same length, so every length field in the TBS stays valid.
    return sign_tbs(tbs.replace(sorted_name, unsorted_name), algorithm, signer)


def with_sha1_signature(certificate: x509.Certificate, signer: TestCa) -> bytes:
    """Sign the certificate again with sha1WithRSAEncryption, which ``cryptography`` refuses.

    The certificate must have been signed by ``signer`` with sha256WithRSAEncryption, whose OID
    has the same encoded length as sha1WithRSAEncryption.
    """
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    sha256_with_rsa = bytes.fromhex("06092a864886f70d01010b")
    sha1_with_rsa = bytes.fromhex("06092a864886f70d010105")
    tbs, algorithm, _ = split_certificate(der(certificate))
    assert sha256_with_rsa in algorithm
    tbs = tbs.replace(sha256_with_rsa, sha1_with_rsa, 1)
    algorithm = algorithm.replace(sha256_with_rsa, sha1_with_rsa)
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - the test needs SHA-1
    return encode_tlv(0x30, tbs + algorithm + encode_tlv(0x03, b"\x00" + signature))


def with_tbs_replacement(certificate: x509.Certificate, signer: TestCa, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` with ``new`` (same length) in the TBS and sign it again with ``signer``."""
    assert len(old) == len(new), "replacement must keep the TBS length"
    tbs, algorithm, _ = split_certificate(der(certificate))
    assert old in tbs
    return sign_tbs(tbs.replace(old, new, 1), algorithm, signer)


def replace_in_tbs(certificate_der: bytes, old: bytes, new: bytes) -> bytes:
    """Replace bytes inside the TBS without signing again, so the signature no longer matches."""
    assert len(old) == len(new), "replacement must keep the TBS length"
    tbs, algorithm, signature = split_certificate(certificate_der)
    assert old in tbs
    return encode_tlv(0x30, tbs.replace(old, new, 1) + algorithm + signature)


def nv_padded(certificate_der: bytes, nv_size: int = 1600) -> bytes:
    """Pad a certificate with 0xFF up to ``nv_size`` bytes, as a TPM NV index reads back."""
    assert len(certificate_der) <= nv_size
    return certificate_der + b"\xff" * (nv_size - len(certificate_der))
