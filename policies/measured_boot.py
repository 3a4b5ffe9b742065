"""Measured-boot policies: Keylime's reference state for UEFI boots, validated and evaluated.

A measured-boot policy is the JSON that ``keylime-policy create measured-boot`` writes for
Keylime's ``example`` measured-boot policy (Keylime 7.14.3, ``keylime/mba/elchecking``)::

    {"has_secureboot": true,
     "scrtm_and_bios": [{"scrtm": {"sha256": "0x.."}, "platform_firmware": [{"sha256": "0x.."}]}],
     "pk": [{"SignatureOwner": "<uuid>", "SignatureData": "0x<hex>"}], "kek": [...], "db": [...],
     "dbx": [...], "vendor_db": [...],
     "mokdig": [{"sha256": "0x.."}], "mokxdig": [...],
     "kernels": [{"shim_authcode_sha256": "0x..", "grub_authcode_sha256": "0x..",
                  "kernel_authcode_sha256": "0x..", "initrd_plain_sha256": "0x..",
                  "kernel_cmdline": "<Python regular expression>"}]}

Without Secure Boot (``has_secureboot`` false) a kernel entry has ``vmlinuz_plain_sha256``
(GRUB's plain SHA-256 of the kernel file) in place of ``kernel_authcode_sha256``.
``vendor_db`` may be missing and means ``[]``. A digest map names one or more PCR banks.

Evaluation follows the checks of Keylime's example policy over every event of the log, PCRs
0-9 and 14. Each event must be one that the boot chain is expected to measure, in the PCR
the TCG PC Client Platform Firmware Profile assigns it. The boot chain must then match the
reference state: S-CRTM and firmware, Secure Boot state and databases, MOK lists, and the
shim, GRUB, kernel, initrd and kernel command line of one ``kernels`` entry.

Differences from Keylime 7.14.3's evaluation:

- ``EV_NO_ACTION`` events are skipped. They are never extended into a PCR, so they measure
  nothing. Keylime allows one, which fails logs that carry a StartupLocality event.
- ``dbx`` passes when every listed entry is in the measured dbx, in any of its signature
  lists. Keylime requires the measured dbx to be exactly one list of SHA-256 entries, which
  fails dbx variables that also revoke certificates.
- With ``has_secureboot`` true, a log that does not measure ``SecureBoot`` or ``dbx`` fails.
  Keylime checks these variables only when they are measured.
- ``EV_SEPARATOR`` and ``EV_EFI_ACTION`` digests must match their data in every bank. Keylime
  accepts an event when one bank's digest matches.
- A policy that Keylime would fail at every evaluation (a missing field, a digest map without
  digests, a kernel command line that is not a regular expression) is rejected when loaded.

Public API::

    parse_measured_boot_policy(unverified_document: bytes | str | Mapping[str, Any])
        -> MeasuredBootPolicy
    evaluate_measured_boot(policy, event_log, *, quoted_pcrs=None) -> list[Finding]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from uuid import UUID

from evidence.eventlog import (
    EFI_CERT_SHA256_GUID,
    EFI_CERT_X509_GUID,
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    SHIM_LOCK_GUID,
    Event,
    EventLog,
    EventType,
    IplText,
    UefiVariable,
    event_data_matches_digests,
)
from evidence.findings import Finding, Severity
from policies.errors import (
    POLICY_DIGEST_INVALID,
    POLICY_FIELD_INVALID,
    POLICY_FIELD_MISSING,
    POLICY_NOT_JSON,
    PolicyError,
)

# Finding codes.
MB_PCR_NOT_QUOTED: Final = "mb-pcr-not-quoted"
MB_EVENT_UNEXPECTED: Final = "mb-event-unexpected"
MB_SCRTM_NOT_ALLOWED: Final = "mb-scrtm-not-allowed"
MB_PLATFORM_FIRMWARE_NOT_ALLOWED: Final = "mb-platform-firmware-not-allowed"
MB_SECUREBOOT_DISABLED: Final = "mb-secureboot-disabled"
MB_SECUREBOOT_ENABLED: Final = "mb-secureboot-enabled"
MB_PK_MISMATCH: Final = "mb-pk-mismatch"
MB_KEK_MISMATCH: Final = "mb-kek-mismatch"
MB_DB_MISMATCH: Final = "mb-db-mismatch"
MB_VENDOR_DB_MISMATCH: Final = "mb-vendor-db-mismatch"
MB_DBX_MISSING_ENTRIES: Final = "mb-dbx-missing-entries"
MB_MOKLIST_NOT_ALLOWED: Final = "mb-moklist-not-allowed"
MB_MOKLISTX_NOT_ALLOWED: Final = "mb-moklistx-not-allowed"
MB_KERNEL_NOT_ALLOWED: Final = "mb-kernel-not-allowed"
MB_INITRD_NOT_ALLOWED: Final = "mb-initrd-not-allowed"
MB_KERNEL_CMDLINE_NOT_ALLOWED: Final = "mb-kernel-cmdline-not-allowed"

# PCRs whose events the policy checks (Keylime's example policy: 0-9 and 14).
RELEVANT_PCRS: Final = frozenset((*range(10), 14))

# Digest sizes of the PCR banks a digest map may name.
_DIGEST_SIZES: Final = MappingProxyType(
    {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
)
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")

_SIGNATURE_DATABASES: Final = ("pk", "kek", "db", "dbx", "vendor_db")
_DIGEST_LISTS: Final = ("mokdig", "mokxdig")
_TOP_LEVEL_KEYS: Final = frozenset(
    ("has_secureboot", "scrtm_and_bios", "kernels", *_SIGNATURE_DATABASES, *_DIGEST_LISTS)
)
_KERNEL_DIGEST_KEYS: Final = (
    "shim_authcode_sha256",
    "grub_authcode_sha256",
    "kernel_authcode_sha256",
    "vmlinuz_plain_sha256",
    "initrd_plain_sha256",
)


# --- The policy -------------------------------------------------------------------------------


Digests = Mapping[str, bytes]
"""Digests of one measurement by PCR bank name; a measurement matches if one bank agrees."""


@dataclass(frozen=True)
class Signature:
    """An EFI_SIGNATURE_DATA entry: the owner GUID and the signature (certificate or hash)."""

    owner: UUID
    data: bytes


@dataclass(frozen=True)
class FirmwareReference:
    """One allowed firmware: the S-CRTM version and the platform firmware blobs in order."""

    scrtm: Digests
    platform_firmware: tuple[Digests, ...]


@dataclass(frozen=True)
class KernelReference:
    """One allowed boot chain from shim to the kernel command line. SHA-256 digests."""

    shim: bytes
    grub: bytes
    kernel: bytes | None
    """Authenticode digest of the kernel image, which shim verifies under Secure Boot."""
    vmlinuz: bytes | None
    """Plain digest of the kernel file that GRUB measures into PCR 9."""
    initrd: bytes
    kernel_cmdline: str
    """A regular expression that the whole command line after ``kernel_cmdline: `` matches."""
    kernel_cmdline_pattern: re.Pattern[str] = field(compare=False)


@dataclass(frozen=True, eq=False)
class MeasuredBootPolicy:
    """A validated measured-boot policy. Build it with ``parse_measured_boot_policy``."""

    content_hash: str
    """SHA-256 hex of the canonical serialisation."""
    has_secureboot: bool
    scrtm_and_bios: tuple[FirmwareReference, ...]
    pk: tuple[Signature, ...]
    kek: tuple[Signature, ...]
    db: tuple[Signature, ...]
    dbx: tuple[Signature, ...]
    vendor_db: tuple[Signature, ...]
    mokdig: tuple[Digests, ...]
    mokxdig: tuple[Digests, ...]
    kernels: tuple[KernelReference, ...]

    def to_document(self) -> dict[str, Any]:
        """Return the canonical document in Keylime's reference-state format."""
        document: dict[str, Any] = {
            "has_secureboot": self.has_secureboot,
            "scrtm_and_bios": [
                {
                    "scrtm": _digests_document(entry.scrtm),
                    "platform_firmware": [_digests_document(d) for d in entry.platform_firmware],
                }
                for entry in self.scrtm_and_bios
            ],
        }
        for name in _SIGNATURE_DATABASES:
            document[name] = [
                {"SignatureOwner": str(s.owner), "SignatureData": _hex(s.data)}
                for s in getattr(self, name)
            ]
        for name in _DIGEST_LISTS:
            document[name] = [_digests_document(d) for d in getattr(self, name)]
        document["kernels"] = [_kernel_document(kernel) for kernel in self.kernels]
        return document

    def canonical_json(self) -> bytes:
        """Return the canonical serialisation that ``content_hash`` is computed over."""
        return _canonical_json(self.to_document())


