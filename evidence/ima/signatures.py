"""IMA file signatures: the ``sig`` field of ``ima-sig`` entries.

The field contains the file's ``security.ima`` extended attribute. A version 2 signature is a
9-byte header (type 3, version 2, hash algorithm id, 4-byte key id, u16 big-endian signature
size) followed by the signature: RSA PKCS#1 v1.5 or DER-encoded ECDSA over the file digest
itself, which is why an ECDSA signature is 70, 71 or 72 bytes long for P-256.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from evidence.errors import ParseError, VerificationError
from evidence.ima.entry import TEMPLATE_IMA_SIG, ImaEntry

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

VerificationKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class ImaSignature:
    """A version 2 IMA signature, split into its header fields and the signature bytes."""

    hash_algorithm: str
    key_id: bytes
    """Last 4 bytes of the signing key's subject key identifier."""
    signature: bytes


def parse_ima_signature(unverified_signature: bytes) -> ImaSignature:
    """Parse the ``sig`` field of an ima-sig entry; raise ParseError where it is malformed.

    The size field must match the bytes that follow the header. A byte-swapped size, as some
    signing tools wrote, is rejected here, although the entry itself still replays.
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
    algorithm = HASH_ALGORITHM_BY_ID.get(algorithm_id)
    if algorithm is None:
        raise ParseError(
            f"IMA signature names hash algorithm id {algorithm_id}, which the kernel does not define",
            code="ima-signature-malformed",
        )
    signature = unverified_signature[_HEADER.size :]
    if size != len(signature):
        raise ParseError(
            f"IMA signature size field is {size}, but {len(signature)} signature bytes follow",
            code="ima-signature-malformed",
        )
    return ImaSignature(algorithm, key_id, signature)


def ima_key_id(key: VerificationKey | x509.Certificate) -> bytes:
    """Return the 4-byte key id that IMA signatures made with ``key`` carry.

    It is the end of the certificate's subject key identifier, or for a bare key the end of
    the SHA-1 of its subjectPublicKey (RFC 5280 method 1), which ima-evm-utils also uses.
    """
    if isinstance(key, x509.Certificate):
        try:
            extension = key.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            return extension.value.digest[-4:]
        except x509.ExtensionNotFound:
            key = _verification_key(key.public_key())
    return x509.SubjectKeyIdentifier.from_public_key(key).digest[-4:]


def verify_ima_signature(
    signature: ImaSignature, digest_algorithm: str, digest: bytes, key: VerificationKey
) -> None:
    """Verify ``signature`` over a file digest with ``key``; raise VerificationError if it fails.

    ``digest_algorithm`` and ``digest`` come from the entry's d-ng field; the signature must
    name the same algorithm.
    """
    if signature.hash_algorithm != digest_algorithm:
        raise VerificationError(
            f"IMA signature is over a {signature.hash_algorithm} digest, but the entry logs "
            f"a {digest_algorithm} digest",
            code="ima-signature-algorithm-mismatch",
        )
    hash_class = _CRYPTOGRAPHY_HASHES.get(digest_algorithm)
    if hash_class is None or len(digest) != hash_class.digest_size:
        raise VerificationError(
            f"IMA signatures over {digest_algorithm} digests cannot be verified here",
            code="ima-signature-algorithm-unsupported",
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
            f"IMA signature with key id {signature.key_id.hex()} does not verify over "
            f"{digest_algorithm}:{digest.hex()}",
            code="ima-signature-invalid",
        ) from None


def verify_entry_signature(entry: ImaEntry, key: VerificationKey) -> None:
    """Parse and verify the signature of an ima-sig ``entry`` with ``key``.

    Raises ParseError for a missing or malformed signature and VerificationError for one that
    does not verify.
    """
    if entry.template != TEMPLATE_IMA_SIG or not entry.signature:
        raise ParseError(
            f"IMA entry {entry.index} ({entry.path!r}) carries no signature",
            code="ima-signature-missing",
        )
    verify_ima_signature(parse_ima_signature(entry.signature), entry.digest_algorithm, entry.digest, key)


def _verification_key(key: object) -> VerificationKey:
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    raise VerificationError(
        f"IMA signature keys are RSA or ECDSA, got {type(key).__name__}",
        code="ima-signature-key-unsupported",
    )
