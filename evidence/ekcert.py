"""Parse EK certificates leniently and verify them against a CA bundle.

Keylime's registrar stores the EK certificate a device sends without checking it. edgetrust
checks two things Keylime leaves out: the certificate chains to a configured bundle of TPM
vendor CA certificates, and its public key equals the EK the device presented.

Public API::

    load_ek_certificate(unverified: bytes) -> EkCertificate
    TrustStore.from_directory(path: str | os.PathLike[str]) -> TrustStore
    verify_ek_certificate(
        cert: EkCertificate,
        store: TrustStore,
        ek_public_key: RSAPublicKey | EllipticCurvePublicKey,
        *,
        at: datetime | None = None,
    ) -> list[str]

``verify_ek_certificate`` returns the subjects of the path it built, EK certificate first and
trust anchor last, and raises ``VerificationError`` on any failure. An EK certificate in the
TCG profile has an empty subject, so the first entry is often ``""``.

Why this module reads DER itself: some TPMs (Nuvoton) ship EK certificates whose issuer keeps
CN, O and C in one multi-valued RDN whose SET OF members are not in DER order. ``cryptography``
rejects such a certificate at load time. The parser here accepts it, keeps the original
tbsCertificate bytes, and every signature is checked over those bytes, never over a re-encoding.
Everything else is read strictly: definite lengths in minimal form, no trailing bytes.

Error codes (``code`` of the raised ``EvidenceError``):

- ``ek-certificate-malformed`` (``ParseError``): not a certificate, or a field cannot be read.
- ``ek-certificate-untrusted``: no path to a trust anchor, or a CA on the path may not issue.
- ``ek-certificate-signature-invalid``: a signature on the path does not verify.
- ``ek-certificate-algorithm-unsupported``: a signature algorithm outside RSA PKCS#1 v1.5,
  RSA-PSS and ECDSA with SHA-256, SHA-384 or SHA-512.
- ``ek-certificate-expired`` / ``ek-certificate-not-yet-valid``: a certificate on the path is
  outside its validity period.
- ``ek-certificate-key-mismatch``: the certificate's key is not the EK presented.
- ``ek-certificate-extension-unsupported``: a critical extension this module does not process.
- ``trust-store-invalid`` (``TrustStoreError``): a file in the CA bundle cannot be used.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from evidence.errors import ParseError, TrustStoreError, VerificationError

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

CODE_MALFORMED = "ek-certificate-malformed"
CODE_UNTRUSTED = "ek-certificate-untrusted"
CODE_SIGNATURE_INVALID = "ek-certificate-signature-invalid"
CODE_ALGORITHM_UNSUPPORTED = "ek-certificate-algorithm-unsupported"
CODE_EXPIRED = "ek-certificate-expired"
CODE_NOT_YET_VALID = "ek-certificate-not-yet-valid"
CODE_KEY_MISMATCH = "ek-certificate-key-mismatch"
CODE_EXTENSION_UNSUPPORTED = "ek-certificate-extension-unsupported"

# Far above the size of real EK certificates (1-2 KiB of DER), so that oversized input is
# rejected before parsing.
MAX_CERTIFICATE_INPUT_BYTES = 64 * 1024
# CA certificates allowed on one path, trust anchor included.
MAX_CA_CERTIFICATES_ON_PATH = 8

# TCG EK Credential Profile: attributes of the directoryName in the EK certificate's SAN.
OID_TPM_MANUFACTURER = "2.23.133.2.1"
OID_TPM_MODEL = "2.23.133.2.2"
OID_TPM_VERSION = "2.23.133.2.3"
OID_EK_CERTIFICATE_EKU = "2.23.133.8.1"

OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_CERTIFICATE_POLICIES = "2.5.29.32"
OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"
OID_EXTENDED_KEY_USAGE = "2.5.29.37"

# Critical extensions this module processes. Certificate policies count as processed because
# the path is validated with the initial policy set anyPolicy and no explicit policy required
# (RFC 5280, section 6.1.1), under which a policy never rejects a path.
HANDLED_CRITICAL_EXTENSIONS = frozenset(
    {
        OID_SUBJECT_KEY_IDENTIFIER,
        OID_KEY_USAGE,
        OID_SUBJECT_ALT_NAME,
        OID_BASIC_CONSTRAINTS,
        OID_CERTIFICATE_POLICIES,
        OID_AUTHORITY_KEY_IDENTIFIER,
        OID_EXTENDED_KEY_USAGE,
    }
)

_KEY_USAGE_BITS = (
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)

# Short attribute names as RFC 4514 and `cryptography` print them. Other types print as OIDs.
_ATTRIBUTE_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}

_OID_RSA_PSS = "1.2.840.113549.1.1.10"
_OID_MGF1 = "1.2.840.113549.1.1.8"
_OID_SHA1 = "1.3.14.3.2.26"
_HASHES_BY_OID: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}
_PKCS1V15_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.2.840.113549.1.1.11": hashes.SHA256,
    "1.2.840.113549.1.1.12": hashes.SHA384,
    "1.2.840.113549.1.1.13": hashes.SHA512,
}
_ECDSA_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.2.840.10045.4.3.2": hashes.SHA256,
    "1.2.840.10045.4.3.3": hashes.SHA384,
    "1.2.840.10045.4.3.4": hashes.SHA512,
}

# DER tags (universal class unless noted).
_BOOLEAN = 0x01
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_NULL = 0x05
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_SEQUENCE = 0x30
_SET = 0x31
_CONTEXT_0 = 0xA0  # [0] constructed
_CONTEXT_1 = 0xA1
_CONTEXT_2 = 0xA2
_CONTEXT_3 = 0xA3
_IMPLICIT_0 = 0x80  # [0] primitive
_IMPLICIT_1 = 0x81
_IMPLICIT_2 = 0x82
_DIRECTORY_NAME = 0xA4  # GeneralName [4], explicit because Name is a CHOICE

_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, as OpenSSL and `cryptography` read it
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


def _malformed(message: str) -> ParseError:
    return ParseError(f"EK certificate is malformed: {message}", code=CODE_MALFORMED)


# --- DER reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tlv:
    """One DER element: its tag, its content octets and its whole encoding as it was read."""

    tag: int
    content: bytes
    encoded: bytes


def _read_tlv(data: bytes, offset: int, where: str) -> tuple[_Tlv, int]:
    """Read the definite-length element at ``offset`` and return it with the offset after it."""
    if offset + 2 > len(data):
        raise _malformed(f"{where}: truncated element header at offset {offset}")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise _malformed(f"{where}: high-tag-number form (tag byte {tag:#04x}) is not used in X.509")

    first_length_byte = data[offset + 1]
    position = offset + 2
    if first_length_byte < 0x80:
        length = first_length_byte
    elif first_length_byte == 0x80:
        raise _malformed(f"{where}: indefinite length is not DER")
    else:
        length_size = first_length_byte & 0x7F
        if length_size > 4:
            raise _malformed(f"{where}: length field of {length_size} bytes, expected at most 4")
        if position + length_size > len(data):
            raise _malformed(f"{where}: truncated length field")
        length_bytes = data[position : position + length_size]
        length = int.from_bytes(length_bytes, "big")
        if length_bytes[0] == 0 or length < 0x80:
            raise _malformed(f"{where}: length {length} is not in minimal DER form")
        position += length_size

    end = position + length
    if end > len(data):
        raise _malformed(
            f"{where}: element with tag {tag:#04x} declares {length} content bytes, "
            f"only {len(data) - position} remain"
        )
    return _Tlv(tag, data[position:end], data[offset:end]), end


class _DerReader:
    """Sequential reader over the children of one constructed element."""

    def __init__(self, data: bytes, where: str) -> None:
        self._data = data
        self._offset = 0
        self._where = where

    def at_end(self) -> bool:
        return self._offset >= len(self._data)

    def peek_tag(self) -> int | None:
        return None if self.at_end() else self._data[self._offset]

    def read(self, expected_tag: int, field_name: str) -> _Tlv:
        tag = self.peek_tag()
        if tag is None:
            raise _malformed(f"{self._where}: {field_name} is missing")
        if tag != expected_tag:
            raise _malformed(
                f"{self._where}: expected {field_name} (tag {expected_tag:#04x}), got tag {tag:#04x}"
            )
        element, self._offset = _read_tlv(self._data, self._offset, f"{self._where}.{field_name}")
        return element

    def read_any(self, field_name: str) -> _Tlv:
        if self.at_end():
            raise _malformed(f"{self._where}: {field_name} is missing")
        element, self._offset = _read_tlv(self._data, self._offset, f"{self._where}.{field_name}")
        return element

    def read_optional(self, tag: int, field_name: str) -> _Tlv | None:
        return self.read(tag, field_name) if self.peek_tag() == tag else None

    def finish(self) -> None:
        if not self.at_end():
            raise _malformed(f"{self._where}: {len(self._data) - self._offset} unexpected bytes at the end")


def _read_single(data: bytes, expected_tag: int, where: str) -> _Tlv:
    """Read ``data`` as exactly one element with ``expected_tag``."""
    reader = _DerReader(data, where)
    element = reader.read(expected_tag, "value")
    reader.finish()
    return element


def _decode_oid(content: bytes, where: str) -> str:
    if not content or content[-1] & 0x80:
        raise _malformed(f"{where}: truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    starts_arc = True
    for byte in content:
        if starts_arc and byte == 0x80:
            raise _malformed(f"{where}: OBJECT IDENTIFIER arc is not in minimal form")
        value = (value << 7) | (byte & 0x7F)
        starts_arc = not byte & 0x80
        if starts_arc:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


def _decode_integer(content: bytes, where: str) -> int:
    if not content:
        raise _malformed(f"{where}: empty INTEGER")
    return int.from_bytes(content, "big", signed=True)


def _decode_boolean(content: bytes, where: str) -> bool:
    if len(content) != 1:
        raise _malformed(f"{where}: BOOLEAN of {len(content)} bytes, expected 1")
    # DER demands 0xFF for TRUE; any non-zero byte is TRUE in BER, and issuers use 0x01.
    return content[0] != 0


def _decode_bit_string(content: bytes, where: str) -> tuple[bytes, int]:
    """Return the bits as bytes and the number of unused bits in the last byte."""
    if not content:
        raise _malformed(f"{where}: empty BIT STRING")
    unused_bits = content[0]
    if unused_bits > 7 or (unused_bits and len(content) == 1):
        raise _malformed(f"{where}: BIT STRING declares {unused_bits} unused bits")
    return content[1:], unused_bits


def _decode_octet_aligned_bits(content: bytes, where: str) -> bytes:
    bits, unused_bits = _decode_bit_string(content, where)
    if unused_bits:
        raise _malformed(f"{where}: {unused_bits} unused bits, expected whole bytes")
    return bits


def _decode_time(element: _Tlv, where: str) -> dt.datetime:
    """Decode UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as RFC 5280 4.1.2.5."""
    try:
        text = element.content.decode("ascii")
    except UnicodeDecodeError:
        raise _malformed(f"{where}: time is not ASCII") from None

    if element.tag == _UTC_TIME and len(text) == 13:
        # UTCTime years 50-99 are 19xx and 00-49 are 20xx.
        text = ("19" if text[:2] >= "50" else "20") + text
    elif element.tag != _GENERALIZED_TIME or len(text) != 15:
        raise _malformed(f"{where}: time {text!r} is not YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ")

    if not text.endswith("Z") or not text[:-1].isdigit():
        raise _malformed(f"{where}: time {text!r} is not digits followed by Z")
    try:
        return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise _malformed(f"{where}: time {text!r} is not a calendar date") from None


def _decode_string(element: _Tlv, where: str) -> str:
    codec = _STRING_CODECS.get(element.tag)
    if codec is None:
        # RFC 4514 prints values of other types as '#' and the hex of their encoding.
        return "#" + element.encoded.hex()
    try:
        return element.content.decode(codec)
    except UnicodeDecodeError:
        raise _malformed(f"{where}: attribute value is not valid {codec}") from None


# --- Names ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NameAttribute:
    """One AttributeTypeAndValue of a distinguished name, value decoded to text."""

    oid: str
    value: str


@dataclass(frozen=True)
class DistinguishedName:
    """A Name as encoded in a certificate: its original DER and its RDNs in original order.

    Members of a multi-valued RDN keep the order they were encoded in, which is not always DER
    order. ``matches`` compares raw bytes first and then the normalized value.
    """

    der: bytes
    rdns: tuple[tuple[NameAttribute, ...], ...]

    def normalized(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """Return the RDNs with members sorted, values case-folded and spaces collapsed.

        This approximates RFC 5280 section 7.1 (LDAP StringPrep) for the names CAs use.
        """
        return tuple(
            tuple(sorted((attribute.oid, _normalize_value(attribute.value)) for attribute in rdn))
            for rdn in self.rdns
        )

    def matches(self, other: DistinguishedName) -> bool:
        return self.der == other.der or self.normalized() == other.normalized()

    def rfc4514_string(self) -> str:
        """Format as RFC 4514 does: last RDN first, members of one RDN joined with '+'."""
        return ",".join(
            "+".join(_format_attribute(attribute) for attribute in rdn) for rdn in reversed(self.rdns)
        )

    def values(self, oid: str) -> list[str]:
        return [attribute.value for rdn in self.rdns for attribute in rdn if attribute.oid == oid]


def _normalize_value(value: str) -> str:
    return " ".join(value.split()).casefold()


def _format_attribute(attribute: NameAttribute) -> str:
    name = _ATTRIBUTE_SHORT_NAMES.get(attribute.oid, attribute.oid)
    value = attribute.value
    if not value.startswith("#"):
        value = re.sub(r'([\\,+"<>;=])', r"\\\1", value).replace("\0", "\\00")
        if value.startswith(" "):
            value = "\\" + value
        if value.endswith(" ") and len(value) > 1:
            value = value[:-1] + "\\ "
    return f"{name}={value}"


def _parse_name(element: _Tlv, where: str) -> DistinguishedName:
    """Parse a Name, accepting multi-valued RDNs whose members are not in DER order."""
    rdns: list[tuple[NameAttribute, ...]] = []
    name_reader = _DerReader(element.content, where)
    while not name_reader.at_end():
        rdn_element = name_reader.read(_SET, "RelativeDistinguishedName")
        rdn_reader = _DerReader(rdn_element.content, f"{where}.RelativeDistinguishedName")
        attributes: list[NameAttribute] = []
        while not rdn_reader.at_end():
            attribute_element = rdn_reader.read(_SEQUENCE, "AttributeTypeAndValue")
            attributes.append(_parse_name_attribute(attribute_element, where))
        if not attributes:
            raise _malformed(f"{where}: empty RelativeDistinguishedName")
        rdns.append(tuple(attributes))
    return DistinguishedName(der=element.encoded, rdns=tuple(rdns))


def _parse_name_attribute(element: _Tlv, where: str) -> NameAttribute:
    reader = _DerReader(element.content, f"{where}.AttributeTypeAndValue")
    oid = _decode_oid(reader.read(_OID, "type").content, where)
    value = _decode_string(reader.read_any("value"), where)
    reader.finish()
    return NameAttribute(oid=oid, value=value)


# --- Extensions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateExtension:
    """One extension as encoded: OID, criticality and the content of extnValue."""

    oid: str
    critical: bool
    value: bytes


@dataclass(frozen=True)
class CertificateExtensions:
    """All extensions of a certificate, with the ones path validation uses decoded.

    A field is ``None`` when its extension is absent.
    """

    items: tuple[CertificateExtension, ...] = ()
    is_ca: bool | None = None
    path_length: int | None = None
    key_usage: frozenset[str] | None = None
    extended_key_usage: tuple[str, ...] | None = None
    subject_key_identifier: bytes | None = None
    authority_key_identifier: bytes | None = None
    directory_names: tuple[DistinguishedName, ...] = ()

    def unhandled_critical(self) -> list[str]:
        return [
            item.oid for item in self.items if item.critical and item.oid not in HANDLED_CRITICAL_EXTENSIONS
        ]


def _parse_extensions(element: _Tlv) -> CertificateExtensions:
    sequence = _read_single(element.content, _SEQUENCE, "extensions")
    reader = _DerReader(sequence.content, "extensions")
    items: list[CertificateExtension] = []
    while not reader.at_end():
        items.append(_parse_extension(reader.read(_SEQUENCE, "Extension")))

    seen: set[str] = set()
    for item in items:
        if item.oid in seen:
            raise _malformed(f"extension {item.oid} appears twice")
        seen.add(item.oid)

    by_oid = {item.oid: item.value for item in items}
    is_ca, path_length = _parse_basic_constraints(by_oid.get(OID_BASIC_CONSTRAINTS))
    return CertificateExtensions(
        items=tuple(items),
        is_ca=is_ca,
        path_length=path_length,
        key_usage=_parse_key_usage(by_oid.get(OID_KEY_USAGE)),
        extended_key_usage=_parse_extended_key_usage(by_oid.get(OID_EXTENDED_KEY_USAGE)),
        subject_key_identifier=_parse_subject_key_identifier(by_oid.get(OID_SUBJECT_KEY_IDENTIFIER)),
        authority_key_identifier=_parse_authority_key_identifier(by_oid.get(OID_AUTHORITY_KEY_IDENTIFIER)),
        directory_names=_parse_san_directory_names(by_oid.get(OID_SUBJECT_ALT_NAME)),
    )


def _parse_extension(element: _Tlv) -> CertificateExtension:
    reader = _DerReader(element.content, "Extension")
    oid = _decode_oid(reader.read(_OID, "extnID").content, "Extension.extnID")
    critical_element = reader.read_optional(_BOOLEAN, "critical")
    critical = critical_element is not None and _decode_boolean(
        critical_element.content, f"extension {oid} critical"
    )
    value = reader.read(_OCTET_STRING, "extnValue").content
    reader.finish()
    return CertificateExtension(oid=oid, critical=critical, value=value)


def _parse_basic_constraints(value: bytes | None) -> tuple[bool | None, int | None]:
    if value is None:
        return None, None
    where = "basicConstraints"
    reader = _DerReader(_read_single(value, _SEQUENCE, where).content, where)
    ca_element = reader.read_optional(_BOOLEAN, "cA")
    is_ca = ca_element is not None and _decode_boolean(ca_element.content, where)
    path_element = reader.read_optional(_INTEGER, "pathLenConstraint")
    reader.finish()
    if path_element is None:
        return is_ca, None
    path_length = _decode_integer(path_element.content, where)
    if path_length < 0:
        raise _malformed(f"{where}: negative pathLenConstraint {path_length}")
    return is_ca, path_length


def _parse_key_usage(value: bytes | None) -> frozenset[str] | None:
    if value is None:
        return None
    element = _read_single(value, _BIT_STRING, "keyUsage")
    bits, _ = _decode_bit_string(element.content, "keyUsage")
    return frozenset(
        name
        for index, name in enumerate(_KEY_USAGE_BITS)
        if index // 8 < len(bits) and bits[index // 8] & (0x80 >> (index % 8))
    )


def _parse_extended_key_usage(value: bytes | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    where = "extendedKeyUsage"
    reader = _DerReader(_read_single(value, _SEQUENCE, where).content, where)
    purposes: list[str] = []
    while not reader.at_end():
        purposes.append(_decode_oid(reader.read(_OID, "KeyPurposeId").content, where))
    return tuple(purposes)


def _parse_subject_key_identifier(value: bytes | None) -> bytes | None:
    if value is None:
        return None
    return _read_single(value, _OCTET_STRING, "subjectKeyIdentifier").content


def _parse_authority_key_identifier(value: bytes | None) -> bytes | None:
    if value is None:
        return None
    where = "authorityKeyIdentifier"
    reader = _DerReader(_read_single(value, _SEQUENCE, where).content, where)
    key_identifier = reader.read_optional(_IMPLICIT_0, "keyIdentifier")
    return None if key_identifier is None else key_identifier.content


def _parse_san_directory_names(value: bytes | None) -> tuple[DistinguishedName, ...]:
    """Return the directoryName entries of a subjectAltName; other GeneralNames are skipped."""
    if value is None:
        return ()
    where = "subjectAltName"
    reader = _DerReader(_read_single(value, _SEQUENCE, where).content, where)
    names: list[DistinguishedName] = []
    while not reader.at_end():
        general_name = reader.read_any("GeneralName")
        if general_name.tag == _DIRECTORY_NAME:
            name_element = _read_single(general_name.content, _SEQUENCE, f"{where}.directoryName")
            names.append(_parse_name(name_element, f"{where}.directoryName"))
    return tuple(names)


# --- Signature algorithms and keys ---------------------------------------------------------------


@dataclass(frozen=True)
class SignatureScheme:
    """How to verify a certificate signature: padding kind, hash and, for PSS, MGF1 and salt."""

    kind: str  # "pkcs1v15", "pss" or "ecdsa"
    hash_algorithm: hashes.HashAlgorithm
    mgf1_hash: hashes.HashAlgorithm | None = None
    salt_length: int | None = None


@dataclass(frozen=True)
class SignatureAlgorithm:
    """The AlgorithmIdentifier of a certificate signature.

    ``scheme`` is None when this module does not support the algorithm.
    """

    oid: str
    der: bytes
    scheme: SignatureScheme | None


def _parse_signature_algorithm(element: _Tlv, where: str) -> SignatureAlgorithm:
    reader = _DerReader(element.content, where)
    oid = _decode_oid(reader.read(_OID, "algorithm").content, where)
    parameters = None if reader.at_end() else reader.read_any("parameters")
    reader.finish()

    scheme: SignatureScheme | None = None
    if oid in _PKCS1V15_HASHES:
        scheme = SignatureScheme("pkcs1v15", _PKCS1V15_HASHES[oid]())
    elif oid in _ECDSA_HASHES:
        scheme = SignatureScheme("ecdsa", _ECDSA_HASHES[oid]())
    elif oid == _OID_RSA_PSS:
        scheme = _parse_pss_parameters(parameters, where)
    return SignatureAlgorithm(oid=oid, der=element.encoded, scheme=scheme)


def _parse_pss_parameters(parameters: _Tlv | None, where: str) -> SignatureScheme | None:
    """Read RSASSA-PSS-params (RFC 4055). Return None if a hash is SHA-1 (the default) or unknown."""
    if parameters is None or parameters.tag != _SEQUENCE:
        raise _malformed(f"{where}: RSASSA-PSS without a parameters SEQUENCE")
    reader = _DerReader(parameters.content, f"{where}.RSASSA-PSS-params")
    # Defaults from RFC 4055: SHA-1, MGF1 with SHA-1, salt length 20.
    hash_oid = _OID_SHA1
    mgf1_hash_oid = _OID_SHA1
    salt_length = 20

    hash_element = reader.read_optional(_CONTEXT_0, "hashAlgorithm")
    if hash_element is not None:
        hash_oid = _algorithm_oid(_read_single(hash_element.content, _SEQUENCE, where), where)
    mgf_element = reader.read_optional(_CONTEXT_1, "maskGenAlgorithm")
    if mgf_element is not None:
        mgf1_hash_oid = _parse_mgf1(_read_single(mgf_element.content, _SEQUENCE, where), where)
    salt_element = reader.read_optional(_CONTEXT_2, "saltLength")
    if salt_element is not None:
        salt_length = _decode_integer(_read_single(salt_element.content, _INTEGER, where).content, where)
    trailer_element = reader.read_optional(_CONTEXT_3, "trailerField")
    if trailer_element is not None:
        trailer = _decode_integer(_read_single(trailer_element.content, _INTEGER, where).content, where)
        if trailer != 1:
            raise _malformed(f"{where}: PSS trailerField {trailer}, expected 1")
    reader.finish()

    if salt_length < 0:
        raise _malformed(f"{where}: negative PSS salt length {salt_length}")
    if hash_oid not in _HASHES_BY_OID or mgf1_hash_oid not in _HASHES_BY_OID:
        return None
    return SignatureScheme(
        "pss",
        _HASHES_BY_OID[hash_oid](),
        mgf1_hash=_HASHES_BY_OID[mgf1_hash_oid](),
        salt_length=salt_length,
    )


def _algorithm_oid(element: _Tlv, where: str) -> str:
    reader = _DerReader(element.content, f"{where}.AlgorithmIdentifier")
    oid = _decode_oid(reader.read(_OID, "algorithm").content, where)
    if not reader.at_end():
        reader.read_any("parameters")
    reader.finish()
    return oid


def _parse_mgf1(element: _Tlv, where: str) -> str:
    reader = _DerReader(element.content, f"{where}.maskGenAlgorithm")
    oid = _decode_oid(reader.read(_OID, "algorithm").content, where)
    if oid != _OID_MGF1:
        raise _malformed(f"{where}: mask generation function {oid}, expected MGF1 ({_OID_MGF1})")
    hash_oid = _algorithm_oid(reader.read(_SEQUENCE, "parameters"), where)
    reader.finish()
    return hash_oid


def _load_public_key(spki: _Tlv) -> PublicKey:
    try:
        key = serialization.load_der_public_key(spki.encoded)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise _malformed(f"subjectPublicKeyInfo cannot be loaded: {error}") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise _malformed(f"public key type {type(key).__name__} is not supported, expected RSA or EC")
    return key


def describe_public_key(key: PublicKey) -> str:
    """Describe a key by type, size and the SHA-256 of its SubjectPublicKeyInfo, for messages."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fingerprint = hashlib.sha256(spki).hexdigest()[:16]
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA-{key.key_size}"
    else:
        kind = f"EC {key.curve.name}"
    return f"{kind} key (SPKI SHA-256 {fingerprint}...)"