def _kernel_document(kernel: KernelReference) -> dict[str, str]:
    document = {
        "shim_authcode_sha256": _hex(kernel.shim),
        "grub_authcode_sha256": _hex(kernel.grub),
    }
    if kernel.kernel is not None:
        document["kernel_authcode_sha256"] = _hex(kernel.kernel)
    if kernel.vmlinuz is not None:
        document["vmlinuz_plain_sha256"] = _hex(kernel.vmlinuz)
    document["initrd_plain_sha256"] = _hex(kernel.initrd)
    document["kernel_cmdline"] = kernel.kernel_cmdline
    return document


def _digests_document(digests: Digests) -> dict[str, str]:
    return {bank: _hex(value) for bank, value in sorted(digests.items())}


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --- Loading ----------------------------------------------------------------------------------


def parse_measured_boot_policy(
    unverified_document: bytes | str | Mapping[str, Any],
) -> MeasuredBootPolicy:
    """Validate a measured-boot policy (JSON text or a decoded object).

    Raises PolicyError whose ``field`` is the JSON path of the value at fault, such as
    ``kernels[0].initrd_plain_sha256``.
    """
    document = _decode(unverified_document)

    unknown = sorted(set(document) - _TOP_LEVEL_KEYS)
    if unknown:
        raise PolicyError(
            f"unknown key {unknown[0]!r}; a measured-boot policy has only "
            f"{', '.join(sorted(_TOP_LEVEL_KEYS))}",
            code=POLICY_FIELD_INVALID, field=unknown[0],
        )

    has_secureboot = document.get("has_secureboot", True)
    if not isinstance(has_secureboot, bool):
        raise PolicyError("must be true or false", code=POLICY_FIELD_INVALID,
                          field="has_secureboot")

    databases = {
        name: _parse_signatures(_require(document, name, default=[] if name == "vendor_db" else None),
                                name)
        for name in _SIGNATURE_DATABASES
    }
    digest_lists = {
        name: tuple(_parse_digests(item, f"{name}[{i}]")
                    for i, item in enumerate(_require_list(document, name)))
        for name in _DIGEST_LISTS
    }
    firmware = tuple(
        _parse_firmware(item, f"scrtm_and_bios[{i}]")
        for i, item in enumerate(_require_list(document, "scrtm_and_bios"))
    )
    kernels = tuple(
        _parse_kernel(item, f"kernels[{i}]", has_secureboot)
        for i, item in enumerate(_require_list(document, "kernels"))
    )

    policy = MeasuredBootPolicy(
        content_hash="",
        has_secureboot=has_secureboot,
        scrtm_and_bios=firmware,
        pk=databases["pk"],
        kek=databases["kek"],
        db=databases["db"],
        dbx=databases["dbx"],
        vendor_db=databases["vendor_db"],
        mokdig=digest_lists["mokdig"],
        mokxdig=digest_lists["mokxdig"],
        kernels=kernels,
    )
    content_hash = hashlib.sha256(policy.canonical_json()).hexdigest()
    return _with_hash(policy, content_hash)


