"""The agent's identity, kept across restarts: its uuid and its AK.

The registrar identifies a device by its uuid, EK and AK, and it rejects the same uuid with
another AK (403). So the agent stores its AK blobs and reloads them under the same EK after a restart,
instead of creating a new AK. The file is ``<agent_state_dir>/identity.json``, mode 0600,
replaced atomically (temporary file, fsync, rename, fsync of the directory).

A missing file means a first start: the agent creates a uuid (unless ``agent_uuid`` is set) and
an AK and stores them. A file that cannot be read, is corrupt, or belongs to other settings or
another EK raises IdentityError and is left in place, because replacing it would give the
device a new AK that the registrar rejects. The operator decides: restore the file, or remove
it and delete the device from the registrar to enroll afresh.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import tempfile
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from device.errors import IdentityError, TpmError
from device.tpm import AttestationKey, DeviceTpm, EndorsementKey
from edgetrust.logs import device_logger
from evidence.errors import ParseError
from evidence.tpm import parse_tpm2b_public

log = logging.getLogger(__name__)

IDENTITY_FILE_NAME: Final = "identity.json"
FORMAT_VERSION: Final = 1

# The registrar accepts ids of 1-255 letters, digits, '.', '_' and '-'. The agent also wants a
# letter or digit first, because HTTP clients normalise the path segments '.' and '..'.
_AGENT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_REMEDY: Final = (
    "The agent does not replace this file. Restore it from a backup, or remove it to create "
    "a new AK; the registrar then rejects this uuid until an operator deletes the device there."
)


@dataclass(frozen=True)
class AgentIdentity:
    """The agent's uuid, its AK, and the EK type and EK name the AK was created under."""

    uuid: str
    ek_type: str
    ek_name: bytes
    ak_type: str
    ak: AttestationKey


def check_agent_id(value: str, source: str) -> str:
    """Return ``value`` if it is a valid agent id; raise IdentityError naming ``source``."""
    if not _AGENT_ID.fullmatch(value):
        raise IdentityError(
            f"{source} is {value!r}; expected 1 to 255 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (usually a UUID)",
            code="agent-uuid-invalid",
        )
    return value


class IdentityStore:
    """Reads and writes the identity file in one state directory."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    @property
    def path(self) -> Path:
        return self.state_dir / IDENTITY_FILE_NAME

    def load(self) -> AgentIdentity | None:
        """Return the stored identity, or None if the file does not exist."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IdentityError(
                f"cannot read identity file {self.path}: {exc.strerror}; fix its permissions",
                code="identity-unreadable",
            ) from exc
        return _decode(text, self.path)

    def save(self, identity: AgentIdentity) -> None:
        """Write the identity file atomically with mode 0600."""
        data = json.dumps(_encode(identity), indent=2).encode() + b"\n"
        try:
            _write_atomically(self.path, data)
        except OSError as exc:
            raise IdentityError(
                f"cannot write identity file {self.path}: {exc.strerror}",
                code="identity-unwritable",
            ) from exc


def _encode(identity: AgentIdentity) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "uuid": identity.uuid,
        "ek_type": identity.ek_type,
        "ek_name": identity.ek_name.hex(),
        "ak_type": identity.ak_type,
        "ak_public": base64.b64encode(identity.ak.public).decode(),
        "ak_private": base64.b64encode(identity.ak.private).decode(),
    }


