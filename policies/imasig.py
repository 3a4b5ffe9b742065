"""IMA file signature keys of a runtime policy, and signature checks that raise PolicyError.

``evidence.ima.signatures`` parses and verifies the signature v2 values of ``ima-sig`` entries
and computes key ids. This module adds what the runtime policy needs on top:

- ``VerificationKey``, a key with its key id as a 32-bit integer, the form that policy
  documents, learned keyrings and Keylime 7.14.3 use;
- loading those keys from a policy's ``verification-keys`` and from ``ima-buf`` keyring
  entries;
- ``parse_ima_signature`` and ``verify_ima_signature``, which call the evidence functions and
  raise PolicyError with the same message instead of an EvidenceError.

Public API::

    parse_ima_signature(unverified_signature: bytes) -> KeyedImaSignature
    key_id_v2(key: PublicKey | x509.Certificate) -> int
    load_verification_key(unverified_data: bytes, *, key_id: int | None = None)
        -> VerificationKey
    try_load_buffer_key(unverified_buffer: bytes) -> VerificationKey | None
    verify_ima_signature(signature: KeyedImaSignature, file_digest: bytes,
                         digest_algorithm: str, key: VerificationKey) -> None
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from evidence.errors import ParseError, VerificationError
from evidence.ima import signatures
from evidence.ima.signatures import ImaSignature, PublicKey, ima_key_id
from policies.errors import IMA_KEY_UNSUPPORTED, IMA_SIGNATURE_INVALID, PolicyError


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


@dataclass(frozen=True)
class KeyedImaSignature:
    """A parsed IMA signature with its header key id as an integer, to look up keys by."""

    key_id: int
    parsed: ImaSignature


def parse_ima_signature(unverified_signature: bytes) -> KeyedImaSignature:
    """Parse a ``security.ima`` signature v2 value with ``evidence.ima.parse_ima_signature``.

    Raises PolicyError with that function's code: ``ima-signature-malformed`` or
    ``ima-signature-unsupported``.
    """
    try:
        parsed = signatures.parse_ima_signature(unverified_signature)
    except ParseError as exc:
        raise PolicyError(exc.message, code=exc.code) from exc
    return KeyedImaSignature(int.from_bytes(parsed.key_id, "big"), parsed)


def key_id_v2(key: PublicKey | x509.Certificate) -> int:
    """Compute the signature v2 key id of a key or certificate, as ``ima_key_id`` defines it."""
    return int.from_bytes(ima_key_id(key), "big")


def load_verification_key(unverified_data: bytes, *, key_id: int | None = None) -> VerificationKey:
    """Load a verification key from an X.509 certificate or a public key, DER or PEM.

    The key id comes from ``key_id`` when it is given and not 0, else from ``key_id_v2``: the
    certificate's Subject Key Identifier, or the SHA-1 of the key. Raises PolicyError with code
    ``ima-key-unsupported`` when the data contains no RSA or EC public key.
    """
    public_key, certificate = _load_public_key(unverified_data)
    if key_id:
        return VerificationKey(key_id, public_key)
    return VerificationKey(key_id_v2(certificate or public_key), public_key)


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
        return VerificationKey(key_id_v2(certificate), public_key)

    try:
        loaded = serialization.load_der_public_key(unverified_buffer)
    except (ValueError, UnsupportedAlgorithm):
        return None
    public_key = _supported_key(loaded)
    return VerificationKey(key_id_v2(public_key), public_key)


def verify_ima_signature(
    signature: KeyedImaSignature, file_digest: bytes, digest_algorithm: str, key: VerificationKey
) -> None:
    """Verify a parsed signature over a file digest with one key.

    ``evidence.ima.verify_ima_signature`` does the checks, including that the header names
    ``key.key_id``. Raises PolicyError with code ``ima-signature-invalid`` on any failure.
    """
    try:
        signatures.verify_ima_signature(
            signature.parsed,
            file_digest,
            digest_algorithm,
            key.public_key,
            key_id=key.key_id.to_bytes(4, "big"),
        )
    except VerificationError as exc:
        raise PolicyError(exc.message, code=IMA_SIGNATURE_INVALID) from exc


def _load_public_key(unverified_data: bytes) -> tuple[PublicKey, x509.Certificate | None]:
    """Load a public key and the certificate it came from, if any."""
    certificate = _try_certificate(unverified_data)
    if certificate is not None:
        return _supported_key(_certificate_public_key(certificate)), certificate

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