# --- Certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCertificate:
    """An X.509 certificate read by this module's lenient parser.

    ``der`` is the certificate without NV padding and ``tbs`` the original tbsCertificate bytes
    that signatures are checked over. ``issuer`` and ``subject`` are RFC 4514 strings.
    ``certificate`` is the ``cryptography`` object, or None when ``cryptography`` rejects the
    encoding (for example a multi-valued RDN out of DER order).
    """

    der: bytes
    tbs: bytes
    version: int
    serial_number: int
    signature_algorithm: SignatureAlgorithm
    signature: bytes
    issuer: str
    subject: str
    issuer_name: DistinguishedName
    subject_name: DistinguishedName
    public_key: PublicKey
    not_before: dt.datetime
    not_after: dt.datetime
    extensions: CertificateExtensions
    certificate: x509.Certificate | None

    def describe(self) -> str:
        """Name the certificate for messages: its subject, or serial and issuer if it has none."""
        if self.subject:
            return f"certificate '{self.subject}'"
        return f"certificate with empty subject (serial {self.serial_number:#x}, issuer '{self.issuer}')"

    def is_self_issued(self) -> bool:
        return self.subject_name.matches(self.issuer_name)


@dataclass(frozen=True)
class EkCertificate(ParsedCertificate):
    """An EK certificate, with the TPM attributes of its subjectAltName directoryName.

    Attribute values are strings such as ``id:4E544300``; each is None when absent.
    """

    tpm_manufacturer: str | None = None
    tpm_model: str | None = None
    tpm_version: str | None = None


