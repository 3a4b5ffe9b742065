"""Software devices for registrar tests: TPM public areas built by hand, EK certificates from
test CAs, and ActivateCredential computed with the EK's private key.

The software ActivateCredential mirrors what a TPM does (TPM 2.0 Part 1, "Credential
Protection"), so API tests can complete the challenge without swtpm. The swtpm tests check the
same flow against a real TPM.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from evidence.credential import kdfa, kdfe, parse_credential_file
from evidence.tpm import ObjectAttributes, TpmAlg, parse_tpm2b_public
from tests.support import ekca

A = ObjectAttributes
AK_ATTRIBUTES = (
    A.RESTRICTED | A.SIGN_ENCRYPT | A.FIXED_TPM | A.FIXED_PARENT | A.SENSITIVE_DATA_ORIGIN
    | A.USER_WITH_AUTH
)
EK_ATTRIBUTES = (
    A.FIXED_TPM | A.FIXED_PARENT | A.SENSITIVE_DATA_ORIGIN | A.ADMIN_WITH_POLICY | A.RESTRICTED
    | A.DECRYPT
)
_CURVE_IDS = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}
_HASHES = {TpmAlg.SHA256: hashes.SHA256(), TpmAlg.SHA384: hashes.SHA384(),
           TpmAlg.SHA1: hashes.SHA1(), TpmAlg.SHA512: hashes.SHA512()}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _tpm2b(data: bytes) -> bytes:
    return _u16(len(data)) + data


def tpm2b_public(
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    attributes: int,
    name_alg: TpmAlg = TpmAlg.SHA256,
    scheme: TpmAlg = TpmAlg.NULL,
    scheme_hash: TpmAlg = TpmAlg.SHA256,
    aes_bits: int | None = None,
) -> bytes:
    """Marshal a TPM2B_PUBLIC for ``public_key`` with the given attributes and scheme.

    ``aes_bits`` gives a storage key's AES-CFB symmetric definition; None means TPM_ALG_NULL.
    """
    if aes_bits is None:
        symmetric = _u16(TpmAlg.NULL)
    else:
        symmetric = _u16(TpmAlg.AES) + _u16(aes_bits) + _u16(TpmAlg.CFB)
    scheme_bytes = _u16(scheme) + (b"" if scheme == TpmAlg.NULL else _u16(scheme_hash))

    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        unique = numbers.n.to_bytes(public_key.key_size // 8, "big")
        parameters = (
            symmetric + scheme_bytes + _u16(public_key.key_size)
            + (0 if numbers.e == 65537 else numbers.e).to_bytes(4, "big") + _tpm2b(unique)
        )
        key_type = TpmAlg.RSA
    else:
        point = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        parameters = (
            symmetric + scheme_bytes + _u16(_CURVE_IDS[public_key.curve.name]) + _u16(TpmAlg.NULL)
            + _tpm2b(point.x.to_bytes(size, "big")) + _tpm2b(point.y.to_bytes(size, "big"))
        )
        key_type = TpmAlg.ECC

    area = (
        _u16(key_type) + _u16(name_alg) + int(attributes).to_bytes(4, "big") + _tpm2b(b"")
        + parameters
    )
    return _tpm2b(area)


def ak_public(key: PrivateKey, *, attributes: int = AK_ATTRIBUTES,
              scheme: TpmAlg | None = None, scheme_hash: TpmAlg = TpmAlg.SHA256) -> bytes:
    """Return the TPM2B_PUBLIC of an AK with ``key``: RSASSA for RSA, ECDSA for ECC."""
    if scheme is None:
        scheme = TpmAlg.RSASSA if isinstance(key, rsa.RSAPrivateKey) else TpmAlg.ECDSA
    return tpm2b_public(key.public_key(), attributes=attributes, scheme=scheme,
                        scheme_hash=scheme_hash)


def ek_public(key: PrivateKey, *, name_alg: TpmAlg = TpmAlg.SHA256, aes_bits: int = 128) -> bytes:
    """Return the TPM2B_PUBLIC of a storage EK with ``key`` (AES-CFB, no scheme)."""
    return tpm2b_public(key.public_key(), attributes=EK_ATTRIBUTES, name_alg=name_alg,
                        aes_bits=aes_bits)


def activate_credential(ek_key: PrivateKey, ek_tpm: bytes, ak_tpm: bytes, blob: bytes) -> bytes:
    """Recover the secret from a tpm2-tools credential file as the EK's TPM would."""
    ek = parse_tpm2b_public(ek_tpm)
    ak_name = parse_tpm2b_public(ak_tpm).name
    credential = parse_credential_file(blob)
    name_alg = ek.name_alg
    digest_size = _HASHES[name_alg].digest_size

    if isinstance(ek_key, rsa.RSAPrivateKey):
        oaep = padding.OAEP(padding.MGF1(_HASHES[name_alg]), _HASHES[name_alg], b"IDENTITY\x00")
        seed = ek_key.decrypt(credential.encrypted_secret, oaep)
    else:
        point = credential.encrypted_secret
        x_size = int.from_bytes(point[:2], "big")
        ephemeral_x = point[2 : 2 + x_size]
        ephemeral_y = point[4 + x_size :]
        ephemeral = ec.EllipticCurvePublicNumbers(
            int.from_bytes(ephemeral_x, "big"), int.from_bytes(ephemeral_y, "big"), ek_key.curve
        ).public_key()
        z = ek_key.exchange(ec.ECDH(), ephemeral)
        ek_x = ek_key.public_key().public_numbers().x.to_bytes(x_size, "big")
        seed = kdfe(name_alg, z, b"IDENTITY", ephemeral_x, ek_x, digest_size * 8)

    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    expected = hmac.new(hmac_key, credential.encrypted_identity + ak_name,
                        _HASHES[name_alg].name).digest()
    if not hmac.compare_digest(expected, credential.integrity_hmac):
        raise ValueError("credential integrity HMAC does not verify for this EK and AK")

    symmetric_key = kdfa(name_alg, seed, b"STORAGE", ak_name, b"", ek.symmetric_key_bits)
    decryptor = Cipher(algorithms.AES(symmetric_key), CFB(bytes(16))).decryptor()
    identity = decryptor.update(credential.encrypted_identity) + decryptor.finalize()
    size = int.from_bytes(identity[:2], "big")
    return identity[2 : 2 + size]


