"""Parse and marshal the TPM 2.0 structures that attestation evidence carries.

Parsers are strict. Truncated input, trailing bytes and sizes above the TPM's maximum raise
``ParseError``, and so do algorithm ids that this module does not know or does not support
in that position. Each error has a stable ``code`` and a message naming the structure field.

Public functions:

- ``parse_tpm2b_public(data) -> PublicArea`` and ``parse_tpmt_public(data) -> PublicArea``
- ``PublicArea.name``, ``PublicArea.public_key``, ``PublicArea.qualified_name(parent_qn)``,
  ``PublicArea.to_tpm2b()``
- ``marshal_tpm2b_public(tpmt_public) -> bytes``
- ``ak_qualified_name(ek_public, ak_public) -> bytes``
- ``check_ak_attributes(ak_public, allowed_algorithms=DEFAULT_AK_ALGORITHMS) -> None``;
  raises ``VerificationError`` with code ``ak-attributes-invalid`` (a required attribute is
  missing), ``ak-attribute-decrypt-set`` or ``ak-algorithm-not-allowed``
- ``parse_tpms_attest(data) -> Attest`` (quote attestations only)
- ``parse_tpmt_signature(data) -> Signature``
- ``parse_tpml_pcr_selection(data) -> PcrSelection``, ``PcrSelection.from_text(text)``,
  ``PcrSelection.marshal()``
- ``parse_pcr_file(data) -> PcrFile`` and ``marshal_pcr_file(selection, values) -> bytes``
- ``parse_keylime_quote(text) -> KeylimeQuote`` and
  ``format_keylime_quote(attest, signature, pcr_file) -> str``
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from evidence.errors import ParseError, VerificationError

__all__ = [
    "DEFAULT_AK_ALGORITHMS",
    "TPM_GENERATED_VALUE",
    "TPM_RH_ENDORSEMENT",
    "Attest",
    "ClockInfo",
    "EccCurve",
    "KeylimeQuote",
    "ObjectAttributes",
    "PcrBank",
    "PcrFile",
    "PcrSelection",
    "PcrValues",
    "PublicArea",
    "Signature",
    "SigningAlgorithm",
    "StructureTag",
    "TpmAlg",
    "ak_qualified_name",
    "check_ak_attributes",
    "digest_size",
    "format_keylime_quote",
    "hash_algorithm",
    "hash_function",
    "marshal_pcr_file",
    "marshal_tpm2b_public",
    "parse_keylime_quote",
    "parse_pcr_file",
    "parse_tpm2b_public",
    "parse_tpml_pcr_selection",
    "parse_tpms_attest",
    "parse_tpmt_public",
    "parse_tpmt_signature",
]


class TpmAlg(enum.IntEnum):
    """TPM_ALG_ID values (TPM 2.0 Part 2, table 9) that this module recognises."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


_ALGS_BY_VALUE: Final = {int(member): member for member in TpmAlg}


class EccCurve(enum.IntEnum):
    """TPM_ECC_CURVE values for the NIST curves that ``cryptography`` can load."""

    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