def _with_hash(policy: MeasuredBootPolicy, content_hash: str) -> MeasuredBootPolicy:
    values = {name: getattr(policy, name) for name in policy.__dataclass_fields__}
    values["content_hash"] = content_hash
    return MeasuredBootPolicy(**values)


def _decode(unverified_document: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(unverified_document, Mapping):
        return unverified_document
    try:
        document = json.loads(unverified_document)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise PolicyError(f"measured-boot policy is not valid JSON: {error}",
                          code=POLICY_NOT_JSON) from None
    if not isinstance(document, dict):
        raise PolicyError("measured-boot policy must be a JSON object", code=POLICY_NOT_JSON)
    return document


def _require(document: Mapping[str, Any], key: str, *, default: Any = None) -> Any:
    if key in document:
        return document[key]
    if default is not None:
        return default
    raise PolicyError(f"{key!r} is required", code=POLICY_FIELD_MISSING, field=key)


def _require_list(document: Mapping[str, Any], key: str) -> list[Any]:
    value = _require(document, key)
    if not isinstance(value, list):
        raise PolicyError(f"must be an array, got {_json_type(value)}", code=POLICY_FIELD_INVALID,
                          field=key)
    return value


def _parse_signatures(unverified: Any, field: str) -> tuple[Signature, ...]:
    if not isinstance(unverified, list):
        raise PolicyError(f"must be an array, got {_json_type(unverified)}",
                          code=POLICY_FIELD_INVALID, field=field)
    signatures = []
    for index, item in enumerate(unverified):
        path = f"{field}[{index}]"
        if not isinstance(item, Mapping):
            raise PolicyError("must be an object with SignatureOwner and SignatureData",
                              code=POLICY_FIELD_INVALID, field=path)
        unknown = sorted(set(item) - {"SignatureOwner", "SignatureData"})
        if unknown:
            raise PolicyError(f"unknown key {unknown[0]!r}", code=POLICY_FIELD_INVALID,
                              field=f"{path}.{unknown[0]}")
        owner = _parse_uuid(_require_in(item, "SignatureOwner", path), f"{path}.SignatureOwner")
        data = _parse_hex(_require_in(item, "SignatureData", path), f"{path}.SignatureData")
        signatures.append(Signature(owner, data))
    return tuple(signatures)


def _require_in(item: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in item:
        raise PolicyError(f"{key!r} is required", code=POLICY_FIELD_MISSING,
                          field=f"{path}.{key}")
    return item[key]


def _parse_uuid(unverified: Any, field: str) -> UUID:
    if not isinstance(unverified, str):
        raise PolicyError("must be a GUID string", code=POLICY_FIELD_INVALID, field=field)
    try:
        return UUID(unverified)
    except ValueError:
        raise PolicyError(f"{unverified!r} is not a GUID", code=POLICY_FIELD_INVALID,
                          field=field) from None


def _parse_hex(unverified: Any, field: str, *, size: int | None = None) -> bytes:
    """Decode ``0x`` followed by hex digits, as Keylime writes digests and signatures."""
    if not isinstance(unverified, str) or not unverified.startswith("0x"):
        raise PolicyError(f"{unverified!r} is not 0x followed by hex digits",
                          code=POLICY_DIGEST_INVALID, field=field)
    digits = unverified[2:]
    if not digits or not _HEX_DIGITS.issuperset(digits) or len(digits) % 2:
        raise PolicyError(f"{unverified[:80]!r} is not 0x followed by an even number of hex digits",
                          code=POLICY_DIGEST_INVALID, field=field)
    if size is not None and len(digits) != 2 * size:
        raise PolicyError(f"digest has {len(digits)} hex digits, expected {2 * size}",
                          code=POLICY_DIGEST_INVALID, field=field)
    return bytes.fromhex(digits)


def _parse_digests(unverified: Any, field: str) -> Digests:
    if not isinstance(unverified, Mapping) or not unverified:
        raise PolicyError('must be an object of digests by PCR bank, such as {"sha256": "0x..."}',
                          code=POLICY_FIELD_INVALID, field=field)
    digests = {}
    for bank, value in unverified.items():
        size = _DIGEST_SIZES.get(bank)
        if size is None:
            raise PolicyError(f"unknown PCR bank {bank!r}; expected one of {', '.join(_DIGEST_SIZES)}",
                              code=POLICY_FIELD_INVALID, field=f"{field}.{bank}")
        digests[bank] = _parse_hex(value, f"{field}.{bank}", size=size)
    return MappingProxyType(digests)


def _parse_firmware(unverified: Any, field: str) -> FirmwareReference:
    if not isinstance(unverified, Mapping):
        raise PolicyError("must be an object with scrtm and platform_firmware",
                          code=POLICY_FIELD_INVALID, field=field)
    unknown = sorted(set(unverified) - {"scrtm", "platform_firmware"})
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r}", code=POLICY_FIELD_INVALID,
                          field=f"{field}.{unknown[0]}")
    scrtm = _parse_digests(_require_in(unverified, "scrtm", field), f"{field}.scrtm")
    blobs = _require_in(unverified, "platform_firmware", field)
    if not isinstance(blobs, list):
        raise PolicyError(f"must be an array, got {_json_type(blobs)}", code=POLICY_FIELD_INVALID,
                          field=f"{field}.platform_firmware")
    firmware = tuple(
        _parse_digests(blob, f"{field}.platform_firmware[{i}]") for i, blob in enumerate(blobs)
    )
    return FirmwareReference(scrtm, firmware)