def auth_tag(secret: bytes, device_id: str) -> str:
    """Compute the auth_tag as rust-keylime does: HMAC-SHA384 keyed with base64(secret)."""
    return hmac.new(base64.b64encode(secret), device_id.encode(), hashlib.sha384).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class SoftwareDevice:
    """A device whose EK and AK are software keys, with an EK certificate from ``ca``."""

    ek_key: PrivateKey
    ak_key: PrivateKey
    ca: ekca.TestCa | None
    ek_tpm: bytes = b""
    aik_tpm: bytes = b""
    ekcert: x509.Certificate | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ek_tpm:
            self.ek_tpm = ek_public(self.ek_key)
        if not self.aik_tpm:
            self.aik_tpm = ak_public(self.ak_key)
        if self.ekcert is None and self.ca is not None:
            self.ekcert = self.ca.issue_ek_certificate(self.ek_key.public_key())

    @classmethod
    def create(cls, ca: ekca.TestCa | None, ek_kind: ekca.KeyKind = "ec-p256",
               ak_kind: ekca.KeyKind = "ec-p256") -> SoftwareDevice:
        return cls(ek_key=ekca.generate_key(ek_kind), ak_key=ekca.generate_key(ak_kind), ca=ca)

    def body(self, **overrides: Any) -> dict[str, Any]:
        """Return the registration JSON body; an override of None leaves the field out."""
        body: dict[str, Any] = {"ek_tpm": b64(self.ek_tpm), "aik_tpm": b64(self.aik_tpm)}
        if self.ekcert is not None:
            body["ekcert"] = b64(ekca.der(self.ekcert))
        body.update(self.extra)
        body.update(overrides)
        return {key: value for key, value in body.items() if value is not None}

    def auth_tag_for(self, blob_b64: str, device_id: str) -> str:
        """Activate the credential in software and return the auth_tag."""
        secret = activate_credential(self.ek_key, self.ek_tpm, self.aik_tpm,
                                     base64.b64decode(blob_b64))
        return auth_tag(secret, device_id)
