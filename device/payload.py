"""The agent's payload key, and the PCR 16 value that binds it to every quote.

A Keylime tenant encrypts payload keys for a device with this RSA public key, so a verifier
must know that the key belongs to the TPM it attests. The agent therefore resets PCR 16 and
extends it with H(public key PEM) before each quote, in the quote's PCR bank only, as
rust-keylime 0.2.9 does (keylime/src/tpm.rs, ``build_pcr_list``). A Keylime verifier expects
PCR 16 = H(zeros || H(PEM text)) in that bank (``Tpm.sim_extend`` in Keylime 7.14.3), where
the PEM text is the ``pubkey`` field of the agent's response.

The key is RSA-2048, like rust-keylime's, because Keylime tenants encrypt with RSA-OAEP. It is
kept in ``<agent_state_dir>/payload-key.pem`` (mode 0600) and reused after a restart, so PCR 16
keeps the value that a verifier stored with the key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from device.errors import DeviceError
from evidence.tpm import TpmAlg, hash_function

log = logging.getLogger(__name__)

PAYLOAD_KEY_FILE_NAME: Final = "payload-key.pem"
PAYLOAD_KEY_BITS: Final = 2048
# The PCR that carries the payload key, as Keylime's TPM_DATA_PCR fixes it.
DATA_PCR: Final = 16


class PayloadKeyError(DeviceError):
    """The stored payload key cannot be read, parsed or written."""

    default_code = "payload-key-invalid"


@dataclass(frozen=True)
class PayloadKey:
    """The agent's RSA payload key pair."""

    private_key: rsa.RSAPrivateKey

    @property
    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM, byte for byte what OpenSSL's
        ``PEM_write_bio_PUBKEY`` writes and the agent sends as ``pubkey``."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pcr16_digest(self, bank: TpmAlg) -> bytes:
        """Return the digest that PCR 16 of ``bank`` is extended with: H_bank(public PEM)."""
        return bytes(hash_function(bank)(self.public_pem).digest())

    def expected_pcr16(self, bank: TpmAlg) -> bytes:
        """Return PCR 16 of ``bank`` after TPM2_PCR_Reset and one extend with the key digest."""
        digest = self.pcr16_digest(bank)
        return bytes(hash_function(bank)(bytes(len(digest)) + digest).digest())


def load_or_create_payload_key(state_dir: Path) -> PayloadKey:
    """Return the payload key stored in ``state_dir``, creating and storing one on first use.

    Raises PayloadKeyError if the file exists but cannot be read or is not an RSA private
    key. The file is then left in place for the operator.
    """
    path = state_dir / PAYLOAD_KEY_FILE_NAME
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create_payload_key(path)
    except OSError as exc:
        raise PayloadKeyError(
            f"cannot read payload key {path}: {exc.strerror}; fix its permissions"
        ) from exc
    return PayloadKey(_parse_private_key(pem, path))


def _parse_private_key(pem: bytes, path: Path) -> rsa.RSAPrivateKey:
    remedy = "remove it to create a new key (verifiers then see a new PCR 16 value)"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PayloadKeyError(f"payload key {path} is not a PEM private key ({exc}); {remedy}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PayloadKeyError(
            f"payload key {path} is a {type(key).__name__}, expected an RSA key; {remedy}"
        )
    return key


def _create_payload_key(path: Path) -> PayloadKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=PAYLOAD_KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_private_file(path, pem)
    except OSError as exc:
        raise PayloadKeyError(f"cannot write payload key {path}: {exc.strerror}") from exc
    log.info("created a new RSA-%d payload key in %s", PAYLOAD_KEY_BITS, path)
    return PayloadKey(key)


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by the owner only (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