def load_ek_certificate(unverified: bytes) -> EkCertificate:
    """Parse an EK certificate sent as DER or PEM, cutting NV padding after the DER.

    Raises ``ParseError`` with code ``ek-certificate-malformed`` naming what was wrong.
    Nothing is verified here: pass the result to ``verify_ek_certificate``.
    """
    if len(unverified) > MAX_CERTIFICATE_INPUT_BYTES:
        raise _malformed(f"input of {len(unverified)} bytes, expected at most {MAX_CERTIFICATE_INPUT_BYTES}")
    if unverified.lstrip().startswith(b"-----BEGIN"):
        unverified_der = _single_pem_certificate(unverified)
    else:
        unverified_der = _trim_nv_padding(unverified)

    parsed = parse_certificate(unverified_der)
    directory_names = parsed.extensions.directory_names

    def san_value(oid: str) -> str | None:
        values = [value for name in directory_names for value in name.values(oid)]
        return values[0] if values else None

    base_fields = {field.name: getattr(parsed, field.name) for field in fields(ParsedCertificate)}
    return EkCertificate(
        **base_fields,
        tpm_manufacturer=san_value(OID_TPM_MANUFACTURER),
        tpm_model=san_value(OID_TPM_MODEL),
        tpm_version=san_value(OID_TPM_VERSION),
    )


