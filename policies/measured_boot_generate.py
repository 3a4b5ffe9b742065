"""Create a measured-boot policy (Keylime's reference-state format) from a known-good event log.

The policy records what this boot measured, as ``keylime-policy create measured-boot`` of
Keylime 7.14.3 does:

- ``has_secureboot``: the measured SecureBoot variable.
- ``scrtm_and_bios``: the first S-CRTM version and every platform firmware blob.
- ``pk``, ``kek``, ``db``, ``dbx``: every entry of the last measurement of each variable.
- ``vendor_db``: the entries that shim's vendor_db authorities name.
- ``mokdig``, ``mokxdig``: the digests of shim's MokList and MokListX measurements.
- ``kernels``: one entry. It has the Authenticode digests of the boot applications that are
  not firmware volume files: shim, GRUB and, with Secure Boot, the kernel. It has the first
  initrd that GRUB measured into PCR 9 and, without Secure Boot, the first kernel file. Its
  command line is the first one GRUB measured into PCR 8, escaped as a regular expression.

Keylime writes a reference state that fails every evaluation where the log lacks a part
(an S-CRTM version, an initrd, a command line, a SHA-256 digest). This module raises
PolicyError naming the missing part instead.

Public API::

    create_measured_boot_policy(event_log: EventLog, *, allow_without_secureboot=False)
        -> dict[str, Any]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from evidence.eventlog import (
    Event,
    EventLog,
    EventType,
    ImageLoadEvent,
    IplText,
    UefiVariable,
)
from policies.errors import POLICY_SOURCE_INVALID, PolicyError
from policies.measured_boot import parse_measured_boot_policy

# Boot applications that firmware loads from its own volumes (setup menus, boot managers).
# Their digests have no reference values, so they are left out of ``kernels``.
_FIRMWARE_VOLUME_FILE: Final = re.compile(
    r"(Fv|FvVol)\(\w{8}-\w{4}-\w{4}-\w{4}-\w{12}\)/FvFile\(\w{8}-\w{4}-\w{4}-\w{4}-\w{12}\)"
)
_SIGNATURE_DATABASES: Final = ("pk", "kek", "db", "dbx")
_KERNEL_CMDLINE_PREFIX: Final = "kernel_cmdline: "


def create_measured_boot_policy(
    event_log: EventLog, *, allow_without_secureboot: bool = False
) -> dict[str, Any]:
    """Return the measured-boot policy document for the boot that ``event_log`` records.

    A log with Secure Boot disabled raises PolicyError unless ``allow_without_secureboot``
    is set. The result is validated with ``parse_measured_boot_policy`` before it is returned.
    """
    has_secureboot = event_log.secure_boot_enabled is True
    if not has_secureboot and not allow_without_secureboot:
        raise PolicyError(
            "the event log shows Secure Boot disabled; allow a policy without Secure Boot "
            "to create one anyway", code=POLICY_SOURCE_INVALID,
        )

    document: dict[str, Any] = {
        "has_secureboot": has_secureboot,
        "scrtm_and_bios": [_firmware(event_log)],
        **_signature_databases(event_log),
        "vendor_db": _vendor_db(event_log),
        "mokdig": [_sha256(event) for event in _mok_events(event_log, "MokList")],
        "mokxdig": [_sha256(event) for event in _mok_events(event_log, "MokListX")],
        "kernels": [_kernel(event_log, has_secureboot)],
    }
    parse_measured_boot_policy(document)
    return document


def _sha256(event: Event) -> dict[str, str]:
    digest = event.digests.get("sha256")
    if digest is None:
        raise PolicyError(
            f"event {event.index} ({event.type_name}) has no SHA-256 digest; measured-boot "
            "policies need an event log with a SHA-256 bank", code=POLICY_SOURCE_INVALID,
        )
    return {"sha256": "0x" + digest.hex()}


def _firmware(event_log: EventLog) -> dict[str, Any]:
    versions = event_log.events_of_type(EventType.EV_S_CRTM_VERSION)
    if not versions:
        raise PolicyError("the event log has no EV_S_CRTM_VERSION event to take the S-CRTM "
                          "version from", code=POLICY_SOURCE_INVALID)
    blobs = event_log.events_of_type(EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB,
                                     EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2)
    return {"scrtm": _sha256(versions[0]), "platform_firmware": [_sha256(e) for e in blobs]}


def _signature_databases(event_log: EventLog) -> dict[str, list[dict[str, str]]]:
    databases: dict[str, list[dict[str, str]]] = {name: [] for name in _SIGNATURE_DATABASES}
    for event in event_log.events_of_type(EventType.EV_EFI_VARIABLE_DRIVER_CONFIG):
        variable = event.decoded
        if not isinstance(variable, UefiVariable):
            continue
        name = variable.name.lower()
        if name in databases:
            databases[name] = [
                {"SignatureOwner": str(entry.owner), "SignatureData": "0x" + entry.data.hex()}
                for entry in variable.signatures
            ]
    return databases


def _vendor_db(event_log: EventLog) -> list[dict[str, str]]:
    entries = []
    for event in event_log.events_of_type(EventType.EV_EFI_VARIABLE_AUTHORITY):
        variable = event.decoded
        if not isinstance(variable, UefiVariable) or variable.name.lower() != "vendor_db":
            continue
        if variable.signature is not None:
            entries.append({"SignatureOwner": str(variable.signature.owner),
                            "SignatureData": "0x" + variable.signature.data.hex()})
    return entries


def _mok_events(event_log: EventLog, name: str) -> list[Event]:
    return [event for event in event_log.events_of_type(EventType.EV_IPL)
            if _ipl_text(event) == name]


def _kernel(event_log: EventLog, has_secureboot: bool) -> dict[str, str]:
    applications = [
        event for event in event_log.events_of_type(EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
        if not _is_firmware_volume_file(event)
    ]
    expected = "3 or 4 (shim, GRUB, kernel)" if has_secureboot else "2 (shim, GRUB)"
    if len(applications) not in ((3, 4) if has_secureboot else (2,)):
        raise PolicyError(
            f"the event log has {len(applications)} boot applications outside firmware volumes, "
            f"expected {expected}", code=POLICY_SOURCE_INVALID,
        )

    kernel = {
        "shim_authcode_sha256": _sha256(applications[0])["sha256"],
        "grub_authcode_sha256": _sha256(applications[1])["sha256"],
    }
    if has_secureboot:
        kernel["kernel_authcode_sha256"] = _sha256(applications[2])["sha256"]

    pcr9_files = [event for event in event_log.events_of_type(EventType.EV_IPL) if event.pcr == 9]
    initrd = _first(pcr9_files, lambda text: "initrd" in text or "initramfs" in text, "initrd")
    kernel["initrd_plain_sha256"] = _sha256(initrd)["sha256"]
    if not has_secureboot:
        vmlinuz = _first(pcr9_files, lambda text: "vmlinuz" in text, "kernel file (vmlinuz)")
        kernel["vmlinuz_plain_sha256"] = _sha256(vmlinuz)["sha256"]

    pcr8_strings = [event for event in event_log.events_of_type(EventType.EV_IPL) if event.pcr == 8]
    cmdline = _first(pcr8_strings, lambda text: "kernel_cmdline" in text, "kernel command line")
    kernel["kernel_cmdline"] = re.escape(_ipl_text(cmdline)[len(_KERNEL_CMDLINE_PREFIX):])
    return kernel


def _first(events: list[Event], matches: Callable[[str], bool], description: str) -> Event:
    for event in events:
        if matches(_ipl_text(event)):
            return event
    raise PolicyError(f"the event log has no {description} measured by GRUB",
                      code=POLICY_SOURCE_INVALID)


def _is_firmware_volume_file(event: Event) -> bool:
    decoded = event.decoded
    path = decoded.device_path_text if isinstance(decoded, ImageLoadEvent) else None
    return path is not None and _FIRMWARE_VOLUME_FILE.match(path) is not None


def _ipl_text(event: Event) -> str:
    if isinstance(event.decoded, IplText):
        return event.decoded.text
    return event.data.decode("utf-8", errors="replace").rstrip("\x00")
