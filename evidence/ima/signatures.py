"""IMA file signatures: the ``sig`` field of ``ima-sig`` entries.

The field contains the file's ``security.ima`` extended attribute. The Linux kernel
(``struct signature_v2_hdr`` in ``security/integrity/integrity.h``) and ima-evm-utils lay a
version 2 signature out big-endian as:

====== ===================================================================
bytes  field
====== ===================================================================
1      type: 0x03 (``EVM_IMA_XATTR_DIGSIG``)
1      version: 2
1      hash algorithm, numbered as in Linux ``include/uapi/linux/hash_info.h``
4      key id: the last 4 bytes of the signing key's identifier (see ``ima_key_id``)
2      signature size in bytes
n      signature over the file digest itself: RSA PKCS#1 v1.5, or ECDSA as a DER
       ``Ecdsa-Sig-Value`` (70 to 72 bytes for P-256)
====== ===================================================================

Newer kernels write the file's ``security.evm`` EVM portable signature (type 0x05) into the
field when ``security.ima`` contains no signature. That signature covers the EVM digest of the
file's metadata, not the file digest, so it cannot be verified from the entry and is rejected
as unsupported.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from evidence.errors import ParseError, VerificationError
from evidence.ima.entry import TEMPLATE_IMA_SIG, ImaEntry

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# evm_ima_xattr_type EVM_IMA_XATTR_DIGSIG: the attribute contains a signature.
XATTR_DIGSIG = 3
SIGNATURE_VERSION_2 = 2
_HEADER = struct.Struct(">BBB4sH")

# The kernel's enum hash_algo, which the header's hash algorithm byte indexes.
HASH_ALGORITHM_BY_ID = {
    0: "md4",
    1: "md5",
    2: "sha1",
    3: "rmd160",
    4: "sha256",
    5: "sha384",
    6: "sha512",
    7: "sha224",
    8: "rmd128",
    9: "rmd256",
    10: "rmd320",
    11: "wp256",
    12: "wp384",
    13: "wp512",
    14: "tgr128",
    15: "tgr160",
    16: "tgr192",
    17: "sm3",
    18: "streebog256",
    19: "streebog512",
    20: "sha3-256",
    21: "sha3-384",
    22: "sha3-512",
}

# The hash algorithms whose signatures are verified here. MD5 is left out on purpose, because
# a signature over an MD5 digest proves nothing.
_CRYPTOGRAPHY_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
}


@dataclass(frozen=True, slots=True)
class ImaSignature:
    """A version 2 IMA signature, split into its header fields and the signature bytes."""

    hash_algorithm: str
    key_id: bytes
    """Last 4 bytes of the signing key's identifier, as ``ima_key_id`` computes it."""
    signature: bytes


def parse_ima_signature(unverified_signature: bytes) -> ImaSignature:
    """Parse the ``sig`` field of an ima-sig entry.

    Raises ParseError with code ``ima-signature-malformed`` when the header is short or its
    size field disagrees with the bytes that follow it, and ``ima-signature-unsupported`` for
    another type or version, or a hash algorithm that cannot be verified. A byte-swapped size,
    as some signing tools wrote, is malformed here, although the entry itself still replays.
    """
    if len(unverified_signature) < _HEADER.size:
        raise ParseError(
            f"IMA signature has {len(unverified_signature)} bytes, expected at least the "
            f"{_HEADER.size}-byte header",
            code="ima-signature-malformed",
        )
    kind, version, algorithm_id, key_id, size = _HEADER.unpack_from(unverified_signature)

    if kind != XATTR_DIGSIG or version != SIGNATURE_VERSION_2:
        raise ParseError(
            f"IMA signature has type {kind} version {version}, expected type {XATTR_DIGSIG} "
            f"version {SIGNATURE_VERSION_2}",
            code="ima-signature-unsupported",
        )

    signature = unverified_signature[_HEADER.size :]
    if size != len(signature):
        raise ParseError(
            f"IMA signature size field is {size}, but {len(signature)} signature bytes follow",
            code="ima-signature-malformed",
        )

    # The kernel's asymmetric_verify rejects an id it does not define with ENOPKG, not EBADMSG.
    # Newer kernels define more ids, so an unknown id is unsupported rather than malformed.
    algorithm = HASH_ALGORITHM_BY_ID.get(algorithm_id)
    if algorithm not in _CRYPTOGRAPHY_HASHES:
        named = f"{algorithm_id} ({algorithm})" if algorithm else f"id {algorithm_id}"
        raise ParseError(
            f"IMA signature hash algorithm {named} is not supported, expected one of "
            f"{', '.join(_CRYPTOGRAPHY_HASHES)}",
            code="ima-signature-unsupported",
        )
    return ImaSignature(algorithm, key_id, signature)