class ObjectAttributes(enum.IntFlag):
    """TPMA_OBJECT bits (TPM 2.0 Part 2, table 31)."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000
    X509_SIGN = 0x00080000


class StructureTag(enum.IntEnum):
    """TPM_ST values that tag a TPMS_ATTEST."""

    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C


# TPMS_ATTEST.magic of every structure the TPM itself produced ("\xffTCG").
TPM_GENERATED_VALUE: Final = 0xFF544347
# Handle of the endorsement hierarchy; its 4 big-endian bytes are its qualified name.
TPM_RH_ENDORSEMENT: Final = 0x4000000B

_ATTRIBUTES_RESERVED: Final = 0xFFF0F309

# Maximum buffer sizes of the TPM2B types (tpm2-tss tss2_tpm2_types.h).
_MAX_DIGEST: Final = 64
_MAX_NAME: Final = 66
_MAX_DATA: Final = 66
_MAX_RSA_KEY_BYTES: Final = 512
_MAX_ECC_KEY_BYTES: Final = 128
_MAX_PCR_BANKS: Final = 16
_MAX_SIZE_OF_SELECT: Final = 4


@dataclass(frozen=True)
class _HashInfo:
    name: str
    size: int
    algorithm: hashes.HashAlgorithm
    function: Callable[..., Any]


_HASHES: Final[dict[int, _HashInfo]] = {
    TpmAlg.SHA1: _HashInfo("sha1", 20, hashes.SHA1(), hashlib.sha1),  # noqa: S303, S324 - TPMs still have SHA-1 PCR banks
    TpmAlg.SHA256: _HashInfo("sha256", 32, hashes.SHA256(), hashlib.sha256),
    TpmAlg.SHA384: _HashInfo("sha384", 48, hashes.SHA384(), hashlib.sha384),
    TpmAlg.SHA512: _HashInfo("sha512", 64, hashes.SHA512(), hashlib.sha512),
}
_HASH_BY_NAME: Final = {info.name: TpmAlg(alg) for alg, info in _HASHES.items()}

_CURVES: Final[dict[int, tuple[ec.EllipticCurve, int]]] = {
    EccCurve.NIST_P256: (ec.SECP256R1(), 32),
    EccCurve.NIST_P384: (ec.SECP384R1(), 48),
    EccCurve.NIST_P521: (ec.SECP521R1(), 66),
}

_SYMMETRIC_OBJECT_ALGS: Final = frozenset({TpmAlg.AES, TpmAlg.SM4, TpmAlg.CAMELLIA})
# Schemes whose details are only a hash algorithm; ECDAA adds a u16 count, RSAES has none.
_RSA_SCHEMES_WITH_HASH: Final = frozenset({TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.OAEP})
_ECC_SCHEMES_WITH_HASH: Final = frozenset(
    {TpmAlg.ECDSA, TpmAlg.ECDH, TpmAlg.ECDAA, TpmAlg.SM2, TpmAlg.ECSCHNORR, TpmAlg.ECMQV}
)
_KDF_SCHEMES: Final = frozenset(
    {TpmAlg.MGF1, TpmAlg.KDF1_SP800_56A, TpmAlg.KDF2, TpmAlg.KDF1_SP800_108}
)


def digest_size(alg: int) -> int:
    """Return the digest size in bytes of ``alg``; raise ParseError if it is not supported."""
    return _hash_info(alg, "hashAlg").size


def hash_algorithm(alg: int) -> hashes.HashAlgorithm:
    """Return the ``cryptography`` hash algorithm object for TPM hash algorithm ``alg``."""
    return _hash_info(alg, "hashAlg").algorithm


def hash_function(alg: int) -> Callable[..., Any]:
    """Return the ``hashlib`` constructor for TPM hash algorithm ``alg``."""
    return _hash_info(alg, "hashAlg").function


def _hash_info(alg: int, where: str) -> _HashInfo:
    info = _HASHES.get(alg)
    if info is None:
        raise ParseError(
            f"{where}: unsupported hash algorithm {_alg_text(alg)}; "
            "expected sha1, sha256, sha384 or sha512",
            code="hash-algorithm-unsupported",
            field=where,
        )
    return info


def _alg_text(alg: int) -> str:
    member = _ALGS_BY_VALUE.get(alg)
    return f"0x{alg:04x}" if member is None else f"{member.name.lower()} (0x{alg:04x})"


def _truncated(structure: str, name: str, size: int, offset: int, available: int) -> ParseError:
    return ParseError(
        f"{structure}.{name}: truncated: needs {size} bytes at offset {offset}, "
        f"got {max(available, 0)}",
        code="structure-truncated",
        field=name,
    )


def _trailing(structure: str, offset: int, size: int) -> ParseError:
    return ParseError(
        f"{structure}: {size - offset} trailing bytes after offset {offset}",
        code="trailing-bytes",
    )


def _algorithm_error(structure: str, name: str, value: int) -> ParseError:
    if value in _ALGS_BY_VALUE:
        return ParseError(
            f"{structure}.{name}: algorithm {_alg_text(value)} is not supported here",
            code="algorithm-unsupported",
            field=name,
        )
    return ParseError(
        f"{structure}.{name}: unknown algorithm 0x{value:04x}",
        code="algorithm-unknown",
        field=name,
    )


def _tpm2b_at(
    data: bytes, offset: int, structure: str, name: str, maximum: int
) -> tuple[bytes, int]:
    """Read the TPM2B at ``offset``; return its buffer and the offset after it."""
    start = offset + 2
    if start > len(data):
        raise _truncated(structure, f"{name}.size", 2, offset, len(data) - offset)
    size = data[offset] << 8 | data[offset + 1]
    if size > maximum:
        raise ParseError(
            f"{structure}.{name}: size {size} exceeds the maximum {maximum}",
            code="size-invalid",
            field=name,
        )
    end = start + size
    if end > len(data):
        raise _truncated(structure, name, size, start, len(data) - start)
    return data[start:end], end


class _Reader:
    """Big-endian cursor over one TPM structure; every read names the field it reads."""

    __slots__ = ("data", "offset", "structure")

    def __init__(self, data: bytes, structure: str) -> None:
        self.data = data
        self.offset = 0
        self.structure = structure

    def take(self, size: int, name: str) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise _truncated(self.structure, name, size, self.offset, len(self.data) - self.offset)
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "big")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "big")

    def tpm2b(self, name: str, maximum: int) -> bytes:
        chunk, self.offset = _tpm2b_at(self.data, self.offset, self.structure, name, maximum)
        return chunk

    def alg(self, name: str, allowed: Iterable[int]) -> TpmAlg:
        value = self.u16(name)
        if value not in allowed:
            raise _algorithm_error(self.structure, name, value)
        return _ALGS_BY_VALUE[value]

    def hash_alg(self, name: str) -> TpmAlg:
        return self.alg(name, _HASHES)

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise _trailing(self.structure, self.offset, len(self.data))


# --- TPMT_PUBLIC -------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningAlgorithm:
    """An AK's key type, signature scheme and scheme hash, e.g. (RSA, RSASSA, SHA256)."""

    key_type: TpmAlg
    scheme: TpmAlg
    hash_alg: TpmAlg

    def __str__(self) -> str:
        key_type, scheme, hash_alg = self.key_type.name, self.scheme.name, self.hash_alg.name
        return f"{key_type}:{scheme}-{hash_alg}".lower()


DEFAULT_AK_ALGORITHMS: Final = frozenset(
    SigningAlgorithm(key_type, scheme, hash_alg)
    for key_type, scheme in (
        (TpmAlg.RSA, TpmAlg.RSASSA),
        (TpmAlg.RSA, TpmAlg.RSAPSS),
        (TpmAlg.ECC, TpmAlg.ECDSA),
    )
    for hash_alg in (TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512)
)


@dataclass(frozen=True)
class PublicArea:
    """A parsed TPMT_PUBLIC of an RSA or ECC key.

    ``tpmt_public`` keeps the exact bytes the TPM produced, because the object's name is a
    hash over them. ``scheme`` and ``scheme_hash`` are NULL for keys without a fixed scheme.
    ``curve`` is set for ECC keys and ``key_bits`` for RSA keys.
    """

    tpmt_public: bytes
    type: TpmAlg
    name_alg: TpmAlg
    object_attributes: ObjectAttributes
    auth_policy: bytes
    symmetric: TpmAlg
    symmetric_key_bits: int
    symmetric_mode: TpmAlg
    scheme: TpmAlg
    scheme_hash: TpmAlg
    key_bits: int | None
    curve: EccCurve | None
    name: bytes = field(repr=False)
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False, compare=False)

    @property
    def signing_algorithm(self) -> SigningAlgorithm:
        return SigningAlgorithm(self.type, self.scheme, self.scheme_hash)

    def qualified_name(self, parent_qualified_name: bytes) -> bytes:
        """Compute QN = nameAlg || H_nameAlg(QN(parent) || Name) (TPM 2.0 Part 1, 16.6)."""
        digest = _HASHES[self.name_alg].function(parent_qualified_name + self.name).digest()
        return self.name_alg.to_bytes(2, "big") + digest

    def to_tpm2b(self) -> bytes:
        """Marshal this key as a TPM2B_PUBLIC (u16 size, then the TPMT_PUBLIC bytes)."""
        return marshal_tpm2b_public(self.tpmt_public)


def parse_tpm2b_public(data: bytes) -> PublicArea:
    """Parse a TPM2B_PUBLIC (the form ``tpm2_createak -u`` and Keylime's ``aik_tpm`` use)."""
    reader = _Reader(bytes(data), "TPM2B_PUBLIC")
    area = reader.tpm2b("publicArea", 0xFFFF)
    reader.finish()
    return parse_tpmt_public(area)


def marshal_tpm2b_public(tpmt_public: bytes) -> bytes:
    """Wrap TPMT_PUBLIC bytes in a TPM2B_PUBLIC."""
    return len(tpmt_public).to_bytes(2, "big") + tpmt_public