def _trim_nv_padding(unverified: bytes) -> bytes:
    """Cut a DER certificate at the end of its outer SEQUENCE if only 0xFF bytes follow.

    TPM NV indexes are often larger than the certificate they contain, and the unused tail
    reads as 0xFF.
    """
    if not unverified:
        raise _malformed("input is empty")
    if unverified[0] != _SEQUENCE:
        raise _malformed(
            f"input starts with byte {unverified[0]:#04x}, expected a DER SEQUENCE (0x30) or a PEM header"
        )
    _, end = _read_tlv(unverified, 0, "Certificate")
    padding_bytes = unverified[end:]
    if padding_bytes.strip(b"\xff"):
        raise _malformed(
            f"{len(padding_bytes)} bytes follow the {end}-byte certificate and are not all 0xFF NV padding"
        )
    return unverified[:end]


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Return (label, decoded body) for each PEM block, raising ParseError on a bad block."""
    blocks: list[tuple[str, bytes]] = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1).decode("ascii")
        if match.group(3).decode("ascii") != label:
            raise _malformed(f"PEM block BEGIN {label} ends with END {match.group(3)!r}")
        body = b"".join(match.group(2).split())
        try:
            blocks.append((label, base64.b64decode(body, validate=True)))
        except binascii.Error as error:
            raise _malformed(f"PEM block {label} is not valid base64: {error}") from None
    return blocks


def _single_pem_certificate(unverified: bytes) -> bytes:
    blocks = _pem_blocks(unverified)
    labels = [label for label, _ in blocks]
    if labels != ["CERTIFICATE"]:
        raise _malformed(f"PEM input contains blocks {labels}, expected one CERTIFICATE block")
    unverified_der = blocks[0][1]
    if not unverified_der:
        raise _malformed("PEM CERTIFICATE block is empty")
    return unverified_der


def parse_certificate(der: bytes) -> ParsedCertificate:
    """Parse one DER certificate with no trailing bytes; raise ``ek-certificate-malformed``."""
    certificate = _read_single(der, _SEQUENCE, "Certificate")
    reader = _DerReader(certificate.content, "Certificate")
    tbs = reader.read(_SEQUENCE, "tbsCertificate")
    outer_algorithm = _parse_signature_algorithm(
        reader.read(_SEQUENCE, "signatureAlgorithm"), "signatureAlgorithm"
    )
    signature_element = reader.read(_BIT_STRING, "signatureValue")
    reader.finish()
    signature = _decode_octet_aligned_bits(signature_element.content, "signatureValue")

    tbs_reader = _DerReader(tbs.content, "tbsCertificate")
    version = _parse_version(tbs_reader.read_optional(_CONTEXT_0, "version"))
    serial_number = _decode_integer(tbs_reader.read(_INTEGER, "serialNumber").content, "serialNumber")
    inner_algorithm = tbs_reader.read(_SEQUENCE, "signature")
    issuer_name = _parse_name(tbs_reader.read(_SEQUENCE, "issuer"), "issuer")
    not_before, not_after = _parse_validity(tbs_reader.read(_SEQUENCE, "validity"))
    subject_name = _parse_name(tbs_reader.read(_SEQUENCE, "subject"), "subject")
    public_key = _load_public_key(tbs_reader.read(_SEQUENCE, "subjectPublicKeyInfo"))
    tbs_reader.read_optional(_IMPLICIT_1, "issuerUniqueID")
    tbs_reader.read_optional(_IMPLICIT_2, "subjectUniqueID")
    extensions_element = tbs_reader.read_optional(_CONTEXT_3, "extensions")
    tbs_reader.finish()

    if inner_algorithm.encoded != outer_algorithm.der:
        raise _malformed(f"signatureAlgorithm {outer_algorithm.oid} differs from tbsCertificate.signature")
    if not issuer_name.rdns:
        raise _malformed("issuer is empty")
    if extensions_element is not None and version != 3:
        raise _malformed(f"extensions in a version {version} certificate, expected version 3")
    extensions = (
        _parse_extensions(extensions_element) if extensions_element is not None else CertificateExtensions()
    )

    return ParsedCertificate(
        der=der,
        tbs=tbs.encoded,
        version=version,
        serial_number=serial_number,
        signature_algorithm=outer_algorithm,
        signature=signature,
        issuer=issuer_name.rfc4514_string(),
        subject=subject_name.rfc4514_string(),
        issuer_name=issuer_name,
        subject_name=subject_name,
        public_key=public_key,
        not_before=not_before,
        not_after=not_after,
        extensions=extensions,
        certificate=_load_with_cryptography(der) if serial_number > 0 else None,
    )


def _parse_version(element: _Tlv | None) -> int:
    if element is None:
        return 1
    value = _decode_integer(_read_single(element.content, _INTEGER, "version").content, "version")
    if value not in (0, 1, 2):
        raise _malformed(f"version field {value}, expected 0, 1 or 2 (v1 to v3)")
    return value + 1


def _parse_validity(element: _Tlv) -> tuple[dt.datetime, dt.datetime]:
    reader = _DerReader(element.content, "validity")
    not_before = _decode_time(reader.read_any("notBefore"), "validity.notBefore")
    not_after = _decode_time(reader.read_any("notAfter"), "validity.notAfter")
    reader.finish()
    return not_before, not_after


def _load_with_cryptography(der: bytes) -> x509.Certificate | None:
    """Return the ``cryptography`` certificate, or None if its strict DER parser rejects it.

    Callers skip certificates with a serial number below 1, for which ``cryptography`` 50 warns
    that a future release will raise.
    """
    try:
        certificate = x509.load_der_x509_certificate(der)
        # Loading is partly lazy; reading the names makes the strict parser see them.
        certificate.issuer  # noqa: B018 - forces parsing, the value is not needed
        certificate.subject  # noqa: B018 - forces parsing, the value is not needed
    except (ValueError, TypeError):
        # cryptography 50 raises TypeError for some attribute type and value combinations,
        # such as a BIT STRING value under an OID other than x500UniqueIdentifier.
        return None
    return certificate


# --- Trust store ----------------------------------------------------------------------------------


class TrustStore:
    """CA certificates that EK certificates may chain to: trust anchors and intermediates.

    Self-issued certificates (subject equals issuer) are trust anchors. Every other certificate
    is an intermediate and is only trusted through a path to an anchor in the same store.
    """

    def __init__(self, certificates: Iterable[ParsedCertificate]) -> None:
        self.certificates: tuple[ParsedCertificate, ...] = tuple(certificates)
        self._by_subject: dict[object, list[ParsedCertificate]] = {}
        for certificate in self.certificates:
            key = certificate.subject_name.normalized()
            self._by_subject.setdefault(key, []).append(certificate)

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Load every PEM certificate from the regular, non-hidden files in ``path``.

        Raises ``TrustStoreError`` naming the file when a file holds no certificate, a block
        other than CERTIFICATE, or a certificate that cannot be parsed.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TrustStoreError(f"EK CA bundle {directory} is not a directory", code="trust-store-invalid")
        certificates: list[ParsedCertificate] = []
        for file in sorted(directory.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                certificates.extend(_load_pem_file(file))
        if not certificates:
            raise TrustStoreError(
                f"EK CA bundle {directory} contains no certificates, expected PEM files",
                code="trust-store-invalid",
            )
        return cls(certificates)

    @property
    def anchors(self) -> list[ParsedCertificate]:
        return [certificate for certificate in self.certificates if certificate.is_self_issued()]

    def issuers_of(self, certificate: ParsedCertificate) -> list[ParsedCertificate]:
        """Return the CA certificates whose subject matches the issuer of ``certificate``.

        Candidates whose subject key identifier equals the certificate's authority key
        identifier come first. Key identifiers only order the candidates, because issuers
        compute them in different ways.
        """
        candidates = [
            candidate
            for candidate in self._by_subject.get(certificate.issuer_name.normalized(), [])
            if candidate.subject_name.matches(certificate.issuer_name)
        ]
        expected_key_identifier = certificate.extensions.authority_key_identifier
        return sorted(
            candidates,
            key=lambda candidate: (
                expected_key_identifier is None
                or candidate.extensions.subject_key_identifier != expected_key_identifier
            ),
        )


def _load_pem_file(file: Path) -> list[ParsedCertificate]:
    def invalid(reason: str) -> TrustStoreError:
        return TrustStoreError(f"EK CA bundle file {file}: {reason}", code="trust-store-invalid")

    try:
        data = file.read_bytes()
    except OSError as error:
        raise invalid(f"cannot be read: {error.strerror}") from None
    try:
        blocks = _pem_blocks(data)
    except ParseError as error:
        raise invalid(error.message) from None
    if not blocks:
        raise invalid("contains no PEM block, expected PEM CERTIFICATE blocks")

    certificates: list[ParsedCertificate] = []
    for index, (label, der) in enumerate(blocks, start=1):
        if label != "CERTIFICATE":
            raise invalid(f"PEM block {index} is {label}, expected CERTIFICATE")
        try:
            certificates.append(parse_certificate(der))
        except ParseError as error:
            raise invalid(f"certificate {index}: {error.message}") from None
    return certificates


# --- Verification ---------------------------------------------------------------------------------


def verify_ek_certificate(
    cert: EkCertificate,
    store: TrustStore,
    ek_public_key: PublicKey,
    *,
    at: dt.datetime | None = None,
) -> list[str]:
    """Verify an EK certificate for the EK a device presented; return the path's subjects.

    Steps, each raising ``VerificationError`` with the code in brackets:

    1. Every critical extension of the EK certificate is one this module processes
       [ek-certificate-extension-unsupported], and the certificate is not a CA certificate
       [ek-certificate-untrusted].
    2. The certificate's public key equals ``ek_public_key`` [ek-certificate-key-mismatch].
    3. ``at`` (default: now) lies in the certificate's validity period
       [ek-certificate-expired, ek-certificate-not-yet-valid].
    4. A path leads from the certificate through intermediates in ``store`` to a trust anchor
       in ``store`` [ek-certificate-untrusted]. On each link:

       - the issuer's subject matches the child's issuer name;
       - the issuer's key verifies the signature over the original TBS bytes
         [ek-certificate-signature-invalid, ek-certificate-algorithm-unsupported];
       - the issuer is a CA allowed to sign certificates at this depth
         [ek-certificate-untrusted];
       - every critical extension of the issuer is processed
         [ek-certificate-extension-unsupported];
       - ``at`` lies in the issuer's validity period.

    Returns the subjects from the EK certificate (often ``""``) to the trust anchor.
    """
    at = _check_time(at)

    unhandled = cert.extensions.unhandled_critical()
    if unhandled:
        raise _extension_unsupported("EK " + cert.describe(), unhandled)
    if cert.extensions.is_ca:
        raise VerificationError(
            f"EK {cert.describe()} has basicConstraints cA true, expected an end-entity certificate",
            code=CODE_UNTRUSTED,
        )

    if not _same_public_key(cert.public_key, ek_public_key):
        raise VerificationError(
            f"EK {cert.describe()} contains {describe_public_key(cert.public_key)}, expected "
            f"the EK presented, {describe_public_key(ek_public_key)}",
            code=CODE_KEY_MISMATCH,
        )

    _check_validity(cert, "EK", at)

    path = _extend_path([cert], store, at)
    return [certificate.subject for certificate in path]


def _check_time(at: dt.datetime | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        raise ValueError(f"at must be a timezone-aware datetime, got naive {at.isoformat()}")
    return at


def _same_public_key(certified: PublicKey, presented: PublicKey) -> bool:
    if isinstance(certified, rsa.RSAPublicKey) and isinstance(presented, rsa.RSAPublicKey):
        return certified.public_numbers() == presented.public_numbers()
    if isinstance(certified, ec.EllipticCurvePublicKey) and isinstance(presented, ec.EllipticCurvePublicKey):
        return certified.public_numbers() == presented.public_numbers()
    return False


def _check_validity(cert: ParsedCertificate, role: str, at: dt.datetime) -> None:
    if at < cert.not_before:
        raise VerificationError(
            f"{role} {cert.describe()} is not valid before {cert.not_before.isoformat()}, "
            f"checked at {at.isoformat()}",
            code=CODE_NOT_YET_VALID,
        )
    if at > cert.not_after:
        raise VerificationError(
            f"{role} {cert.describe()} expired at {cert.not_after.isoformat()}, checked at {at.isoformat()}",
            code=CODE_EXPIRED,
        )


def _extension_unsupported(described: str, oids: list[str]) -> VerificationError:
    return VerificationError(
        f"{described} has critical extensions {', '.join(oids)} that edgetrust does not "
        f"process; processed critical extensions are {', '.join(sorted(HANDLED_CRITICAL_EXTENSIONS))}",
        code=CODE_EXTENSION_UNSUPPORTED,
    )


def _extend_path(
    path: list[ParsedCertificate], store: TrustStore, at: dt.datetime
) -> list[ParsedCertificate]:
    """Depth-first search for an issuer chain from ``path[-1]`` to a trust anchor.

    Tries each candidate issuer in turn. If none leads to an anchor, raises the error of the
    first candidate, because key-identifier ordering puts the likeliest issuer first.
    """
    child = path[-1]
    candidates = [
        issuer for issuer in store.issuers_of(child) if not any(issuer is on_path for on_path in path)
    ]
    if not candidates:
        raise VerificationError(
            f"issuer '{child.issuer}' of {_role(path, child)} {child.describe()} not found in "
            "the EK CA bundle",
            code=CODE_UNTRUSTED,
        )

    first_error: VerificationError | None = None
    for issuer in candidates:
        try:
            _check_link(child, issuer, path, at)
            if issuer.is_self_issued():
                return [*path, issuer]
            if len(path) >= MAX_CA_CERTIFICATES_ON_PATH:
                raise VerificationError(
                    f"no trust anchor within {MAX_CA_CERTIFICATES_ON_PATH} CA certificates "
                    f"above EK {path[0].describe()}",
                    code=CODE_UNTRUSTED,
                )
            return _extend_path([*path, issuer], store, at)
        except VerificationError as error:
            first_error = first_error or error
    assert first_error is not None  # every candidate either returned or raised
    raise first_error


def _role(path: list[ParsedCertificate], certificate: ParsedCertificate) -> str:
    return "EK" if certificate is path[0] else "CA"


def _check_link(
    child: ParsedCertificate,
    issuer: ParsedCertificate,
    path: list[ParsedCertificate],
    at: dt.datetime,
) -> None:
    """Check that ``issuer`` may have issued ``child``, which sits at the end of ``path``."""
    _verify_signature(child, issuer, _role(path, child))

    if issuer.extensions.is_ca is not True:
        raise VerificationError(
            f"issuer {issuer.describe()} of {child.describe()} is not a CA: "
            "basicConstraints cA is absent or false, expected true",
            code=CODE_UNTRUSTED,
        )
    key_usage = issuer.extensions.key_usage
    if key_usage is not None and "keyCertSign" not in key_usage:
        raise VerificationError(
            f"CA {issuer.describe()} keyUsage is {sorted(key_usage)}, expected keyCertSign",
            code=CODE_UNTRUSTED,
        )
    # Intermediates between this issuer and the EK certificate: path[1:] (the EK is path[0]).
    intermediates_below = len(path) - 1
    path_length = issuer.extensions.path_length
    if path_length is not None and intermediates_below > path_length:
        raise VerificationError(
            f"CA {issuer.describe()} allows {path_length} intermediate CAs below it, "
            f"got {intermediates_below}",
            code=CODE_UNTRUSTED,
        )
    unhandled = issuer.extensions.unhandled_critical()
    if unhandled:
        raise _extension_unsupported("CA " + issuer.describe(), unhandled)

    _check_validity(issuer, "CA", at)


def _verify_signature(child: ParsedCertificate, issuer: ParsedCertificate, role: str) -> None:
    """Verify the signature of ``child`` over its original TBS bytes with the issuer's key."""
    scheme = child.signature_algorithm.scheme
    if scheme is None:
        raise VerificationError(
            f"{role} {child.describe()} is signed with algorithm "
            f"{child.signature_algorithm.oid}, expected RSA PKCS#1 v1.5, RSA-PSS or ECDSA "
            "with SHA-256, SHA-384 or SHA-512",
            code=CODE_ALGORITHM_UNSUPPORTED,
        )

    key = issuer.public_key
    invalid = VerificationError(
        f"signature of {role} {child.describe()} does not verify with the "
        f"{describe_public_key(key)} of CA {issuer.describe()}",
        code=CODE_SIGNATURE_INVALID,
    )
    try:
        if isinstance(key, rsa.RSAPublicKey) and scheme.kind == "pkcs1v15":
            key.verify(child.signature, child.tbs, padding.PKCS1v15(), scheme.hash_algorithm)
        elif isinstance(key, rsa.RSAPublicKey) and scheme.kind == "pss":
            assert scheme.mgf1_hash is not None and scheme.salt_length is not None
            pss = padding.PSS(padding.MGF1(scheme.mgf1_hash), scheme.salt_length)
            key.verify(child.signature, child.tbs, pss, scheme.hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and scheme.kind == "ecdsa":
            key.verify(child.signature, child.tbs, ec.ECDSA(scheme.hash_algorithm))
        else:
            raise VerificationError(
                f"{role} {child.describe()} is signed with a {scheme.kind} algorithm "
                f"({child.signature_algorithm.oid}), but the key of CA {issuer.describe()} "
                f"is a {describe_public_key(key)}",
                code=CODE_SIGNATURE_INVALID,
            )
    except InvalidSignature:
        raise invalid from None