def _parse_kernel(unverified: Any, field: str, has_secureboot: bool) -> KernelReference:
    if not isinstance(unverified, Mapping):
        raise PolicyError("must be an object", code=POLICY_FIELD_INVALID, field=field)
    unknown = sorted(set(unverified) - {*_KERNEL_DIGEST_KEYS, "kernel_cmdline"})
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r}", code=POLICY_FIELD_INVALID,
                          field=f"{field}.{unknown[0]}")

    # Secure Boot: shim verifies the kernel and measures its Authenticode digest into PCR 4.
    # Without it, GRUB measures the kernel file into PCR 9.
    kernel_key = "kernel_authcode_sha256" if has_secureboot else "vmlinuz_plain_sha256"
    required = ("shim_authcode_sha256", "grub_authcode_sha256", kernel_key, "initrd_plain_sha256")
    digests: dict[str, bytes] = {}
    for key in _KERNEL_DIGEST_KEYS:
        path = f"{field}.{key}"
        if key in unverified:
            digests[key] = _parse_hex(unverified[key], path, size=32)
        elif key in required:
            raise PolicyError(f"{key!r} is required", code=POLICY_FIELD_MISSING, field=path)

    cmdline = _require_in(unverified, "kernel_cmdline", field)
    if not isinstance(cmdline, str):
        raise PolicyError("must be a regular expression string", code=POLICY_FIELD_INVALID,
                          field=f"{field}.kernel_cmdline")
    try:
        pattern = re.compile("kernel_cmdline: " + cmdline)
    except re.error as error:
        raise PolicyError(f"not a valid regular expression: {error}", code=POLICY_FIELD_INVALID,
                          field=f"{field}.kernel_cmdline") from None

    return KernelReference(
        shim=digests["shim_authcode_sha256"],
        grub=digests["grub_authcode_sha256"],
        kernel=digests.get("kernel_authcode_sha256"),
        vmlinuz=digests.get("vmlinuz_plain_sha256"),
        initrd=digests["initrd_plain_sha256"],
        kernel_cmdline=cmdline,
        kernel_cmdline_pattern=pattern,
    )


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


# --- Evaluation -------------------------------------------------------------------------------


def evaluate_measured_boot(
    policy: MeasuredBootPolicy,
    event_log: EventLog,
    *,
    quoted_pcrs: Collection[int] | None = None,
) -> list[Finding]:
    """Evaluate an event log against a measured-boot policy.

    ``event_log`` must already replay to the PCRs of a verified quote
    (``evidence.eventlog.verify_event_log``); ``quoted_pcrs`` are that quote's PCR indexes.
    Steps:

    1. The quote must cover PCRs 0-9 and 14, else ``mb-pcr-not-quoted`` and nothing else
       is checked.
    2. Each event must be expected in its PCR and appear no more often than allowed, else
       ``mb-event-unexpected``. Events that the reference state constrains are checked as
       they come: the Secure Boot databases (``mb-pk-mismatch``, ``mb-kek-mismatch``,
       ``mb-db-mismatch``, ``mb-vendor-db-mismatch``) and the MOK lists
       (``mb-moklist-not-allowed``, ``mb-moklistx-not-allowed``).
    3. The SecureBoot variable must match ``has_secureboot`` (``mb-secureboot-disabled``,
       ``mb-secureboot-enabled``), and dbx must contain every listed entry
       (``mb-dbx-missing-entries``).
    4. The S-CRTM version and platform firmware must match one ``scrtm_and_bios`` entry
       (``mb-scrtm-not-allowed``, ``mb-platform-firmware-not-allowed``).
    5. The boot applications, initrd and kernel command line must all match one ``kernels``
       entry (``mb-kernel-not-allowed``, ``mb-initrd-not-allowed``,
       ``mb-kernel-cmdline-not-allowed``).
    """
    if quoted_pcrs is not None:
        missing = sorted(RELEVANT_PCRS - set(quoted_pcrs))
        if missing:
            return [_finding(
                MB_PCR_NOT_QUOTED,
                f"the quote does not cover PCRs {missing}, which the measured-boot policy checks",
                missing_pcrs=missing,
            )]

    walk = _EventWalk(policy)
    for event in event_log.events:
        walk.check(event)

    findings = walk.findings
    findings.extend(_check_secure_boot(policy, walk))
    findings.extend(_check_firmware(policy, walk))
    findings.extend(_check_kernels(policy, walk))
    return findings