def parse_tpmt_public(data: bytes) -> PublicArea:
    """Parse a bare TPMT_PUBLIC of an RSA or ECC key."""
    data = bytes(data)
    reader = _Reader(data, "TPMT_PUBLIC")
    key_type = reader.alg("type", (TpmAlg.RSA, TpmAlg.ECC))
    name_alg = reader.hash_alg("nameAlg")
    attributes = _read_object_attributes(reader)
    auth_policy = reader.tpm2b("authPolicy", _MAX_DIGEST)
    symmetric, symmetric_bits, symmetric_mode = _read_symmetric(reader)

    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if key_type == TpmAlg.RSA:
        scheme, scheme_hash = _read_scheme(reader, TpmAlg.RSA)
        key_bits, public_key = _read_rsa_key(reader)
        curve = None
    else:
        scheme, scheme_hash = _read_scheme(reader, TpmAlg.ECC)
        curve, public_key = _read_ecc_key(reader)
        key_bits = None
    reader.finish()

    name = name_alg.to_bytes(2, "big") + _HASHES[name_alg].function(data).digest()
    return PublicArea(
        tpmt_public=data,
        type=key_type,
        name_alg=name_alg,
        object_attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        symmetric_key_bits=symmetric_bits,
        symmetric_mode=symmetric_mode,
        scheme=scheme,
        scheme_hash=scheme_hash,
        key_bits=key_bits,
        curve=curve,
        name=name,
        public_key=public_key,
    )


def _read_object_attributes(reader: _Reader) -> ObjectAttributes:
    value = reader.u32("objectAttributes")
    if value & _ATTRIBUTES_RESERVED:
        raise ParseError(
            f"TPMT_PUBLIC.objectAttributes: reserved bits 0x{value & _ATTRIBUTES_RESERVED:08x} "
            "are set; they must be zero",
            code="reserved-bits-set",
            field="objectAttributes",
        )
    return ObjectAttributes(value)


def _read_symmetric(reader: _Reader) -> tuple[TpmAlg, int, TpmAlg]:
    """Read a TPMT_SYM_DEF_OBJECT: algorithm, then keyBits and mode unless it is NULL."""
    algorithm = reader.alg("parameters.symmetric.algorithm", _SYMMETRIC_OBJECT_ALGS | {TpmAlg.NULL})
    if algorithm == TpmAlg.NULL:
        return algorithm, 0, TpmAlg.NULL
    key_bits = reader.u16("parameters.symmetric.keyBits")
    mode = reader.alg(
        "parameters.symmetric.mode",
        (TpmAlg.CTR, TpmAlg.OFB, TpmAlg.CBC, TpmAlg.CFB, TpmAlg.ECB, TpmAlg.NULL),
    )
    return algorithm, key_bits, mode


def _read_scheme(reader: _Reader, key_type: TpmAlg) -> tuple[TpmAlg, TpmAlg]:
    """Read a TPMT_RSA_SCHEME or TPMT_ECC_SCHEME, returning (scheme, hashAlg or NULL)."""
    with_hash = _RSA_SCHEMES_WITH_HASH if key_type == TpmAlg.RSA else _ECC_SCHEMES_WITH_HASH
    without_hash = {TpmAlg.NULL, TpmAlg.RSAES} if key_type == TpmAlg.RSA else {TpmAlg.NULL}
    scheme = reader.alg("parameters.scheme.scheme", with_hash | without_hash)
    if scheme in without_hash:
        return scheme, TpmAlg.NULL
    scheme_hash = reader.hash_alg("parameters.scheme.hashAlg")
    if scheme == TpmAlg.ECDAA:
        reader.u16("parameters.scheme.count")
    return scheme, scheme_hash


def _read_rsa_key(reader: _Reader) -> tuple[int, rsa.RSAPublicKey]:
    key_bits = reader.u16("parameters.keyBits")
    exponent = reader.u32("parameters.exponent") or 65537
    modulus = reader.tpm2b("unique.rsa", _MAX_RSA_KEY_BYTES)
    if key_bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != key_bits:
        raise ParseError(
            f"TPMT_PUBLIC.unique.rsa: modulus of {len(modulus)} bytes does not match keyBits "
            f"{key_bits}; expected keyBits 1024, 2048, 3072 or 4096 and keyBits/8 bytes",
            code="size-invalid",
            field="unique.rsa",
        )
    try:
        key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
    except ValueError as error:
        raise ParseError(
            f"TPMT_PUBLIC.unique.rsa: invalid RSA public key: {error}",
            code="public-key-invalid",
            field="unique.rsa",
        ) from None
    return key_bits, key


def _read_ecc_key(reader: _Reader) -> tuple[EccCurve, ec.EllipticCurvePublicKey]:
    curve_id = reader.u16("parameters.curveID")
    if curve_id not in _CURVES:
        raise ParseError(
            f"TPMT_PUBLIC.parameters.curveID: unsupported curve 0x{curve_id:04x}; "
            "expected NIST P-256 (0x0003), P-384 (0x0004) or P-521 (0x0005)",
            code="curve-unsupported",
            field="parameters.curveID",
        )
    curve, coordinate_size = _CURVES[curve_id]
    kdf = reader.alg("parameters.kdf.scheme", _KDF_SCHEMES | {TpmAlg.NULL})
    if kdf != TpmAlg.NULL:
        reader.hash_alg("parameters.kdf.hashAlg")
    x = reader.tpm2b("unique.ecc.x", _MAX_ECC_KEY_BYTES)
    y = reader.tpm2b("unique.ecc.y", _MAX_ECC_KEY_BYTES)
    for coordinate, label in ((x, "x"), (y, "y")):
        if not 0 < len(coordinate) <= coordinate_size:
            raise ParseError(
                f"TPMT_PUBLIC.unique.ecc.{label}: {len(coordinate)} bytes; expected 1 to "
                f"{coordinate_size} bytes for curve {EccCurve(curve_id).name}",
                code="size-invalid",
                field=f"unique.ecc.{label}",
            )
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        key = numbers.public_key()
    except ValueError as error:
        raise ParseError(
            f"TPMT_PUBLIC.unique.ecc: invalid point on {EccCurve(curve_id).name}: {error}",
            code="public-key-invalid",
            field="unique.ecc",
        ) from None
    return EccCurve(curve_id), key


