"""A parsed UEFI event log: typed events and the values that a measured-boot policy reads.

The accessors at the end of ``EventLog`` return the parts of a Keylime-style measured-boot
reference state. These are the S-CRTM and firmware digests, the Secure Boot databases, the
Authenticode digests of the boot applications (shim, GRUB, kernel), the kernel command lines
and shim's MOK lists. None of them is trusted until the log replays to the quoted PCRs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evidence.eventlog.data import EventData, IplText, SpecIdEvent, UefiVariable
from evidence.eventlog.types import EventType, HashAlgorithm, event_type_name

# PCR numbers that the PFP and the boot loaders (shim, GRUB, systemd-boot) assign.
PCR_FIRMWARE = 0
PCR_BOOT_MANAGER = 4
PCR_SECURE_BOOT_POLICY = 7
PCR_BOOT_LOADER_STRINGS = 8
PCR_KERNEL_PARAMETERS = 12
PCR_MOK = 14

_FIRMWARE_EVENT_TYPES = frozenset(
    {
        EventType.EV_S_CRTM_CONTENTS,
        EventType.EV_S_CRTM_VERSION,
        EventType.EV_POST_CODE,
        EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB,
        EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the log (TCG_PCR_EVENT2, or TCG_PCClientPCREvent in a SHA-1 log).

    ``index`` counts events from 0, the Spec ID event included, as ``tpm2_eventlog`` numbers
    them. ``offset`` is the event's first byte in the log. ``digests`` maps a PCR bank name
    (``sha1``, ``sha256`` ...) to the digest logged for it, in log order. ``decoded`` is the
    typed view of ``data`` where the event type defines one and the data fits it.
    """

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes
    decoded: EventData | None

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    @property
    def extends_pcr(self) -> bool:
        """False for ``EV_NO_ACTION``, whose digests are never extended into a PCR."""
        return self.event_type != EventType.EV_NO_ACTION

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "index": self.index,
            "offset": self.offset,
            "pcr": self.pcr,
            "type": self.type_name,
            "type_value": self.event_type,
            "digests": {bank: digest.hex() for bank, digest in self.digests.items()},
        }
        if self.decoded is not None:
            result["decoded"] = self.decoded.to_json()
        else:
            result["data"] = self.data.hex()
        return result


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed, not yet verified UEFI event log.

    ``spec_id`` is None for a log in the SHA-1 format (TCG 1.2 style, no Spec ID event).
    ``algorithms`` are the banks every event carries a digest for: the Spec ID event's table,
    or SHA-1 alone. ``startup_locality`` is the locality of TPM2_Startup that an
    ``EV_NO_ACTION`` StartupLocality event records, or None without one.
    ``h_crtm`` is True when an ``EV_EFI_HCRTM_EVENT`` in PCR 0 shows that an H-CRTM sequence
    reset PCR 0 to locality 4.
    """

    events: tuple[Event, ...]
    spec_id: SpecIdEvent | None
    algorithms: tuple[HashAlgorithm, ...]
    startup_locality: int | None
    h_crtm: bool = False

    @property
    def crypto_agile(self) -> bool:
        return self.spec_id is not None

    @property
    def bank_names(self) -> tuple[str, ...]:
        return tuple(algorithm.name for algorithm in self.algorithms)

    def events_in_pcr(self, pcr: int) -> tuple[Event, ...]:
        return tuple(event for event in self.events if event.pcr == pcr)

    def events_of_type(self, *event_types: int) -> tuple[Event, ...]:
        wanted = frozenset(event_types)
        return tuple(event for event in self.events if event.event_type in wanted)

    def to_json(self) -> list[dict[str, Any]]:
        return [event.to_json() for event in self.events]

    # Values of a measured-boot reference state.

    @property
    def firmware_events(self) -> tuple[Event, ...]:
        """PCR 0 events measuring the S-CRTM (contents and version) and platform firmware
        (POST code, firmware blobs): Keylime's ``scrtm_and_bios``."""
        return tuple(
            event
            for event in self.events
            if event.pcr == PCR_FIRMWARE and event.event_type in _FIRMWARE_EVENT_TYPES
        )

    def secure_boot_variable(self, name: str) -> UefiVariable | None:
        """Return the last ``EV_EFI_VARIABLE_DRIVER_CONFIG`` measurement of variable ``name``
        in PCR 7 (``SecureBoot``, ``PK``, ``KEK``, ``db``, ``dbx`` ...), or None."""
        found: UefiVariable | None = None
        for event in self.events:
            if (
                event.pcr == PCR_SECURE_BOOT_POLICY
                and event.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG
                and isinstance(event.decoded, UefiVariable)
                and event.decoded.name == name
            ):
                found = event.decoded
        return found

    @property
    def secure_boot_enabled(self) -> bool | None:
        """Whether the measured ``SecureBoot`` variable is 1, or None if it was not measured."""
        variable = self.secure_boot_variable("SecureBoot")
        if variable is None:
            return None
        return variable.data == b"\x01"

    @property
    def authorities(self) -> tuple[UefiVariable, ...]:
        """PCR 7 ``EV_EFI_VARIABLE_AUTHORITY`` measurements: the db or shim entries that
        verified a loaded image, and shim's ``SbatLevel``, ``MokListTrusted`` ..."""
        return tuple(
            event.decoded
            for event in self.events
            if event.pcr == PCR_SECURE_BOOT_POLICY
            and event.event_type == EventType.EV_EFI_VARIABLE_AUTHORITY
            and isinstance(event.decoded, UefiVariable)
        )

    @property
    def boot_applications(self) -> tuple[Event, ...]:
        """PCR 4 ``EV_EFI_BOOT_SERVICES_APPLICATION`` events in load order (shim, GRUB or
        systemd-boot, the kernel). Each digest is the image's Authenticode hash in that
        bank."""
        return tuple(
            event
            for event in self.events
            if event.pcr == PCR_BOOT_MANAGER
            and event.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION
        )

    @property
    def kernel_command_lines(self) -> tuple[str, ...]:
        """Kernel command lines that boot loaders measured: GRUB's ``kernel_cmdline: ...`` in
        PCR 8 and systemd-boot's UTF-16LE strings in PCR 12 (older releases: PCR 8)."""
        # NOTE: systemd's stub also measures other UTF-16 strings into PCR 12 (credential
        # and add-on names); they are listed here as well.
        lines: list[str] = []
        for event in self.events_of_type(EventType.EV_IPL):
            decoded = event.decoded
            if not isinstance(decoded, IplText):
                continue
            if decoded.label == "kernel_cmdline":
                lines.append(decoded.value)
            elif decoded.encoding == "utf-16-le" and event.pcr in (
                PCR_BOOT_LOADER_STRINGS,
                PCR_KERNEL_PARAMETERS,
            ):
                lines.append(decoded.text)
        return tuple(lines)

    def mok_events(self, name: str = "MokList") -> tuple[Event, ...]:
        """Return the PCR 14 ``EV_IPL`` events in which shim measured variable ``name``
        (``MokList``, ``MokListX``, ``MokSBState``). Their data is only the name, but their
        digests cover the variable's contents (Keylime's ``mokdig`` and ``mokxdig``)."""
        return tuple(
            event
            for event in self.events
            if event.pcr == PCR_MOK
            and event.event_type == EventType.EV_IPL
            and isinstance(event.decoded, IplText)
            and event.decoded.text == name
        )