def _finding(code: str, message: str, event: Event | None = None, **context: Any) -> Finding:
    if event is not None:
        context = {"event": event.index, "pcr": event.pcr, "event_type": event.type_name,
                   **context}
    return Finding(code, Severity.ERROR, message, context)


# Strings that firmware measures with EV_EFI_ACTION, by PCR (PFP, "EV_EFI_ACTION Event Types").
_EFI_ACTIONS: Final = MappingProxyType({
    1: frozenset({"Entering ROM Based Setup"}),
    4: frozenset({"Calling EFI Application from Boot Option",
                  "Returning from EFI Application from Boot Option"}),
    5: frozenset({"Exit Boot Services Invocation", "Exit Boot Services Returned with Failure",
                  "Exit Boot Services Returned with Success"}),
})

# Events allowed once per boot, and EV_PLATFORM_CONFIG_FLAGS, which edk2 measures up to four
# times.
_ONCE: Final = 1
_MAX_COUNTS: Final[Mapping[tuple[int, int], int]] = MappingProxyType({
    (1, EventType.EV_CPU_MICROCODE): _ONCE,
    (1, EventType.EV_EFI_HANDOFF_TABLES): _ONCE,
    (1, EventType.EV_EFI_HANDOFF_TABLES2): _ONCE,
    (1, EventType.EV_PLATFORM_CONFIG_FLAGS): 4,
    (5, EventType.EV_EFI_GPT_EVENT): _ONCE,
})

_BOOT_VARIABLE_NAME: Final = re.compile("BootOrder|Boot[0-9a-fA-F]+")
_FIRMWARE_BLOB_TYPES: Final = (EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB,
                               EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2)

# GRUB's PCR 9 file measurements, in the order they are tried: boot loader entries and GRUB's
# own files are not checked, the kernel file and the initrd are.
_LOADER_ENTRY_PATH: Final = re.compile(r".*/loader/entries.*")
_GRUB_PATH: Final = re.compile(r".*/grub.*")
_VMLINUZ_PATH: Final = re.compile(r".*/vmlinuz.*")
_INITRD_PATH: Final = re.compile(r".*/(initrd|initramfs).*")
# GRUB's PCR 8 strings: commands are not checked, the kernel command line is.
_GRUB_COMMAND: Final = re.compile("grub_cmd: .*", re.DOTALL)
_KERNEL_CMDLINE: Final = re.compile("kernel_cmdline: .*")

_X509_OR_SHA256: Final = frozenset({EFI_CERT_X509_GUID, EFI_CERT_SHA256_GUID})