def _decode(data: bytes, path: Path) -> AgentIdentity:
    def corrupt(reason: str) -> IdentityError:
        return IdentityError(f"identity file {path} is corrupt: {reason}. {_REMEDY}",
                             code="identity-corrupt")

    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise corrupt(f"expected a JSON object, got {type(fields).__name__}")
    if fields.get("format") != FORMAT_VERSION:
        raise corrupt(f"format is {fields.get('format')!r}, expected {FORMAT_VERSION}")

    def text(key: str) -> str:
        value = fields.get(key)
        if not isinstance(value, str) or not value:
            raise corrupt(f"field {key!r} is missing or not a non-empty string")
        return value

    def blob(key: str) -> bytes:
        try:
            return base64.b64decode(text(key), validate=True)
        except (binascii.Error, ValueError):
            raise corrupt(f"field {key!r} is not valid base64") from None

    try:
        ek_name = bytes.fromhex(text("ek_name"))
    except ValueError:
        raise corrupt("field 'ek_name' is not hexadecimal") from None
    ak = AttestationKey(public=blob("ak_public"), private=blob("ak_private"))
    try:
        parse_tpm2b_public(ak.public)
    except ParseError as exc:
        raise corrupt(f"field 'ak_public' is not a TPM2B_PUBLIC ({exc.message})") from None
    if len(ak.private) < 2 or int.from_bytes(ak.private[:2], "big") != len(ak.private) - 2:
        raise corrupt("field 'ak_private' is not a TPM2B_PRIVATE (its size prefix is wrong)")
    try:
        agent_id = check_agent_id(text("uuid"), "field 'uuid'")
    except IdentityError as exc:
        raise corrupt(exc.message) from None

    return AgentIdentity(uuid=agent_id, ek_type=text("ek_type"), ek_name=ek_name,
                         ak_type=text("ak_type"), ak=ak)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.",
                                             suffix=".tmp")
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
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Flush the directory entry of a rename to disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_or_create_identity(store: IdentityStore, tpm: DeviceTpm, ek: EndorsementKey, *,
                            configured_uuid: str, ek_type: str, ak_type: str) -> AgentIdentity:
    """Return the stored identity after checking it against the settings and the TPM, or
    create, store and return a new one if there is no identity file yet.

    ``configured_uuid`` is the ``agent_uuid`` setting; empty means any stored uuid, or a new
    UUID on first start.
    """
    if configured_uuid:
        check_agent_id(configured_uuid, "setting agent_uuid")

    identity = store.load()
    if identity is None:
        return _create_identity(store, tpm, ek, configured_uuid=configured_uuid,
                                ek_type=ek_type, ak_type=ak_type)

    _check_settings(identity, store.path, configured_uuid=configured_uuid, ek_type=ek_type,
                    ak_type=ak_type)
    _check_tpm(identity, store.path, tpm, ek)
    device_logger(log, identity.uuid).info(
        "loaded the identity from %s: AK name %s under the %s", store.path,
        identity.ak.name.hex(), ek.describe())
    return identity


def _create_identity(store: IdentityStore, tpm: DeviceTpm, ek: EndorsementKey, *,
                     configured_uuid: str, ek_type: str, ak_type: str) -> AgentIdentity:
    agent_id = configured_uuid or str(uuid_module.uuid4())
    device_log = device_logger(log, agent_id)
    device_log.info("no identity file at %s; creating a new %s AK under the %s", store.path,
                    ak_type.upper(), ek.describe())

    ak = tpm.create_ak(ek, ak_type)
    identity = AgentIdentity(uuid=agent_id, ek_type=ek_type, ek_name=ek.name, ak_type=ak_type,
                             ak=ak)
    store.save(identity)
    device_log.info("stored the new identity in %s: AK name %s", store.path, ak.name.hex())
    return identity


def _check_settings(identity: AgentIdentity, path: Path, *, configured_uuid: str, ek_type: str,
                    ak_type: str) -> None:
    mismatches = []
    if configured_uuid and configured_uuid != identity.uuid:
        mismatches.append(f"setting agent_uuid is {configured_uuid!r} but the file has "
                          f"uuid {identity.uuid!r}")
    if ek_type != identity.ek_type:
        mismatches.append(f"setting agent_ek_type is {ek_type!r} but the file's AK was created "
                          f"under a {identity.ek_type!r} EK")
    if ak_type != identity.ak_type:
        mismatches.append(f"setting agent_ak_type is {ak_type!r} but the file's AK is "
                          f"{identity.ak_type!r}")
    if mismatches:
        raise IdentityError(
            f"identity file {path} does not match the settings: {'; '.join(mismatches)}. "
            f"Change the settings back, or: {_REMEDY}",
            code="identity-mismatch",
        )


def _check_tpm(identity: AgentIdentity, path: Path, tpm: DeviceTpm, ek: EndorsementKey) -> None:
    if ek.name != identity.ek_name:
        raise IdentityError(
            f"identity file {path} has an AK created under the EK with name "
            f"{identity.ek_name.hex()}, but this TPM's {ek.describe()} has name {ek.name.hex()} "
            f"(the TPM was cleared or replaced, or the file comes from another device). "
            f"{_REMEDY}",
            code="identity-mismatch",
        )
    try:
        tpm.check_ak_loads(ek, identity.ak)
    except TpmError as exc:
        if exc.command != "TPM2_Load":
            raise
        raise IdentityError(
            f"the AK in identity file {path} does not load under this TPM's EK ({exc.message}). "
            f"{_REMEDY}",
            code="identity-mismatch",
        ) from exc
