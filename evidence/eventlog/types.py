"""Numbers that the TCG PC Client Platform Firmware Profile and UEFI specifications fix:
event types, TPM hash algorithm identifiers and well-known GUIDs."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from uuid import UUID


class EventType(enum.IntEnum):
    """Event types of the TCG PC Client Platform Firmware Profile (PFP) 1.05 and 1.06."""

    EV_PREBOOT_CERT = 0x00000000
    EV_POST_CODE = 0x00000001
    EV_UNUSED = 0x00000002
    EV_NO_ACTION = 0x00000003
    EV_SEPARATOR = 0x00000004
    EV_ACTION = 0x00000005
    EV_EVENT_TAG = 0x00000006
    EV_S_CRTM_CONTENTS = 0x00000007
    EV_S_CRTM_VERSION = 0x00000008
    EV_CPU_MICROCODE = 0x00000009
    EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
    EV_TABLE_OF_DEVICES = 0x0000000B
    EV_COMPACT_HASH = 0x0000000C
    EV_IPL = 0x0000000D
    EV_IPL_PARTITION_DATA = 0x0000000E
    EV_NONHOST_CODE = 0x0000000F
    EV_NONHOST_CONFIG = 0x00000010
    EV_NONHOST_INFO = 0x00000011
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
    EV_POST_CODE2 = 0x00000013
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_GPT_EVENT2 = 0x8000000D
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
    EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
    EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4


_EVENT_TYPE_VALUES = frozenset(int(member) for member in EventType)


def event_type_name(value: int) -> str:
    """Name an event type number, e.g. ``EV_IPL``, or ``EV_UNKNOWN_0x00000102`` for one the
    PFP does not define."""
    if value in _EVENT_TYPE_VALUES:
        return EventType(value).name
    return f"EV_UNKNOWN_0x{value:08x}"


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """A TPM hash algorithm (TPM_ALG_ID) as the event log names it."""

    alg_id: int
    name: str
    digest_size: int
    hashlib_name: str | None

    @property
    def can_replay(self) -> bool:
        """True when this Python can compute the hash, so the bank can be replayed."""
        return self.hashlib_name is not None and self.hashlib_name in hashlib.algorithms_available


# TPM_ALG_ID values from the TCG Algorithm Registry; names are the PCR bank names that
# tpm2-tools and Keylime use.
KNOWN_HASH_ALGORITHMS: dict[int, HashAlgorithm] = {
    algorithm.alg_id: algorithm
    for algorithm in (
        HashAlgorithm(0x0004, "sha1", 20, "sha1"),
        HashAlgorithm(0x000B, "sha256", 32, "sha256"),
        HashAlgorithm(0x000C, "sha384", 48, "sha384"),
        HashAlgorithm(0x000D, "sha512", 64, "sha512"),
        HashAlgorithm(0x0012, "sm3_256", 32, "sm3"),
        HashAlgorithm(0x0027, "sha3_256", 32, "sha3_256"),
        HashAlgorithm(0x0028, "sha3_384", 48, "sha3_384"),
        HashAlgorithm(0x0029, "sha3_512", 64, "sha3_512"),
    )
}

SHA1 = KNOWN_HASH_ALGORITHMS[0x0004]


def hash_algorithm(alg_id: int, declared_size: int) -> HashAlgorithm:
    """Return the algorithm for ``alg_id``. An unknown algorithm gets the digest size that
    the Spec ID event declares and a bank name such as ``alg_0x00ff``. It cannot be replayed."""
    known = KNOWN_HASH_ALGORITHMS.get(alg_id)
    if known is not None:
        return known
    return HashAlgorithm(alg_id, f"alg_0x{alg_id:04x}", declared_size, None)


# GUIDs print with their first three fields little-endian, as ``uuid.UUID(bytes_le=...)``
# does and as the UEFI specification writes them.
EFI_GLOBAL_VARIABLE = UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK_GUID = UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
EFI_CERT_X509_GUID = UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = UUID("c1c41626-504c-4092-aca9-41f936934328")

# Variables whose contents are a sequence of EFI_SIGNATURE_LIST structures: the UEFI Secure
# Boot databases and shim's machine owner key (MOK) lists. ``vendor_db`` is shim's built-in
# database.
SIGNATURE_DATABASE_NAMES = frozenset(
    {"PK", "KEK", "db", "dbx", "dbt", "dbr", "MokList", "MokListX", "vendor_db"}
)