class _EventWalk:
    """Checks each event in turn and collects the events that the reference state matches."""

    def __init__(self, policy: MeasuredBootPolicy) -> None:
        self.policy = policy
        self.findings: list[Finding] = []
        self._counts: dict[object, int] = {}

        self.secure_boot_values: list[UefiVariable] = []
        self.dbx: UefiVariable | None = None
        self.s_crtm_versions: list[Event] = []
        self.firmware_blobs: list[Event] = []
        self.boot_applications: list[Event] = []
        self.vmlinuz: list[Event] = []
        self.initrds: list[Event] = []
        self.kernel_cmdlines: list[Event] = []

        self._handlers: dict[tuple[int, int], Callable[[Event], None]] = {
            (0, EventType.EV_S_CRTM_VERSION): self.s_crtm_versions.append,
            (1, EventType.EV_EFI_VARIABLE_BOOT): self._boot_variable,
            (2, EventType.EV_EFI_BOOT_SERVICES_DRIVER): _accept,
            (4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION): self.boot_applications.append,
            (7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG): self._secure_boot_variable,
            (7, EventType.EV_EFI_VARIABLE_AUTHORITY): self._authority,
            (8, EventType.EV_IPL): self._grub_string,
            (9, EventType.EV_IPL): self._grub_file,
            (14, EventType.EV_IPL): self._mok,
        }
        for blob_type in _FIRMWARE_BLOB_TYPES:
            self._handlers[(0, blob_type)] = self.firmware_blobs.append
        for key in _MAX_COUNTS:
            self._handlers[key] = _accept
        for pcr in _EFI_ACTIONS:
            self._handlers[(pcr, EventType.EV_EFI_ACTION)] = self._efi_action
        for pcr in range(8):
            self._handlers[(pcr, EventType.EV_SEPARATOR)] = self._separator

    def check(self, event: Event) -> None:
        if event.event_type == EventType.EV_NO_ACTION:
            return
        handler = self._handlers.get((event.pcr, event.event_type))
        if handler is None:
            self._unexpected(event, f"{event.type_name} is not expected in PCR {event.pcr}")
            return
        limit = _MAX_COUNTS.get((event.pcr, event.event_type))
        if limit is not None and not self._within_limit((event.pcr, event.event_type), limit, event):
            return
        handler(event)

    def _unexpected(self, event: Event, message: str, **context: Any) -> None:
        self.findings.append(_finding(MB_EVENT_UNEXPECTED, message, event, **context))

    def _within_limit(self, key: object, limit: int, event: Event) -> bool:
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count > limit:
            times = "once" if limit == 1 else f"{limit} times"
            self._unexpected(event, f"{_describe(event)} is measured more than {times}")
            return False
        return True

    def _once(self, key: object, event: Event) -> bool:
        return self._within_limit(key, _ONCE, event)

    # PCR 0-7: separators and firmware actions.

    def _separator(self, event: Event) -> None:
        if event.data != b"\x00\x00\x00\x00" or event_data_matches_digests(event) is False:
            self._unexpected(event, f"EV_SEPARATOR in PCR {event.pcr} has data {event.data.hex()} "
                             "or digests other than the normal separator's (00000000)")

    def _efi_action(self, event: Event) -> None:
        text = event.data.decode("ascii", errors="replace")
        if text not in _EFI_ACTIONS[event.pcr] or event_data_matches_digests(event) is False:
            self._unexpected(event, f"EV_EFI_ACTION {text[:80]!r} is not an action the firmware "
                             f"measures into PCR {event.pcr}, or its digests do not match it")

    # PCR 1: boot variables.

    def _boot_variable(self, event: Event) -> None:
        variable = event.decoded
        if (not isinstance(variable, UefiVariable) or variable.vendor_guid != EFI_GLOBAL_VARIABLE
                or not _BOOT_VARIABLE_NAME.fullmatch(variable.name)):
            self._unexpected(event, f"{_describe(event)} is not a BootOrder or Boot#### variable")

    # PCR 7: Secure Boot configuration and authorities.

    def _secure_boot_variable(self, event: Event) -> None:
        variable = event.decoded
        if not isinstance(variable, UefiVariable):
            self._unexpected(event, "EV_EFI_VARIABLE_DRIVER_CONFIG data is not a UEFI variable")
            return
        key = (variable.vendor_guid, variable.name)

        if key == (EFI_GLOBAL_VARIABLE, "SecureBoot"):
            self.secure_boot_values.append(variable)
        elif key == (EFI_GLOBAL_VARIABLE, "PK"):
            if self._once(("config", key), event):
                self._check_subset(event, variable, self.policy.pk, MB_PK_MISMATCH,
                                   frozenset({EFI_CERT_X509_GUID}))
        elif key == (EFI_GLOBAL_VARIABLE, "KEK"):
            if self._once(("config", key), event):
                self._check_subset(event, variable, self.policy.kek, MB_KEK_MISMATCH,
                                   frozenset({EFI_CERT_X509_GUID}))
        elif key == (EFI_IMAGE_SECURITY_DATABASE, "db"):
            if self._once(("config", key), event):
                self._check_subset(event, variable, self.policy.db, MB_DB_MISMATCH,
                                   _X509_OR_SHA256)
        elif key == (EFI_IMAGE_SECURITY_DATABASE, "vendor_db"):
            if self._once(("config", key), event):
                self._check_subset(event, variable, self.policy.vendor_db, MB_VENDOR_DB_MISMATCH,
                                   _X509_OR_SHA256)
        elif key == (EFI_IMAGE_SECURITY_DATABASE, "dbx"):
            if self._once(("config", key), event):
                self.dbx = variable
        else:
            self._unexpected(event, f"{_describe(event)} is not a Secure Boot variable the "
                             "policy expects")

    def _check_subset(self, event: Event, variable: UefiVariable, allowed: Sequence[Signature],
                      code: str, signature_types: frozenset[UUID]) -> None:
        """Check that every entry of a measured signature database is allowed.

        Without Secure Boot and with nothing listed, any content passes, as the firmware then
        does not enforce the database.
        """
        if not self.policy.has_secureboot and not allowed:
            return
        if variable.signature_lists is None and variable.data:
            self.findings.append(_finding(
                code, f"{variable.name} is not a list of EFI signature lists", event))
            return

        allowed_set = frozenset(allowed)
        for signature_list in variable.signature_lists or ():
            if signature_list.signature_type not in signature_types:
                self.findings.append(_finding(
                    code, f"{variable.name} has a signature list of type "
                    f"{signature_list.signature_type}, which the policy does not allow there",
                    event, signature_type=str(signature_list.signature_type)))
                continue
            for entry in signature_list.signatures:
                if Signature(entry.owner, entry.data) not in allowed_set:
                    self.findings.append(_finding(
                        code, f"{variable.name} contains an entry owned by {entry.owner} that "
                        "the policy does not list", event,
                        owner=str(entry.owner), data=entry.data.hex()[:128]))

    def _authority(self, event: Event) -> None:
        variable = event.decoded
        if not isinstance(variable, UefiVariable):
            self._unexpected(event, "EV_EFI_VARIABLE_AUTHORITY data is not a UEFI variable")
            return
        key = (variable.vendor_guid, variable.name)
        if key not in _AUTHORITIES:
            self._unexpected(event, f"{_describe(event)} is not an authority the policy expects")
            return
        if not self._once(("authority", key), event):
            return

        if key == (EFI_IMAGE_SECURITY_DATABASE, "vendor_db"):
            self._check_vendor_db_authority(event, variable)
        elif key == (SHIM_LOCK_GUID, "MokListTrusted") and len(variable.data) != 1:
            self._unexpected(event, f"MokListTrusted has {len(variable.data)} bytes, expected 1")

    def _check_vendor_db_authority(self, event: Event, variable: UefiVariable) -> None:
        if not self.policy.has_secureboot and not self.policy.vendor_db:
            return
        entry = variable.signature
        if entry is None or Signature(entry.owner, entry.data) not in self.policy.vendor_db:
            self.findings.append(_finding(
                MB_VENDOR_DB_MISMATCH, "shim verified an image with a vendor_db entry that the "
                "policy does not list", event))

    # PCR 8, 9 and 14: GRUB's strings and files, shim's MOK lists.

    def _grub_string(self, event: Event) -> None:
        text = _ipl_text(event)
        if _GRUB_COMMAND.fullmatch(text):
            return
        if _KERNEL_CMDLINE.fullmatch(text):
            self.kernel_cmdlines.append(event)
            return
        self._unexpected(event, f"EV_IPL in PCR 8 is neither a GRUB command nor a kernel "
                         f"command line: {text[:80]!r}")

    def _grub_file(self, event: Event) -> None:
        text = _ipl_text(event)
        if _LOADER_ENTRY_PATH.fullmatch(text) or _GRUB_PATH.fullmatch(text):
            return
        if _VMLINUZ_PATH.fullmatch(text):
            self.vmlinuz.append(event)
        elif _INITRD_PATH.fullmatch(text):
            self.initrds.append(event)
        else:
            self._unexpected(event, f"EV_IPL in PCR 9 measures a file the policy does not "
                             f"expect: {text[:80]!r}")

    def _mok(self, event: Event) -> None:
        text = _ipl_text(event)
        if text == "MokList":
            if not _matches_any(event.digests, self.policy.mokdig):
                self.findings.append(_finding(
                    MB_MOKLIST_NOT_ALLOWED, "the measured MokList has a digest that mokdig does "
                    "not list", event, digests=_digests_json(event.digests)))
        elif text == "MokListX":
            if not _matches_any(event.digests, self.policy.mokxdig):
                self.findings.append(_finding(
                    MB_MOKLISTX_NOT_ALLOWED, "the measured MokListX has a digest that mokxdig "
                    "does not list", event, digests=_digests_json(event.digests)))
        elif text == "MokListTrusted":
            self._once(("mok", text), event)
        else:
            self._unexpected(event, f"EV_IPL in PCR 14 measures {text[:80]!r}, not a MOK list")