def ima_key_id(key: PublicKey | x509.Certificate) -> bytes:
    """Return the 4-byte key id that IMA signatures made with ``key`` carry.

    For a certificate it is the end of its Subject Key Identifier. For a bare key, or a
    certificate without a usable Subject Key Identifier, it is the end of the SHA-1 of the
    ``subjectPublicKey`` bit string (RFC 5280 method 1): the PKCS#1 ``RSAPublicKey`` DER for
    RSA, the uncompressed X9.62 point for EC keys. ima-evm-utils (``calc_keyid_v2``) and
    Keylime 7.14.3 compute it the same way. It is not the SHA-1 of the whole DER
    SubjectPublicKeyInfo. Raises VerificationError with code ``ima-signature-key-unsupported``
    for a key that is neither RSA nor EC.
    """
    if isinstance(key, x509.Certificate):
        subject_key_id = _subject_key_id(key)
        if subject_key_id is not None:
            return subject_key_id
        key = _verification_key(key.public_key())
    return x509.SubjectKeyIdentifier.from_public_key(_verification_key(key)).digest[-4:]


def verify_ima_signature(
    signature: ImaSignature,
    digest: bytes,
    digest_algorithm: str,
    key: PublicKey,
    *,
    key_id: bytes | None = None,
) -> None:
    """Verify ``signature`` over a file digest with ``key``; raise VerificationError if it fails.

    ``digest`` and ``digest_algorithm`` come from the entry's d-ng field. ``key_id``, when
    given, is the id the key is known by. The steps follow the kernel's ``asymmetric_verify``:

    1. The signature's hash algorithm must be the algorithm of the logged file digest
       (``ima-signature-algorithm-mismatch``) and one that can be verified
       (``ima-signature-algorithm-unsupported``). The digest must have that algorithm's
       size (``ima-signature-invalid``).
    2. The key id in the header must be ``key_id`` (``ima-signature-key-mismatch``), because
       the kernel only verifies with the key that the header names.
    3. The key must be RSA or EC (``ima-signature-key-unsupported``).
    4. The signature must verify over the digest as a prehashed value, RSA PKCS#1 v1.5 or
       ECDSA (``ima-signature-invalid``).
    """
    if signature.hash_algorithm != digest_algorithm:
        raise VerificationError(
            f"IMA signature is over a {signature.hash_algorithm} digest but the file digest "
            f"is {digest_algorithm}",
            code="ima-signature-algorithm-mismatch",
        )
    hash_class = _CRYPTOGRAPHY_HASHES.get(digest_algorithm)
    if hash_class is None:
        raise VerificationError(
            f"IMA signatures over {digest_algorithm} digests cannot be verified, expected one "
            f"of {', '.join(_CRYPTOGRAPHY_HASHES)}",
            code="ima-signature-algorithm-unsupported",
        )
    if len(digest) != hash_class.digest_size:
        raise VerificationError(
            f"file digest is {len(digest)} bytes, expected {hash_class.digest_size} bytes "
            f"for {digest_algorithm}",
            code="ima-signature-invalid",
        )

    if key_id is not None and signature.key_id != key_id:
        raise VerificationError(
            f"IMA signature names key id {signature.key_id.hex()}, but the key given has id {key_id.hex()}",
            code="ima-signature-key-mismatch",
        )

    key = _verification_key(key)

    prehashed = Prehashed(hash_class())
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature.signature, digest, padding.PKCS1v15(), prehashed)
        else:
            key.verify(signature.signature, digest, ec.ECDSA(prehashed))
    except InvalidSignature:
        raise VerificationError(
            f"IMA signature does not verify with key {signature.key_id.hex()}",
            code="ima-signature-invalid",
        ) from None


def verify_entry_signature(entry: ImaEntry, key: PublicKey) -> None:
    """Parse and verify the signature of an ima-sig ``entry`` with ``key``.

    Raises ParseError for a missing or malformed signature and VerificationError for one that
    does not verify.
    """
    if entry.template != TEMPLATE_IMA_SIG or not entry.signature:
        raise ParseError(
            f"IMA entry {entry.index} ({entry.path!r}) carries no signature",
            code="ima-signature-missing",
        )
    verify_ima_signature(parse_ima_signature(entry.signature), entry.digest, entry.digest_algorithm, key)


def _subject_key_id(certificate: x509.Certificate) -> bytes | None:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        # ValueError: the certificate's extensions cannot be parsed.
        return None
    digest = extension.value.digest
    if len(digest) < 4:
        return None
    return digest[-4:]


def _verification_key(key: object) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    raise VerificationError(
        f"IMA signature keys are RSA or ECDSA, got {type(key).__name__}",
        code="ima-signature-key-unsupported",
    )
