"""Verify IMA file signatures (signature format version 2).

An ``ima-sig`` entry of an IMA measurement list carries the file's ``security.ima`` extended
attribute when it contains a signature. The Linux kernel (``struct signature_v2_hdr`` in
``security/integrity/integrity.h``) and ima-evm-utils lay it out big-endian as:

====== ===================================================================
bytes  field
====== ===================================================================
1      type: 0x03 (``EVM_IMA_XATTR_DIGSIG``) or 0x05 (``EVM_XATTR_PORTABLE_DIGSIG``)
1      version: 2
1      hash algorithm, numbered as in Linux ``include/uapi/linux/hash_info.h``
4      key id: the last 4 bytes of the signing key's identifier (below)
2      signature size in bytes
n      signature over the file digest: RSA PKCS#1 v1.5, or ECDSA as a DER
       ``Ecdsa-Sig-Value`` (70 to 72 bytes for P-256)
====== ===================================================================

The key id is the last 4 bytes of the Subject Key Identifier of the X.509 certificate that
carries the key. Without a certificate, or for a certificate without that extension,
ima-evm-utils (``calc_keyid_v2``) and Keylime 7.14.3 use the last 4 bytes of the SHA-1 of the
``subjectPublicKey`` bit string: the PKCS#1 ``RSAPublicKey`` DER for RSA, the uncompressed
X9.62 point for EC keys. It is not the SHA-1 of the whole DER SubjectPublicKeyInfo.

Public API::

    parse_ima_signature(unverified_signature: bytes) -> ImaSignature
    key_id_v2(public_key: PublicKey) -> int
    load_verification_key(unverified_data: bytes, *, key_id: int | None = None)
        -> VerificationKey
    try_load_buffer_key(unverified_buffer: bytes) -> VerificationKey | None
    verify_ima_signature(signature: ImaSignature, file_digest: bytes,
                         digest_algorithm: str, key: VerificationKey) -> None
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from policies.errors import (
    IMA_KEY_UNSUPPORTED,
    IMA_SIGNATURE_INVALID,
    IMA_SIGNATURE_MALFORMED,
    IMA_SIGNATURE_UNSUPPORTED,
    PolicyError,
)

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

XATTR_TYPE_DIGSIG = 0x03
XATTR_TYPE_PORTABLE_DIGSIG = 0x05
SIGNATURE_VERSION_2 = 2

_HEADER = struct.Struct(">BBBIH")

# Linux hash_info numbers of the algorithms that ``cryptography`` can verify with. MD5 (1) is
# left out on purpose: a signature over an MD5 digest proves nothing.
_HASH_BY_LINUX_ID: dict[int, hashes.HashAlgorithm] = {
    2: hashes.SHA1(),  # noqa: S303 - IMA signs SHA-1 file digests; the check must read them
    4: hashes.SHA256(),
    5: hashes.SHA384(),
    6: hashes.SHA512(),
    7: hashes.SHA224(),
}
_HASH_BY_NAME: dict[str, hashes.HashAlgorithm] = {
    algorithm.name: algorithm for algorithm in _HASH_BY_LINUX_ID.values()
}


@dataclass(frozen=True)
class ImaSignature:
    """A parsed signature v2 header and the signature bytes that follow it."""

    xattr_type: int
    hash_algorithm: str
    key_id: int
    signature: bytes


@dataclass(frozen=True)
class VerificationKey:
    """A public key that may sign files, with the key id that signatures name it by."""

    key_id: int
    public_key: PublicKey

    def spki_der(self) -> bytes:
        """Return the key as a DER SubjectPublicKeyInfo."""
        return self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def parse_ima_signature(unverified_signature: bytes) -> ImaSignature:
    """Parse a ``security.ima`` signature v2 value.

    Raises PolicyError with code ``ima-signature-malformed`` when the header is short or its
    size field disagrees with the bytes present, and ``ima-signature-unsupported`` for another
    type, another version or a hash algorithm that cannot be verified.
    """
    if len(unverified_signature) < _HEADER.size:
        raise PolicyError(
            f"IMA signature is {len(unverified_signature)} bytes, shorter than the "
            f"{_HEADER.size}-byte signature v2 header",
            code=IMA_SIGNATURE_MALFORMED,
        )
    xattr_type, version, hash_id, key_id, size = _HEADER.unpack_from(unverified_signature)

    if xattr_type not in (XATTR_TYPE_DIGSIG, XATTR_TYPE_PORTABLE_DIGSIG):
        raise PolicyError(
            f"IMA signature type is 0x{xattr_type:02x}, expected 0x03 (digital signature) "
            "or 0x05 (portable digital signature)",
            code=IMA_SIGNATURE_UNSUPPORTED,
        )
    if version != SIGNATURE_VERSION_2:
        raise PolicyError(f"IMA signature version is {version}, expected 2", code=IMA_SIGNATURE_UNSUPPORTED)

    body = unverified_signature[_HEADER.size :]
    if len(body) != size:
        raise PolicyError(
            f"IMA signature header gives a size of {size} bytes but {len(body)} bytes follow it",
            code=IMA_SIGNATURE_MALFORMED,
        )

    algorithm = _HASH_BY_LINUX_ID.get(hash_id)
    if algorithm is None:
        raise PolicyError(
            f"IMA signature hash algorithm {hash_id} is not supported "
            f"(supported: {sorted(_HASH_BY_LINUX_ID)})",
            code=IMA_SIGNATURE_UNSUPPORTED,
        )
    return ImaSignature(xattr_type, algorithm.name, key_id, body)


def key_id_v2(public_key: PublicKey) -> int:
    """Compute the signature v2 key id of a public key that has no certificate."""
    if isinstance(public_key, rsa.RSAPublicKey):
        key_bits = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        key_bits = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    # SHA-1 here only names the key, as the kernel and ima-evm-utils do; it protects nothing.
    digest = hashlib.sha1(key_bits, usedforsecurity=False).digest()
    return int.from_bytes(digest[-4:], "big")


def load_verification_key(unverified_data: bytes, *, key_id: int | None = None) -> VerificationKey:
    """Load a verification key from an X.509 certificate or a public key, DER or PEM.

    The key id comes from ``key_id`` when it is given and not 0, else from the certificate's
    Subject Key Identifier, else from ``key_id_v2``. Raises PolicyError with code
    ``ima-key-unsupported`` when the data contains no RSA or EC public key.
    """
    public_key, subject_key_id = _load_public_key(unverified_data)
    if key_id:
        return VerificationKey(key_id, public_key)
    if subject_key_id is not None:
        return VerificationKey(subject_key_id, public_key)
    return VerificationKey(key_id_v2(public_key), public_key)


def try_load_buffer_key(unverified_buffer: bytes) -> VerificationKey | None:
    """Return the key in an ``ima-buf`` buffer, or None if the buffer contains no key.

    ``ima-buf`` entries named after a keyring carry the DER X.509 certificate (or DER public
    key) that the kernel loaded into that keyring. Raises PolicyError with code
    ``ima-key-unsupported`` for a certificate or key that is neither RSA nor EC.
    """
    try:
        certificate = x509.load_der_x509_certificate(unverified_buffer)
    except ValueError:
        certificate = None
    if certificate is not None:
        public_key = _supported_key(_certificate_public_key(certificate))
        subject_key_id = _subject_key_id(certificate)
        if subject_key_id is None:
            return VerificationKey(key_id_v2(public_key), public_key)
        return VerificationKey(subject_key_id, public_key)

    try:
        loaded = serialization.load_der_public_key(unverified_buffer)
    except (ValueError, UnsupportedAlgorithm):
        return None
    public_key = _supported_key(loaded)
    return VerificationKey(key_id_v2(public_key), public_key)


def verify_ima_signature(
    signature: ImaSignature, file_digest: bytes, digest_algorithm: str, key: VerificationKey
) -> None:
    """Verify a parsed signature over a file digest with one key.

    The steps follow the kernel's ``asymmetric_verify``:

    1. The signature's hash algorithm must be the algorithm of the logged file digest.
    2. The key id in the header must be the key's id.
    3. The signature must verify over the digest as a prehashed value (RSA PKCS#1 v1.5 or
       ECDSA).

    Raises PolicyError with code ``ima-signature-invalid`` on any failure.
    """
    if signature.hash_algorithm != digest_algorithm:
        raise PolicyError(
            f"IMA signature is over a {signature.hash_algorithm} digest but the file digest "
            f"is {digest_algorithm}",
            code=IMA_SIGNATURE_INVALID,
        )

    if signature.key_id != key.key_id:
        raise PolicyError(
            f"IMA signature names key id {signature.key_id:08x}, the key given has id {key.key_id:08x}",
            code=IMA_SIGNATURE_INVALID,
        )

    algorithm = _HASH_BY_NAME[digest_algorithm]
    try:
        if isinstance(key.public_key, rsa.RSAPublicKey):
            key.public_key.verify(signature.signature, file_digest, padding.PKCS1v15(), Prehashed(algorithm))
        else:
            key.public_key.verify(signature.signature, file_digest, ec.ECDSA(Prehashed(algorithm)))
    except InvalidSignature:
        raise PolicyError(
            f"IMA signature does not verify with key {key.key_id:08x}",
            code=IMA_SIGNATURE_INVALID,
        ) from None
    except ValueError as exc:
        # Raised for a digest whose length does not fit the algorithm.
        raise PolicyError(f"IMA signature cannot be checked: {exc}", code=IMA_SIGNATURE_INVALID) from exc


def _load_public_key(unverified_data: bytes) -> tuple[PublicKey, int | None]:
    """Load a public key and, for a certificate, its Subject Key Identifier key id."""
    certificate = _try_certificate(unverified_data)
    if certificate is not None:
        public_key = _supported_key(_certificate_public_key(certificate))
        return public_key, _subject_key_id(certificate)

    for load in (serialization.load_der_public_key, serialization.load_pem_public_key):
        try:
            return _supported_key(load(unverified_data)), None
        except (ValueError, UnsupportedAlgorithm):
            continue
    raise PolicyError(
        "data is neither an X.509 certificate nor a public key (DER or PEM)",
        code=IMA_KEY_UNSUPPORTED,
    )


def _try_certificate(unverified_data: bytes) -> x509.Certificate | None:
    for load in (x509.load_der_x509_certificate, x509.load_pem_x509_certificate):
        try:
            return load(unverified_data)
        except ValueError:
            continue
    return None


def _certificate_public_key(certificate: x509.Certificate) -> object:
    try:
        return certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PolicyError(
            f"certificate public key cannot be loaded: {exc}", code=IMA_KEY_UNSUPPORTED
        ) from exc


def _supported_key(public_key: object) -> PublicKey:
    if isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return public_key
    raise PolicyError(
        f"key type {type(public_key).__name__} is not supported, expected RSA or EC",
        code=IMA_KEY_UNSUPPORTED,
    )


def _subject_key_id(certificate: x509.Certificate) -> int | None:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        return None
    digest = extension.value.digest
    if len(digest) < 4:
        return None
    return int.from_bytes(digest[-4:], "big")