_AUTHORITIES: Final = frozenset({
    (EFI_IMAGE_SECURITY_DATABASE, "db"),
    (EFI_IMAGE_SECURITY_DATABASE, "vendor_db"),
    (SHIM_LOCK_GUID, "SbatLevel"),
    (SHIM_LOCK_GUID, "Shim"),
    (SHIM_LOCK_GUID, "MokListTrusted"),
    (SHIM_LOCK_GUID, "MokListRT"),
})


def _accept(_event: Event) -> None:
    return None


def _describe(event: Event) -> str:
    variable = event.decoded
    if isinstance(variable, UefiVariable):
        return f"{event.type_name} of variable {variable.vendor_guid}:{variable.name}"
    return f"{event.type_name} in PCR {event.pcr}"


def _ipl_text(event: Event) -> str:
    if isinstance(event.decoded, IplText):
        return event.decoded.text
    return event.data.decode("utf-8", errors="replace").rstrip("\x00")


def _matches(digests: Mapping[str, bytes], reference: Digests) -> bool:
    """Tell whether one bank's digest of a measurement equals the reference's for that bank."""
    return any(reference.get(bank) == value for bank, value in digests.items())


def _matches_any(digests: Mapping[str, bytes], references: Sequence[Digests]) -> bool:
    return any(_matches(digests, reference) for reference in references)


def _digests_json(digests: Mapping[str, bytes]) -> dict[str, str]:
    return {bank: value.hex() for bank, value in digests.items()}


def _check_secure_boot(policy: MeasuredBootPolicy, walk: _EventWalk) -> list[Finding]:
    findings = []
    if policy.has_secureboot and not walk.secure_boot_values:
        findings.append(_finding(MB_SECUREBOOT_DISABLED, "the policy requires Secure Boot, but "
                                 "the event log does not measure the SecureBoot variable"))
    for variable in walk.secure_boot_values:
        enabled = variable.data == b"\x01"
        if policy.has_secureboot and not enabled:
            findings.append(_finding(MB_SECUREBOOT_DISABLED, "Secure Boot is disabled, but the "
                                     "policy requires it", value=variable.data.hex()))
        elif not policy.has_secureboot and enabled:
            findings.append(_finding(MB_SECUREBOOT_ENABLED, "Secure Boot is enabled, but the "
                                     "policy was made for a boot without it"))

    if policy.dbx and (policy.has_secureboot or walk.dbx is not None):
        measured = frozenset() if walk.dbx is None else frozenset(
            Signature(entry.owner, entry.data) for entry in walk.dbx.signatures
        )
        missing = [entry for entry in policy.dbx if entry not in measured]
        if missing:
            findings.append(_finding(
                MB_DBX_MISSING_ENTRIES,
                f"dbx lacks {len(missing)} of the {len(policy.dbx)} entries the policy requires"
                + ("" if walk.dbx is not None else " (dbx is not measured)"),
                missing=[entry.data.hex() for entry in missing[:10]],
            ))
    return findings


