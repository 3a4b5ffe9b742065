"""Keys, certificates and IMA signatures made up for the runtime policy tests."""

from __future__ import annotations

import base64
import datetime as dt
import json
import struct
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from evidence.ima.signatures import PublicKey
from policies.imasig import key_id_v2

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_HASH_IDS = {"sha1": 2, "sha256": 4, "sha384": 5, "sha512": 6}
_HASHES = {
    "sha1": hashes.SHA1(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def raw_signature(key: PrivateKey, digest: bytes, algorithm: str = "sha256") -> bytes:
    prehashed = Prehashed(_HASHES[algorithm])
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), prehashed)
    return key.sign(digest, ec.ECDSA(prehashed))


def ecdsa_signature_of_length(key: ec.EllipticCurvePrivateKey, digest: bytes, length: int) -> bytes:
    """Sign until the DER signature has ``length`` bytes (70, 71 or 72 for P-256)."""
    for _ in range(2000):
        signature = raw_signature(key, digest)
        if len(signature) == length:
            return signature
    raise AssertionError(f"no {length}-byte ECDSA signature in 2000 tries")


def ima_signature(
    signature: bytes, key_id: int, algorithm: str = "sha256", *, xattr_type: int = 3, version: int = 2
) -> bytes:
    """Wrap a raw signature in the signature v2 header."""
    return (
        struct.pack(">BBBIH", xattr_type, version, _HASH_IDS[algorithm], key_id, len(signature)) + signature
    )


def sign_digest(
    key: PrivateKey, digest: bytes, algorithm: str = "sha256", *, key_id: int | None = None
) -> bytes:
    """Return the security.ima value evmctl would write for a file with this digest."""
    if key_id is None:
        key_id = key_id_v2(key.public_key())
    return ima_signature(raw_signature(key, digest, algorithm), key_id, algorithm)


def spki_der(key: PrivateKey | PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_der(key: PrivateKey, *, subject_key_id: bytes | None = None, with_skid: bool = True) -> bytes:
    """Return a self-signed DER certificate for the key, as the kernel logs keyring keys."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust test IMA key")])
    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
    )
    if with_skid:
        skid = (
            x509.SubjectKeyIdentifier(subject_key_id)
            if subject_key_id is not None
            else x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        )
        builder = builder.add_extension(skid, critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.DER)


def verification_keys_text(
    keys: Sequence[PrivateKey | PublicKey], key_ids: Sequence[int] | None = None
) -> str:
    """Return a policy's verification-keys JSON text for these keys."""
    document: dict[str, object] = {
        "meta": {"version": 1},
        "keyids": list(key_ids) if key_ids is not None else [],
        "pubkeys": [base64.b64encode(spki_der(key)).decode() for key in keys],
    }
    return json.dumps(document)


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_public(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