def ak_qualified_name(ek_public: PublicArea, ak_public: PublicArea) -> bytes:
    """Compute the qualified name of an AK created as a child of a primary EK.

    A quote's ``qualifiedSigner`` carries this value, not the AK's plain name. The EK is a
    primary key of the endorsement hierarchy, whose qualified name is its 4-byte handle.
    """
    ek_qualified_name = ek_public.qualified_name(TPM_RH_ENDORSEMENT.to_bytes(4, "big"))
    return ak_public.qualified_name(ek_qualified_name)


_AK_REQUIRED_ATTRIBUTES: Final = (
    (ObjectAttributes.RESTRICTED, "restricted"),
    (ObjectAttributes.SIGN_ENCRYPT, "sign"),
    (ObjectAttributes.FIXED_TPM, "fixedTPM"),
    (ObjectAttributes.FIXED_PARENT, "fixedParent"),
    (ObjectAttributes.SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
)


def check_ak_attributes(
    ak_public: PublicArea,
    allowed_algorithms: Iterable[SigningAlgorithm] = DEFAULT_AK_ALGORITHMS,
) -> None:
    """Raise VerificationError unless the key is a TPM-resident restricted signing key.

    Each attribute protects one property of the AK. ``restricted`` and ``sign``: the TPM only
    signs structures it produced itself (quotes), never external data that merely looks like
    one. ``fixedTPM`` and ``fixedParent``: the private key cannot be duplicated out of this
    TPM. ``sensitiveDataOrigin``: the TPM generated the private key, so it was not imported. A
    set ``decrypt`` would make the key usable for decryption too.

    Codes: ``ak-attributes-invalid`` names the first missing attribute,
    ``ak-attribute-decrypt-set``, and ``ak-algorithm-not-allowed`` for a key type, scheme
    and hash outside ``allowed_algorithms``.
    """
    attributes = ak_public.object_attributes
    missing = [label for flag, label in _AK_REQUIRED_ATTRIBUTES if not attributes & flag]
    if missing:
        raise VerificationError(
            f"AK objectAttributes lack {', '.join(missing)}; got {_attributes_text(attributes)}, "
            "expected restricted, sign, fixedTPM, fixedParent and sensitiveDataOrigin",
            code="ak-attributes-invalid",
            field="objectAttributes",
        )

    if attributes & ObjectAttributes.DECRYPT:
        raise VerificationError(
            f"AK objectAttributes include decrypt; got {_attributes_text(attributes)}, "
            "expected a signing-only key",
            code="ak-attribute-decrypt-set",
            field="objectAttributes",
        )

    allowed = frozenset(allowed_algorithms)
    algorithm = ak_public.signing_algorithm
    if algorithm not in allowed:
        expected = ", ".join(sorted(str(item) for item in allowed))
        raise VerificationError(
            f"AK signing algorithm {algorithm} is not allowed; expected one of {expected}",
            code="ak-algorithm-not-allowed",
            field="parameters.scheme",
        )


def _attributes_text(attributes: ObjectAttributes) -> str:
    names = [flag.name.lower() for flag in ObjectAttributes if flag & attributes and flag.name]
    return "|".join(names) or "none"


# --- TPML_PCR_SELECTION ------------------------------------------------------------------


class PcrBank(NamedTuple):
    """One TPMS_PCR_SELECTION: a PCR bank and the ascending PCR indexes selected in it."""

    hash_alg: TpmAlg
    pcrs: tuple[int, ...]
    size_of_select: int = 3


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """A TPML_PCR_SELECTION in the order the TPM reported its banks."""

    banks: tuple[PcrBank, ...]

    @classmethod
    def from_text(cls, text: str) -> PcrSelection:
        """Parse the tpm2-tools form ``sha256:0,1,2+sha1:10``; raise ParseError if invalid."""
        banks = []
        for part in text.split("+"):
            bank_name, separator, indexes = part.partition(":")
            hash_alg = _HASH_BY_NAME.get(bank_name.strip().lower())
            if hash_alg is None or not separator:
                raise ParseError(
                    f"PCR selection {text!r}: bank {bank_name!r} is not one of "
                    f"{', '.join(sorted(_HASH_BY_NAME))}; expected the form sha256:0,1,2",
                    code="pcr-selection-invalid",
                )
            try:
                pcrs = sorted({int(index) for index in indexes.split(",") if index.strip()})
            except ValueError:
                raise ParseError(
                    f"PCR selection {text!r}: PCR indexes {indexes!r} are not decimal numbers",
                    code="pcr-selection-invalid",
                ) from None
            if any(not 0 <= index < 8 * _MAX_SIZE_OF_SELECT for index in pcrs):
                raise ParseError(
                    f"PCR selection {text!r}: PCR index out of range 0-31",
                    code="pcr-selection-invalid",
                )
            banks.append(PcrBank(hash_alg, tuple(pcrs), max(3, (max(pcrs, default=0) + 8) // 8)))
        return cls(tuple(banks))

    def __str__(self) -> str:
        return "+".join(
            f"{_HASHES[bank.hash_alg].name}:{','.join(map(str, bank.pcrs))}" for bank in self.banks
        )

    @property
    def pcr_count(self) -> int:
        """Number of PCR values the selection covers, over all banks."""
        return sum(len(bank.pcrs) for bank in self.banks)

    def as_sets(self) -> dict[TpmAlg, frozenset[int]]:
        """Return {bank: PCR indexes}, leaving out banks in which no PCR is selected."""
        return {bank.hash_alg: frozenset(bank.pcrs) for bank in self.banks if bank.pcrs}

    def marshal(self) -> bytes:
        """Marshal as a TPML_PCR_SELECTION in TPM (big-endian) byte order."""
        parts = [len(self.banks).to_bytes(4, "big")]
        for bank in self.banks:
            parts.append(struct.pack(">HB", bank.hash_alg, bank.size_of_select))
            parts.append(_pcr_bitmap(bank.pcrs, bank.size_of_select))
        return b"".join(parts)


def _pcr_bitmap(pcrs: Iterable[int], size_of_select: int) -> bytes:
    bitmap = bytearray(size_of_select)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return bytes(bitmap)


def _pcr_indexes(bitmap: bytes) -> tuple[int, ...]:
    return tuple(
        byte_index * 8 + bit
        for byte_index, byte in enumerate(bitmap)
        if byte
        for bit in range(8)
        if byte >> bit & 1
    )


def parse_tpml_pcr_selection(data: bytes) -> PcrSelection:
    """Parse a marshalled TPML_PCR_SELECTION; the whole input must be consumed."""
    reader = _Reader(bytes(data), "TPML_PCR_SELECTION")
    selection = _read_pcr_selection(reader)
    reader.finish()
    return selection


def _read_pcr_selection(reader: _Reader) -> PcrSelection:
    count = reader.u32("pcrSelections.count")
    if count > _MAX_PCR_BANKS:
        raise ParseError(
            f"{reader.structure}.pcrSelections.count: {count} banks exceeds the maximum "
            f"{_MAX_PCR_BANKS}",
            code="size-invalid",
            field="pcrSelections.count",
        )
    banks = []
    for _ in range(count):
        hash_alg = reader.hash_alg("pcrSelections.hash")
        size_of_select = reader.u8("pcrSelections.sizeofSelect")
        if size_of_select > _MAX_SIZE_OF_SELECT:
            raise ParseError(
                f"{reader.structure}.pcrSelections.sizeofSelect: {size_of_select} exceeds the "
                f"maximum {_MAX_SIZE_OF_SELECT}",
                code="size-invalid",
                field="pcrSelections.sizeofSelect",
            )
        bitmap = reader.take(size_of_select, "pcrSelections.pcrSelect")
        banks.append(PcrBank(hash_alg, _pcr_indexes(bitmap), size_of_select))
    _reject_duplicate_banks(banks, reader.structure)
    return PcrSelection(tuple(banks))


def _reject_duplicate_banks(banks: list[PcrBank], structure: str) -> None:
    seen = [bank.hash_alg for bank in banks]
    if len(set(seen)) != len(seen):
        raise ParseError(
            f"{structure}.pcrSelections: bank listed more than once: "
            f"{', '.join(_HASHES[alg].name for alg in seen)}",
            code="pcr-selection-invalid",
            field="pcrSelections",
        )


# --- TPMS_ATTEST -------------------------------------------------------------------------


class ClockInfo(NamedTuple):
    """TPMS_CLOCK_INFO: milliseconds the TPM has run, boot and resume counters, and ``safe``."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class Attest(NamedTuple):
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, with the TPMS_QUOTE_INFO it carries.

    ``magic`` is kept as read; checking it against TPM_GENERATED_VALUE is verification.
    Parsed values are named tuples because a verifier builds several per quote.
    """

    magic: int
    type: StructureTag
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_selection: PcrSelection
    pcr_digest: bytes


# _new_tuple(Cls, fields) builds the named tuple Cls from a tuple of all its fields in half
# the time of the generated __new__. It checks no field count, so only the fast paths use it.
_new_tuple: Final = tuple.__new__

_ATTEST_HEADER: Final = struct.Struct(">IH")
_CLOCK_AND_FIRMWARE: Final = struct.Struct(">QIIBQ")


def parse_tpms_attest(data: bytes) -> Attest:
    """Parse TPMS_ATTEST bytes (no TPM2B size prefix) of a quote.

    Attestations of other types raise ParseError with code ``attest-type-unsupported``.
    """
    data = bytes(data)
    attest = _parse_single_bank_quote(data)
    if attest is None:
        attest = _parse_tpms_attest_fields(data)
    return attest


# Struct layouts of a single-bank quote's TPMS_ATTEST, from magic up to pcrDigest.size. The
# key packs the sizes of qualifiedSigner and extraData (each at most 66) and the bank's
# sizeofSelect (at most 4), which bounds the dictionary to 67 * 67 * 5 entries.
_QUOTE_LAYOUTS: Final[dict[int, struct.Struct]] = {}
_ATTEST_QUOTE: Final = StructureTag.ATTEST_QUOTE
_ATTEST_QUOTE_TAG: Final = StructureTag.ATTEST_QUOTE.to_bytes(2, "big")
# Offset of sizeofSelect after qualifiedSigner and extraData: magic, type, two sizes,
# clockInfo, firmwareVersion, pcrSelections.count and .hash take 41 bytes.
_SIZE_OF_SELECT_OFFSET: Final = 41


def _add_quote_layout(key: int, signer_size: int, extra_size: int, size_of_select: int) -> struct.Struct:
    layout = struct.Struct(f">IHH{signer_size}sH{extra_size}sQIIBQIHB{size_of_select}xH")
    _QUOTE_LAYOUTS[key] = layout
    return layout


def _parse_single_bank_quote(data: bytes) -> Attest | None:
    """Parse a valid quote over one PCR bank with one struct unpack, or return None.

    The verifier requests one bank (``verifier/engine.py``), so this is the usual shape. The
    function returns None, and raises nothing, for any input that ``_parse_tpms_attest_fields``
    would reject or that selects several banks. It accepts an input only after every check of
    that parser passed, so both return equal results for it.
    """
    size = len(data)
    if size < 10 or data[4:6] != _ATTEST_QUOTE_TAG:
        return None
    signer_size = data[6] << 8 | data[7]
    if signer_size > _MAX_NAME or signer_size + 10 > size:
        return None
    extra_size = data[signer_size + 8] << 8 | data[signer_size + 9]
    select_offset = _SIZE_OF_SELECT_OFFSET + signer_size + extra_size
    if extra_size > _MAX_DATA or select_offset >= size:
        return None
    size_of_select = data[select_offset]
    if size_of_select > _MAX_SIZE_OF_SELECT:
        return None
    key = signer_size << 16 | extra_size << 8 | size_of_select
    layout = _QUOTE_LAYOUTS.get(key)
    if layout is None:
        layout = _add_quote_layout(key, signer_size, extra_size, size_of_select)
    if layout.size > size:
        return None
    (
        magic, _, _, qualified_signer, _, extra_data, clock, reset_count, restart_count, safe,
        firmware_version, bank_count, hash_alg, _, digest_size,
    ) = layout.unpack_from(data)
    if (
        safe > 1
        or bank_count != 1
        or hash_alg not in _HASHES
        or digest_size > _MAX_DIGEST
        or layout.size + digest_size != size
    ):
        return None

    # TPML_PCR_SELECTION runs from its u32 count, 6 bytes before sizeofSelect, to pcrDigest.
    selection = _parse_pcr_selection_cached(data[select_offset - 6 : layout.size - 2])
    clock_info = _new_tuple(ClockInfo, (clock, reset_count, restart_count, safe == 1))
    return _new_tuple(Attest, (
        magic,
        _ATTEST_QUOTE,
        qualified_signer,
        extra_data,
        clock_info,
        firmware_version,
        selection,
        data[layout.size :],
    ))


def _parse_tpms_attest_fields(data: bytes) -> Attest:
    """Parse a quote's TPMS_ATTEST field by field, raising ParseError at the first bad one."""
    if len(data) < _ATTEST_HEADER.size:
        raise _truncated("TPMS_ATTEST", "magic", _ATTEST_HEADER.size, 0, len(data))
    magic, attest_type = _ATTEST_HEADER.unpack_from(data)
    if attest_type != StructureTag.ATTEST_QUOTE:
        raise ParseError(
            f"TPMS_ATTEST.type: got 0x{attest_type:04x}, expected TPM_ST_ATTEST_QUOTE (0x8018)",
            code="attest-type-unsupported",
            field="type",
        )
    qualified_signer, offset = _tpm2b_at(
        data, _ATTEST_HEADER.size, "TPMS_ATTEST", "qualifiedSigner", _MAX_NAME
    )
    extra_data, offset = _tpm2b_at(data, offset, "TPMS_ATTEST", "extraData", _MAX_DATA)

    if offset + _CLOCK_AND_FIRMWARE.size > len(data):
        raise _truncated(
            "TPMS_ATTEST", "clockInfo", _CLOCK_AND_FIRMWARE.size, offset, len(data) - offset
        )
    clock, reset_count, restart_count, safe, firmware_version = (
        _CLOCK_AND_FIRMWARE.unpack_from(data, offset)
    )
    offset += _CLOCK_AND_FIRMWARE.size
    if safe > 1:
        raise ParseError(
            f"TPMS_ATTEST.clockInfo.safe: got {safe}, expected 0 (NO) or 1 (YES)",
            code="value-invalid",
            field="clockInfo.safe",
        )

    selection, offset = _pcr_selection_at(data, offset, "TPMS_ATTEST.attested.quote")
    pcr_digest, offset = _tpm2b_at(
        data, offset, "TPMS_ATTEST", "attested.quote.pcrDigest", _MAX_DIGEST
    )
    if offset != len(data):
        raise _trailing("TPMS_ATTEST", offset, len(data))
    return Attest(
        magic=magic,
        type=StructureTag.ATTEST_QUOTE,
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock_info=ClockInfo(clock, reset_count, restart_count, safe == 1),
        firmware_version=firmware_version,
        pcr_selection=selection,
        pcr_digest=pcr_digest,
    )


def _pcr_selection_at(data: bytes, offset: int, structure: str) -> tuple[PcrSelection, int]:
    """Find the end of the TPML_PCR_SELECTION at ``offset`` and parse it (cached by bytes)."""
    start = offset
    if offset + 4 > len(data):
        raise _truncated(structure, "pcrSelect.count", 4, offset, len(data) - offset)
    count = int.from_bytes(data[offset : offset + 4], "big")
    offset += 4
    for _ in range(min(count, _MAX_PCR_BANKS + 1)):
        if offset + 3 > len(data):
            raise _truncated(structure, "pcrSelect.sizeofSelect", 3, offset, len(data) - offset)
        offset += 3 + data[offset + 2]
    return _parse_pcr_selection_cached(data[start:offset]), offset


@functools.lru_cache(maxsize=256)
def _parse_pcr_selection_cached(data: bytes) -> PcrSelection:
    # A device quotes the same selection every time, so most calls are cache hits.
    return parse_tpml_pcr_selection(data)


# --- TPMT_SIGNATURE ----------------------------------------------------------------------


class Signature(NamedTuple):
    """A parsed TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA).

    ``signature`` is in the form ``cryptography`` verifies: the raw RSA signature, or the
    DER encoding of the ECDSA (r, s) pair.
    """

    sig_alg: TpmAlg
    hash_alg: TpmAlg
    signature: bytes


_SIGNATURE_ALGS: Final = {int(alg): alg for alg in (TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.ECDSA)}
_SIGNATURE_HEADER: Final = struct.Struct(">HH")
# sigAlg, hash and the size of the TPM2B_PUBLIC_KEY_RSA of an RSASSA or RSAPSS signature.
_RSA_SIGNATURE_HEADER: Final = struct.Struct(">HHH")
_RSA_SIGNATURE_ALGS: Final = frozenset({TpmAlg.RSASSA, TpmAlg.RSAPSS})


def parse_tpmt_signature(data: bytes) -> Signature:
    """Parse TPMT_SIGNATURE bytes; schemes other than RSASSA, RSAPSS and ECDSA raise ParseError."""
    data = bytes(data)
    signature = _parse_rsa_signature(data)
    if signature is None:
        signature = _parse_tpmt_signature_fields(data)
    return signature


def _parse_rsa_signature(data: bytes) -> Signature | None:
    """Parse a valid RSASSA or RSAPSS signature with one unpack, or return None.

    Returns None, and raises nothing, for ECDSA and for any input that
    ``_parse_tpmt_signature_fields`` would reject. For the rest, both return equal results.
    """
    if len(data) < _RSA_SIGNATURE_HEADER.size:
        return None
    sig_alg, hash_alg, size = _RSA_SIGNATURE_HEADER.unpack_from(data)
    if (
        sig_alg not in _RSA_SIGNATURE_ALGS
        or hash_alg not in _HASHES
        or size > _MAX_RSA_KEY_BYTES
        or size != len(data) - _RSA_SIGNATURE_HEADER.size
    ):
        return None
    return _new_tuple(Signature, (
        _ALGS_BY_VALUE[sig_alg],
        _ALGS_BY_VALUE[hash_alg],
        data[_RSA_SIGNATURE_HEADER.size :],
    ))


def _parse_tpmt_signature_fields(data: bytes) -> Signature:
    if len(data) < _SIGNATURE_HEADER.size:
        raise _truncated("TPMT_SIGNATURE", "sigAlg", _SIGNATURE_HEADER.size, 0, len(data))
    sig_alg_value, hash_alg_value = _SIGNATURE_HEADER.unpack_from(data)
    sig_alg = _SIGNATURE_ALGS.get(sig_alg_value)
    if sig_alg is None:
        raise _algorithm_error("TPMT_SIGNATURE", "sigAlg", sig_alg_value)
    if hash_alg_value not in _HASHES:
        raise _algorithm_error("TPMT_SIGNATURE", "signature.hash", hash_alg_value)

    if sig_alg == TpmAlg.ECDSA:
        r, offset = _tpm2b_at(
            data, 4, "TPMT_SIGNATURE", "signature.signatureR", _MAX_ECC_KEY_BYTES
        )
        s, offset = _tpm2b_at(
            data, offset, "TPMT_SIGNATURE", "signature.signatureS", _MAX_ECC_KEY_BYTES
        )
        signature = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    else:
        signature, offset = _tpm2b_at(
            data, 4, "TPMT_SIGNATURE", "signature.sig", _MAX_RSA_KEY_BYTES
        )
    if offset != len(data):
        raise _trailing("TPMT_SIGNATURE", offset, len(data))
    return Signature(sig_alg, _ALGS_BY_VALUE[hash_alg_value], signature)


# --- tpm2-tools PCR file -----------------------------------------------------------------

# The file is two C structures written with fwrite() on a little-endian host:
# TPML_PCR_SELECTION (u32 count, 16 slots of u16 hash, u8 sizeofSelect, 4 bitmap bytes and
# 1 padding byte), then u32 n and n TPML_DIGEST (u32 count, 8 slots of u16 size and 64 bytes).
_FILE_SELECTION: Final = struct.Struct("<I" + "HB4sx" * _MAX_PCR_BANKS)
_FILE_LIST_COUNT: Final = struct.Struct("<I")
_FILE_DIGEST_LIST: Final = struct.Struct("<I" + "H64s" * 8)
_FILE_HEADER_SIZE: Final = _FILE_SELECTION.size + _FILE_LIST_COUNT.size
_MAX_DIGEST_LISTS: Final = 64

PcrValues = Mapping[TpmAlg, Mapping[int, bytes]]


class PcrFile(NamedTuple):
    """The content of a tpm2-tools PCR file: the selection and the PCR value of each index."""

    selection: PcrSelection
    values: dict[TpmAlg, dict[int, bytes]]


def parse_pcr_file(data: bytes) -> PcrFile:
    """Parse a PCR file as written by ``tpm2_quote -o`` or rust-keylime; consume all bytes.

    Values are assigned to the selected PCRs in selection order (bank by bank, ascending
    index), however the writer split them into lists of at most 8 digests. Bytes in padding,
    in unused slots and after each digest's size are ignored, as tpm2_checkquote ignores them.
    """
    data = bytes(data)
    if len(data) < _FILE_HEADER_SIZE:
        raise ParseError(
            f"PCR file: truncated: {len(data)} bytes, expected at least {_FILE_HEADER_SIZE}",
            code="structure-truncated",
        )
    file_selection = _read_file_selection(data[: _FILE_SELECTION.size])
    values = _read_packed_values(data, file_selection)
    if values is None:
        values = _read_values(data, file_selection)
    return _new_tuple(PcrFile, (file_selection.selection, values))


class _FileSelection(NamedTuple):
    """Selection part of a PCR file, and the layout of the values after it.

    ``slots`` contains (bank, PCR index, digest size) per value in selection order. The packed
    layout is full lists of 8 values, then one list with the rest, as ``marshal_pcr_file`` and
    tpm2_quote 5.4 on swtpm 0.7.1 write it. ``packed_counts`` unpacks the list count, each
    list's count and each value's size, and ``packed_expected`` is what it returns for a valid
    file. ``packed_values`` unpacks the values.
    """

    selection: PcrSelection
    slots: tuple[tuple[TpmAlg, int, int], ...]
    packed_counts: struct.Struct
    packed_expected: tuple[int, ...]
    packed_values: struct.Struct


def _read_packed_values(
    data: bytes, file_selection: _FileSelection
) -> dict[TpmAlg, dict[int, bytes]] | None:
    """Read the values of a valid file in the packed layout, or return None.

    Returns None, and raises nothing, when the file has another size or other counts or
    value sizes than that layout, so that ``_read_values`` checks it. A file that this
    function accepts passes every check of ``_read_values``, and both return equal values.
    """
    if len(data) != file_selection.packed_values.size:
        return None
    if file_selection.packed_counts.unpack_from(data) != file_selection.packed_expected:
        return None
    digests = file_selection.packed_values.unpack_from(data)
    values: dict[TpmAlg, dict[int, bytes]] = {}
    start = 0
    for bank in file_selection.selection.banks:
        end = start + len(bank.pcrs)
        # The packed layout has exactly one digest per selected PCR, so the strict check,
        # about 0.2 µs per bank, is left out.
        values[bank.hash_alg] = dict(zip(bank.pcrs, digests[start:end]))  # noqa: B905
        start = end
    return values


def _read_values(data: bytes, file_selection: _FileSelection) -> dict[TpmAlg, dict[int, bytes]]:
    """Read the values of a file in any layout, raising ParseError at the first bad field."""
    digests = _read_file_digests(data)
    slots = file_selection.slots
    if len(digests) != len(slots):
        raise ParseError(
            f"PCR file: {len(digests)} PCR values for a selection of {len(slots)} PCRs",
            code="pcr-file-invalid",
            field="pcrValues",
        )
    values: dict[TpmAlg, dict[int, bytes]] = {
        bank.hash_alg: {} for bank in file_selection.selection.banks
    }
    for (hash_alg, index, size), digest in zip(slots, digests, strict=True):
        if len(digest) != size:
            raise ParseError(
                f"PCR file: value of {_HASHES[hash_alg].name} PCR {index} has "
                f"{len(digest)} bytes, expected {size}",
                code="pcr-file-invalid",
                field="pcrValues",
            )
        values[hash_alg][index] = digest
    return values


@functools.lru_cache(maxsize=256)
def _read_file_selection(header: bytes) -> _FileSelection:
    """Parse the selection part and derive the packed layout of its values."""
    fields = _FILE_SELECTION.unpack(header)
    count = fields[0]
    if count > _MAX_PCR_BANKS:
        raise ParseError(
            f"PCR file: selection count {count} exceeds the maximum {_MAX_PCR_BANKS}",
            code="size-invalid",
            field="pcrSelections.count",
        )
    banks = []
    for slot in range(count):
        hash_alg, size_of_select, bitmap = fields[1 + 3 * slot : 4 + 3 * slot]
        if hash_alg not in _HASHES:
            raise ParseError(
                f"PCR file: selection {slot} has unsupported bank {_alg_text(hash_alg)}",
                code="hash-algorithm-unsupported",
                field="pcrSelections.hash",
            )
        if size_of_select > _MAX_SIZE_OF_SELECT:
            raise ParseError(
                f"PCR file: selection {slot} sizeofSelect {size_of_select} exceeds "
                f"the maximum {_MAX_SIZE_OF_SELECT}",
                code="size-invalid",
                field="pcrSelections.sizeofSelect",
            )
        pcrs = _pcr_indexes(bitmap[:size_of_select])
        banks.append(PcrBank(_ALGS_BY_VALUE[hash_alg], pcrs, size_of_select))
    _reject_duplicate_banks(banks, "PCR file")
    slots = tuple(
        (bank.hash_alg, index, _HASHES[bank.hash_alg].size)
        for bank in banks
        for index in bank.pcrs
    )
    return _FileSelection(PcrSelection(tuple(banks)), slots, *_packed_layout(slots))


def _packed_layout(
    slots: tuple[tuple[TpmAlg, int, int], ...],
) -> tuple[struct.Struct, tuple[int, ...], struct.Struct]:
    """Build the structs that read the values of ``slots`` in the packed layout.

    Both structs start at offset 0 and skip the selection part, so each reads a whole file.
    """
    sizes = [size for _, _, size in slots]
    lists = [sizes[start : start + 8] for start in range(0, len(sizes), 8)]
    counts_format = ["<", f"{_FILE_SELECTION.size}x", "I"]
    values_format = ["<", f"{_FILE_HEADER_SIZE}x"]
    expected = [len(lists)]
    for chunk in lists:
        counts_format.append("I")
        values_format.append("4x")
        expected.append(len(chunk))
        for size in chunk:
            counts_format.append(f"H{_MAX_DIGEST}x")
            values_format.append(f"2x{size}s{_MAX_DIGEST - size}x")
            expected.append(size)
        unused = (_MAX_DIGEST + 2) * (8 - len(chunk))
        counts_format.append(f"{unused}x")
        values_format.append(f"{unused}x")
    return (
        struct.Struct("".join(counts_format)),
        tuple(expected),
        struct.Struct("".join(values_format)),
    )


def _read_file_digests(data: bytes) -> list[bytes]:
    (list_count,) = _FILE_LIST_COUNT.unpack_from(data, _FILE_SELECTION.size)
    expected_size = _FILE_HEADER_SIZE + list_count * _FILE_DIGEST_LIST.size
    if list_count > _MAX_DIGEST_LISTS or len(data) != expected_size:
        raise ParseError(
            f"PCR file: {len(data)} bytes for {list_count} digest lists, expected "
            f"{expected_size} bytes and at most {_MAX_DIGEST_LISTS} lists",
            code="structure-truncated" if len(data) < expected_size else "trailing-bytes",
        )
    digests: list[bytes] = []
    for list_index in range(list_count):
        fields = _FILE_DIGEST_LIST.unpack_from(
            data, _FILE_HEADER_SIZE + list_index * _FILE_DIGEST_LIST.size
        )
        count = fields[0]
        if count > 8:
            raise ParseError(
                f"PCR file: digest list {list_index} count {count} exceeds the maximum 8",
                code="size-invalid",
                field="pcrValues.count",
            )
        for slot in range(count):
            size, buffer = fields[1 + 2 * slot], fields[2 + 2 * slot]
            if size > _MAX_DIGEST:
                raise ParseError(
                    f"PCR file: digest list {list_index} slot {slot} size {size} exceeds the "
                    f"maximum {_MAX_DIGEST}",
                    code="size-invalid",
                    field="pcrValues.size",
                )
            digests.append(buffer[:size])
    return digests


def marshal_pcr_file(selection: PcrSelection, values: PcrValues) -> bytes:
    """Write a PCR file in the tpm2-tools layout, 8 values per digest list.

    Raises KeyError if ``values`` lacks a PCR the selection names.
    """
    if len(selection.banks) > _MAX_PCR_BANKS:
        raise ValueError(f"a PCR file contains at most {_MAX_PCR_BANKS} banks")
    slots: list[Any] = [len(selection.banks)]
    for bank in selection.banks:
        slots += [bank.hash_alg, bank.size_of_select, _pcr_bitmap(bank.pcrs, 4)]
    for _ in range(_MAX_PCR_BANKS - len(selection.banks)):
        slots += [0, 0, bytes(4)]
    ordered = [values[bank.hash_alg][index] for bank in selection.banks for index in bank.pcrs]

    lists = [ordered[start : start + 8] for start in range(0, len(ordered), 8)]
    parts = [_FILE_SELECTION.pack(*slots), _FILE_LIST_COUNT.pack(len(lists))]
    for chunk in lists:
        entries: list[Any] = [len(chunk)]
        for digest in chunk + [b""] * (8 - len(chunk)):
            entries += [len(digest), digest]
        parts.append(_FILE_DIGEST_LIST.pack(*entries))
    return b"".join(parts)


# --- Keylime quote string ----------------------------------------------------------------


@dataclass(frozen=True)
class KeylimeQuote:
    """The three parts of a Keylime agent quote, as bytes and parsed."""

    attest_bytes: bytes
    signature_bytes: bytes
    pcr_file_bytes: bytes
    attest: Attest
    signature: Signature
    pcr_file: PcrFile


def parse_keylime_quote(text: str) -> KeylimeQuote:
    """Parse ``r<b64 TPMS_ATTEST>:<b64 TPMT_SIGNATURE>:<b64 PCR file>`` and each of its parts."""
    if not text.startswith("r"):
        raise ParseError(
            f"Keylime quote: starts with {text[:1]!r}, expected 'r'",
            code="keylime-quote-invalid",
        )
    parts = text[1:].strip().split(":")
    if len(parts) != 3:
        raise ParseError(
            f"Keylime quote: {len(parts)} ':'-separated parts, expected 3 "
            "(TPMS_ATTEST, TPMT_SIGNATURE, PCR file)",
            code="keylime-quote-invalid",
        )
    attest_bytes, signature_bytes, pcr_file_bytes = (
        _b64decode(part, name)
        for part, name in zip(parts, ("TPMS_ATTEST", "TPMT_SIGNATURE", "PCR file"), strict=True)
    )
    return KeylimeQuote(
        attest_bytes=attest_bytes,
        signature_bytes=signature_bytes,
        pcr_file_bytes=pcr_file_bytes,
        attest=parse_tpms_attest(attest_bytes),
        signature=parse_tpmt_signature(signature_bytes),
        pcr_file=parse_pcr_file(pcr_file_bytes),
    )


def _b64decode(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ParseError(
            f"Keylime quote: the {name} part is not valid base64",
            code="base64-invalid",
            field=name,
        ) from None


def format_keylime_quote(attest: bytes, signature: bytes, pcr_file: bytes) -> str:
    """Format the Keylime agent quote string from TPMS_ATTEST, TPMT_SIGNATURE and PCR file."""
    encoded = (base64.b64encode(part).decode("ascii") for part in (attest, signature, pcr_file))
    return "r" + ":".join(encoded)