def _check_firmware(policy: MeasuredBootPolicy, walk: _EventWalk) -> list[Finding]:
    """Match the S-CRTM version and platform firmware blobs against ``scrtm_and_bios``."""
    scrtm_matches = [
        entry for entry in policy.scrtm_and_bios
        if len(walk.s_crtm_versions) == 1 and _matches(walk.s_crtm_versions[0].digests, entry.scrtm)
    ]
    if not scrtm_matches:
        return [_finding(
            MB_SCRTM_NOT_ALLOWED,
            f"the S-CRTM version ({len(walk.s_crtm_versions)} EV_S_CRTM_VERSION event(s)) matches "
            "no scrtm_and_bios entry",
            measured=[_digests_json(event.digests) for event in walk.s_crtm_versions],
        )]

    blobs = walk.firmware_blobs
    for entry in scrtm_matches:
        if len(blobs) == len(entry.platform_firmware) and all(
            _matches(event.digests, reference)
            for event, reference in zip(blobs, entry.platform_firmware, strict=True)
        ):
            return []
    return [_finding(
        MB_PLATFORM_FIRMWARE_NOT_ALLOWED,
        f"the {len(blobs)} platform firmware blob(s) match no scrtm_and_bios entry for this S-CRTM",
        measured=[_digests_json(event.digests) for event in blobs],
    )]


def _check_kernels(policy: MeasuredBootPolicy, walk: _EventWalk) -> list[Finding]:
    """Find a ``kernels`` entry that matches the whole boot chain.

    When none does, report each part of the chain that no entry matches, or, when every part
    matches some entry, that no single entry matches them all.
    """
    parts = {
        MB_KERNEL_NOT_ALLOWED: [_boot_chain_matches(policy, kernel, walk) for kernel in policy.kernels],
        MB_INITRD_NOT_ALLOWED: [_single_match(walk.initrds, kernel.initrd)
                                for kernel in policy.kernels],
        MB_KERNEL_CMDLINE_NOT_ALLOWED: [_cmdline_matches(kernel, walk) for kernel in policy.kernels],
    }
    if any(all(part[i] for part in parts.values()) for i in range(len(policy.kernels))):
        return []

    findings = []
    if not any(parts[MB_KERNEL_NOT_ALLOWED]):
        findings.append(_finding(
            MB_KERNEL_NOT_ALLOWED,
            "the boot applications (shim, GRUB, kernel) match no kernels entry",
            boot_applications=[_digests_json(event.digests) for event in walk.boot_applications],
            kernel_files=[_digests_json(event.digests) for event in walk.vmlinuz],
        ))
    if not any(parts[MB_INITRD_NOT_ALLOWED]):
        findings.append(_finding(
            MB_INITRD_NOT_ALLOWED,
            f"the initrd ({len(walk.initrds)} measured in PCR 9) matches no kernels entry",
            initrds=[_digests_json(event.digests) for event in walk.initrds],
        ))
    if not any(parts[MB_KERNEL_CMDLINE_NOT_ALLOWED]):
        findings.append(_finding(
            MB_KERNEL_CMDLINE_NOT_ALLOWED,
            f"the kernel command line ({len(walk.kernel_cmdlines)} measured in PCR 8) matches "
            "no kernels entry",
            kernel_cmdlines=[_ipl_text(event)[:512] for event in walk.kernel_cmdlines],
        ))
    if not findings:
        findings.append(_finding(
            MB_KERNEL_NOT_ALLOWED,
            "each part of the boot chain matches some kernels entry, but no single entry "
            "matches them all",
        ))
    return findings


def _boot_chain_matches(policy: MeasuredBootPolicy, kernel: KernelReference,
                        walk: _EventWalk) -> bool:
    applications = walk.boot_applications
    if policy.has_secureboot:
        # shim, GRUB and the kernel; some boots measure the kernel twice.
        chain = [kernel.shim, kernel.grub, kernel.kernel]
        chains = [chain, [*chain, kernel.kernel]]
        kernel_file_matches = len(walk.vmlinuz) == 1
    else:
        # Without Secure Boot, GRUB loads the kernel without shim's verification, so the
        # kernel is not a boot application; GRUB's PCR 9 measurement of the file is checked.
        chains = [[kernel.shim, kernel.grub]]
        kernel_file_matches = kernel.vmlinuz is not None and _single_match(walk.vmlinuz,
                                                                           kernel.vmlinuz)
    chain_matches = any(
        len(applications) == len(expected) and all(
            value is not None and event.digests.get("sha256") == value
            for event, value in zip(applications, expected, strict=True)
        )
        for expected in chains
    )
    return chain_matches and kernel_file_matches


def _single_match(events: Sequence[Event], sha256: bytes) -> bool:
    return len(events) == 1 and events[0].digests.get("sha256") == sha256


def _cmdline_matches(kernel: KernelReference, walk: _EventWalk) -> bool:
    return len(walk.kernel_cmdlines) == 1 and bool(
        kernel.kernel_cmdline_pattern.fullmatch(_ipl_text(walk.kernel_cmdlines[0]))
    )
