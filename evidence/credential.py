"""TPM2_MakeCredential in pure Python, and the tpm2-tools credential file.

MakeCredential wraps a secret so that only the TPM holding a given EK can recover it, and
only for an object with a given name (the AK). The TPM releases the secret with
TPM2_ActivateCredential, which proves to the registrar that the AK and the EK live in the same
TPM. The construction follows TPM 2.0 Part 1, "Credential Protection" and "Secret Sharing".

Public functions:

- ``make_credential(ek_public, ak_name, secret) -> bytes``: the tpm2-tools credential file
  that Keylime's registrar sends base64-encoded as ``blob``
- ``parse_credential_file(data) -> CredentialFile``
- ``marshal_credential_file(id_object, encrypted_secret) -> bytes``
- ``kdfa(...)`` and ``kdfe(...)``: the TPM key derivation functions
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from evidence.errors import ParseError, VerificationError
from evidence.tpm import ObjectAttributes, PublicArea, TpmAlg, hash_algorithm, hash_function

__all__ = [
    "CREDENTIAL_FILE_MAGIC",
    "CREDENTIAL_FILE_VERSION",
    "CredentialFile",
    "kdfa",
    "kdfe",
    "make_credential",
    "marshal_credential_file",
    "parse_credential_file",
]

CREDENTIAL_FILE_MAGIC: Final = 0xBADCC0DE
CREDENTIAL_FILE_VERSION: Final = 1
# A credential is a TPM2B_DIGEST, so at most the largest digest (SHA-512).
_MAX_SECRET: Final = 64
# TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET buffer sizes (tpm2-tss tss2_tpm2_types.h).
_MAX_ID_OBJECT: Final = 2 + 64 + 2 + 64
_MAX_ENCRYPTED_SECRET: Final = 512


@dataclass(frozen=True)
class CredentialFile:
    """A parsed tpm2-tools credential file.

    ``id_object`` is the TPM2B_ID_OBJECT buffer: integrityHMAC as a TPM2B, then encIdentity.
    ``encrypted_secret`` is the TPM2B_ENCRYPTED_SECRET buffer. For an RSA EK it is the
    OAEP-encrypted seed, and for an ECC EK the marshalled ephemeral TPMS_ECC_POINT.
    """

    id_object: bytes
    encrypted_secret: bytes
    integrity_hmac: bytes
    encrypted_identity: bytes


def kdfa(hash_alg: TpmAlg, key: bytes, label: bytes, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """Derive ``bits`` bits with KDFa (SP 800-108 counter mode with HMAC, TPM 2.0 Part 1 11.4.10.2).

    ``label`` is given without its terminating NUL, which this function appends.
    """
    algorithm = hash_algorithm(hash_alg)
    output = b""
    counter = 0
    while len(output) * 8 < bits:
        counter += 1
        message = (
            counter.to_bytes(4, "big") + label + b"\x00" + context_u + context_v
            + bits.to_bytes(4, "big")
        )
        output += hmac.new(key, message, algorithm.name).digest()
    return _truncate_bits(output, bits)


def kdfe(hash_alg: TpmAlg, z: bytes, label: bytes, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """Derive ``bits`` bits with KDFe (SP 800-56A concatenation KDF, TPM 2.0 Part 1 11.4.10.3).

    ``label`` is given without its terminating NUL, which this function appends.
    """
    function = hash_function(hash_alg)
    output = b""
    counter = 0
    while len(output) * 8 < bits:
        counter += 1
        output += function(
            counter.to_bytes(4, "big") + z + label + b"\x00" + party_u + party_v
        ).digest()
    return _truncate_bits(output, bits)


def _truncate_bits(output: bytes, bits: int) -> bytes:
    size = (bits + 7) // 8
    truncated = bytearray(output[:size])
    if bits % 8:
        truncated[0] &= (1 << (bits % 8)) - 1
    return bytes(truncated)


def make_credential(ek_public: PublicArea, ak_name: bytes, secret: bytes) -> bytes:
    """Wrap ``secret`` for the TPM holding ``ek_public`` and the object named ``ak_name``.

    Returns the tpm2-tools credential file (what ``tpm2_makecredential -o`` writes).
    Raises VerificationError with code ``ek-not-storage-key`` if the EK is not a restricted
    decryption key with an AES-CFB symmetric definition, and ValueError if ``secret`` is
    empty or longer than 64 bytes.
    """
    if not 0 < len(secret) <= _MAX_SECRET:
        raise ValueError(f"credential secret has {len(secret)} bytes, expected 1 to {_MAX_SECRET}")
    _check_ek(ek_public)

    # 1. A fresh seed, readable only by the EK's private key.
    seed, encrypted_secret = _make_seed(ek_public)

    # 2. Encrypt TPM2B(secret) with a key bound to the seed and the AK name.
    name_alg = ek_public.name_alg
    symmetric_key = kdfa(
        name_alg, seed, b"STORAGE", ak_name, b"", ek_public.symmetric_key_bits
    )
    encryptor = Cipher(
        algorithms.AES(symmetric_key), CFB(bytes(16))
    ).encryptor()
    encrypted_identity = (
        encryptor.update(len(secret).to_bytes(2, "big") + secret) + encryptor.finalize()
    )

    # 3. Outer HMAC over encIdentity and the AK name, so the TPM rejects any other object.
    digest_bits = hash_algorithm(name_alg).digest_size * 8
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", digest_bits)
    integrity = hmac.new(
        hmac_key, encrypted_identity + ak_name, hash_algorithm(name_alg).name
    ).digest()

    id_object = len(integrity).to_bytes(2, "big") + integrity + encrypted_identity
    return marshal_credential_file(id_object, encrypted_secret)


def _check_ek(ek_public: PublicArea) -> None:
    attributes = ek_public.object_attributes
    is_storage_key = (
        attributes & ObjectAttributes.RESTRICTED
        and attributes & ObjectAttributes.DECRYPT
        and not attributes & ObjectAttributes.SIGN_ENCRYPT
    )
    if not is_storage_key:
        raise VerificationError(
            "EK is not a restricted decryption key; got objectAttributes "
            f"0x{int(attributes):08x}, expected restricted and decrypt without sign",
            code="ek-not-storage-key",
            field="objectAttributes",
        )
    if ek_public.symmetric != TpmAlg.AES or ek_public.symmetric_mode != TpmAlg.CFB:
        raise VerificationError(
            f"EK symmetric definition is {ek_public.symmetric.name}-"
            f"{ek_public.symmetric_mode.name}, expected AES-CFB",
            code="ek-not-storage-key",
            field="parameters.symmetric",
        )


def _make_seed(ek_public: PublicArea) -> tuple[bytes, bytes]:
    """Return (seed, TPM2B_ENCRYPTED_SECRET buffer) for the EK's key type."""
    name_alg = ek_public.name_alg
    seed_size = hash_algorithm(name_alg).digest_size
    key = ek_public.public_key

    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(seed_size)
        algorithm = hash_algorithm(name_alg)
        oaep = padding.OAEP(
            mgf=padding.MGF1(algorithm), algorithm=algorithm, label=b"IDENTITY\x00"
        )
        return seed, key.encrypt(seed, oaep)

    # ECC: one-pass Diffie-Hellman with an ephemeral key on the EK's curve.
    coordinate_size = (key.curve.key_size + 7) // 8
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    ephemeral_numbers = ephemeral.public_key().public_numbers()
    ephemeral_x = ephemeral_numbers.x.to_bytes(coordinate_size, "big")
    ephemeral_y = ephemeral_numbers.y.to_bytes(coordinate_size, "big")
    ek_x = key.public_numbers().x.to_bytes(coordinate_size, "big")
    seed = kdfe(name_alg, z, b"IDENTITY", ephemeral_x, ek_x, seed_size * 8)
    point = (
        coordinate_size.to_bytes(2, "big") + ephemeral_x
        + coordinate_size.to_bytes(2, "big") + ephemeral_y
    )
    return seed, point


def marshal_credential_file(id_object: bytes, encrypted_secret: bytes) -> bytes:
    """Write the tpm2-tools credential file.

    The layout is magic, version, TPM2B_ID_OBJECT, then TPM2B_ENCRYPTED_SECRET.
    """
    return (
        CREDENTIAL_FILE_MAGIC.to_bytes(4, "big")
        + CREDENTIAL_FILE_VERSION.to_bytes(4, "big")
        + len(id_object).to_bytes(2, "big") + id_object
        + len(encrypted_secret).to_bytes(2, "big") + encrypted_secret
    )


def parse_credential_file(data: bytes) -> CredentialFile:
    """Parse a tpm2-tools credential file strictly; raise ParseError on any deviation."""
    data = bytes(data)
    if len(data) < 8:
        raise ParseError(
            f"credential file: truncated: {len(data)} bytes, expected at least 8",
            code="structure-truncated",
        )
    magic = int.from_bytes(data[0:4], "big")
    if magic != CREDENTIAL_FILE_MAGIC:
        raise ParseError(
            f"credential file: magic 0x{magic:08x}, expected 0x{CREDENTIAL_FILE_MAGIC:08X}",
            code="credential-file-invalid",
            field="magic",
        )
    version = int.from_bytes(data[4:8], "big")
    if version != CREDENTIAL_FILE_VERSION:
        raise ParseError(
            f"credential file: version {version}, expected {CREDENTIAL_FILE_VERSION}",
            code="credential-file-invalid",
            field="version",
        )

    id_object, offset = _read_tpm2b(data, 8, "TPM2B_ID_OBJECT", _MAX_ID_OBJECT)
    encrypted_secret, offset = _read_tpm2b(
        data, offset, "TPM2B_ENCRYPTED_SECRET", _MAX_ENCRYPTED_SECRET
    )
    if offset != len(data):
        raise ParseError(
            f"credential file: {len(data) - offset} trailing bytes after offset {offset}",
            code="trailing-bytes",
        )

    integrity_hmac, identity_offset = _read_tpm2b(id_object, 0, "integrityHMAC", 64)
    encrypted_identity = id_object[identity_offset:]
    if len(encrypted_identity) < 2:
        raise ParseError(
            f"credential file: encIdentity has {len(encrypted_identity)} bytes, "
            "expected at least 2",
            code="structure-truncated",
            field="encIdentity",
        )
    return CredentialFile(id_object, encrypted_secret, integrity_hmac, encrypted_identity)


def _read_tpm2b(data: bytes, offset: int, name: str, maximum: int) -> tuple[bytes, int]:
    if offset + 2 > len(data):
        raise ParseError(
            f"credential file: {name}.size truncated at offset {offset}",
            code="structure-truncated",
            field=name,
        )
    size = int.from_bytes(data[offset : offset + 2], "big")
    if size > maximum:
        raise ParseError(
            f"credential file: {name} size {size} exceeds the maximum {maximum}",
            code="size-invalid",
            field=name,
        )
    end = offset + 2 + size
    if end > len(data):
        raise ParseError(
            f"credential file: {name} needs {size} bytes at offset {offset + 2}, "
            f"got {len(data) - offset - 2}",
            code="structure-truncated",
            field=name,
        )
    return data[offset + 2 : end], end

