"""UEFI event logs of our own making, for tests.

``EventLogBuilder`` writes crypto-agile logs (a ``Spec ID Event03`` header, then
TCG_PCR_EVENT2 events) or SHA-1-format logs (TCG_PCClientPCREvent only), and computes the PCR
values a TPM would hold after the same extensions, independently of ``evidence.eventlog``:

    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.startup_locality(3)
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le"))
    builder.separator(range(8))
    raw = builder.build()
    builder.expected_pcrs()      # {"sha1": {0: ..., 1: ...}, "sha256": {...}}
    builder.measurements()       # what to extend into a TPM (swtpm) to match the log

The ``encode_*`` functions and device path node helpers write the structures inside event data
(UEFI_VARIABLE_DATA, EFI_SIGNATURE_LIST, UEFI_IMAGE_LOAD_EVENT, device paths ...). All
integers are little-endian, as in the TCG PC Client Platform Firmware Profile.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from uuid import UUID

# Event types (TCG PC Client Platform Firmware Profile).
EV_POST_CODE = 0x00000001
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_S_CRTM_CONTENTS = 0x00000007
EV_S_CRTM_VERSION = 0x00000008
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

# TPM_ALG_ID and digest size of the banks a builder can hash.
BANKS: dict[str, tuple[int, int]] = {
    "sha1": (0x0004, 20),
    "sha256": (0x000B, 32),
    "sha384": (0x000C, 48),
    "sha512": (0x000D, 64),
}

EFI_GLOBAL_VARIABLE = UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIM_LOCK_GUID = UUID("605dab50-e046-4300-abb6-3dd810dd8b23")
EFI_CERT_X509_GUID = UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = UUID("c1c41626-504c-4092-aca9-41f936934328")

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"


@dataclass(frozen=True)
class UnknownAlgorithm:
    """A hash algorithm that the Spec ID event declares but Python cannot compute; its digest
    in every event is ``fill`` repeated to ``digest_size`` bytes."""

    alg_id: int
    digest_size: int
    fill: int = 0xAB


@dataclass
class BuiltEvent:
    pcr: int
    event_type: int
    digests: dict[str, bytes]
    data: bytes


@dataclass
class EventLogBuilder:
    """An event log under construction; see the module docstring.

    ``banks`` are the known algorithms every event carries, in TPML_DIGEST_VALUES order.
    ``crypto_agile=False`` writes the SHA-1 format and needs ``banks=("sha1",)``.
    """

    banks: Sequence[str] = ("sha1", "sha256")
    crypto_agile: bool = True
    unknown_algorithms: Sequence[UnknownAlgorithm] = ()
    vendor_info: bytes = b""
    events: list[BuiltEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.crypto_agile and tuple(self.banks) != ("sha1",):
            raise ValueError("a SHA-1-format log has the sha1 bank only")

    # Events.

    def add(
        self,
        pcr: int,
        event_type: int,
        data: bytes = b"",
        *,
        measured: bytes | None = None,
        digests: Mapping[str, bytes] | None = None,
    ) -> BuiltEvent:
        """Append an event whose digests hash ``measured`` (default: ``data``) in every bank;
        ``digests`` overrides the digest of the banks it names."""
        content = data if measured is None else measured
        event_digests = {bank: hashlib.new(bank, content).digest() for bank in self.banks}
        if digests is not None:
            event_digests.update(digests)
        event = BuiltEvent(pcr, event_type, event_digests, data)
        self.events.append(event)
        return event

    def no_action(self, data: bytes, *, pcr: int = 0, digest_fill: int = 0) -> BuiltEvent:
        """Append an EV_NO_ACTION event; its digests are ``digest_fill`` bytes (zeros in real
        logs)."""
        digests = {bank: bytes([digest_fill]) * BANKS[bank][1] for bank in self.banks}
        return self.add(pcr, EV_NO_ACTION, data, digests=digests)

    def startup_locality(self, locality: int) -> BuiltEvent:
        return self.no_action(STARTUP_LOCALITY_SIGNATURE + bytes([locality]))

    def separator(self, pcrs: Iterable[int], value: int = 0) -> None:
        for pcr in pcrs:
            self.add(pcr, EV_SEPARATOR, struct.pack("<I", value))

    def efi_variable(
        self, pcr: int, event_type: int, vendor_guid: UUID, name: str, value: bytes
    ) -> BuiltEvent:
        """Append a UEFI variable measurement; the digest covers the whole
        UEFI_VARIABLE_DATA, as the PFP requires for EV_EFI_VARIABLE_DRIVER_CONFIG."""
        return self.add(pcr, event_type, encode_variable_data(vendor_guid, name, value))

    def image_load(
        self, pcr: int, event_type: int, image: bytes, device_path: bytes = b""
    ) -> BuiltEvent:
        """Append an image load event; the digest hashes ``image``, standing in for the
        image's Authenticode hash."""
        return self.add(pcr, event_type, encode_image_load_event(device_path), measured=image)

    def grub_string(self, label: str, value: str, *, pcr: int = 8) -> BuiltEvent:
        """Append a GRUB EV_IPL string: data ``label: value`` plus NUL, digest over ``value``."""
        data = f"{label}: {value}".encode() + b"\x00"
        return self.add(pcr, EV_IPL, data, measured=value.encode())

    def systemd_boot_command_line(self, command_line: str, *, pcr: int = 12) -> BuiltEvent:
        """Append a systemd-boot EV_IPL kernel command line: UTF-16LE with its NUL, digest over
        the same bytes."""
        return self.add(pcr, EV_IPL, command_line.encode("utf-16-le") + b"\x00\x00")

    # Output.

    def build(self) -> bytes:
        if not self.crypto_agile:
            return b"".join(
                encode_sha1_event(e.pcr, e.event_type, e.digests["sha1"], e.data)
                for e in self.events
            )
        header = encode_sha1_event(0, EV_NO_ACTION, bytes(20), self.spec_id_data())
        body = b"".join(self._encode_event2(event) for event in self.events)
        return header + body

    def spec_id_data(self) -> bytes:
        algorithms = [BANKS[bank] for bank in self.banks]
        algorithms += [(u.alg_id, u.digest_size) for u in self.unknown_algorithms]
        return encode_spec_id_data(algorithms, self.vendor_info)

    def _encode_event2(self, event: BuiltEvent) -> bytes:
        digests = [(BANKS[bank][0], event.digests[bank]) for bank in self.banks]
        digests += [
            (u.alg_id, bytes([u.fill]) * u.digest_size) for u in self.unknown_algorithms
        ]
        return encode_event2(event.pcr, event.event_type, digests, event.data)

    def measurements(self) -> list[tuple[int, dict[str, bytes]]]:
        """The (PCR, {bank: digest}) extensions a TPM receives for this log, in order;
        EV_NO_ACTION events extend nothing."""
        return [
            (event.pcr, dict(event.digests))
            for event in self.events
            if event.event_type != EV_NO_ACTION
        ]

    def initial_locality(self) -> int | None:
        """PCR 0's initial last byte: 4 after an H-CRTM event, else the StartupLocality."""
        if any(e.event_type == EV_EFI_HCRTM_EVENT and e.pcr == 0 for e in self.events):
            return 4
        for event in self.events:
            if (
                event.event_type == EV_NO_ACTION
                and event.pcr == 0
                and len(event.data) == 17
                and event.data.startswith(STARTUP_LOCALITY_SIGNATURE)
            ):
                return event.data[16]
        return None

    def expected_pcrs(self) -> dict[str, dict[int, bytes]]:
        """Compute the PCR values a TPM contains after ``measurements()``, per bank."""
        locality = self.initial_locality()
        result: dict[str, dict[int, bytes]] = {}
        for bank in self.banks:
            size = BANKS[bank][1]
            values: dict[int, bytes] = {}
            if locality is not None:
                values[0] = bytes(size - 1) + bytes([locality])
            for pcr, digests in self.measurements():
                old = values.get(pcr, bytes(size))
                values[pcr] = hashlib.new(bank, old + digests[bank]).digest()
            result[bank] = values
        return result


# Event framing.


def encode_sha1_event(pcr: int, event_type: int, digest: bytes, data: bytes) -> bytes:
    """TCG_PCClientPCREvent: u32 PCR, u32 type, 20-byte digest, u32 size, data."""
    return struct.pack("<II20sI", pcr, event_type, digest, len(data)) + data


def encode_event2(
    pcr: int, event_type: int, digests: Sequence[tuple[int, bytes]], data: bytes
) -> bytes:
    """TCG_PCR_EVENT2 with TPML_DIGEST_VALUES given as (TPM_ALG_ID, digest) pairs."""
    body = b"".join(struct.pack("<H", alg_id) + digest for alg_id, digest in digests)
    header = struct.pack("<III", pcr, event_type, len(digests))
    return header + body + struct.pack("<I", len(data)) + data


def encode_spec_id_data(
    algorithms: Sequence[tuple[int, int]], vendor_info: bytes = b"", *, uintn_size: int = 2
) -> bytes:
    """TCG_EfiSpecIDEvent data for (TPM_ALG_ID, digest size) pairs."""
    fixed = struct.pack("<16sIBBBBI", SPEC_ID_SIGNATURE, 0, 0, 2, 0, uintn_size, len(algorithms))
    table = b"".join(struct.pack("<HH", alg_id, size) for alg_id, size in algorithms)
    return fixed + table + bytes([len(vendor_info)]) + vendor_info


# Event data.


def encode_variable_data(vendor_guid: UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA: GUID, u64 name length in UTF-16 code units, u64 data length,
    name (UTF-16LE, no NUL) and data."""
    encoded_name = name.encode("utf-16-le")
    header = struct.pack("<16sQQ", vendor_guid.bytes_le, len(encoded_name) // 2, len(value))
    return header + encoded_name + value


def encode_signature_data(owner: UUID, signature: bytes) -> bytes:
    return owner.bytes_le + signature


def encode_signature_list(
    signature_type: UUID, entries: Sequence[tuple[UUID, bytes]], header: bytes = b""
) -> bytes:
    """EFI_SIGNATURE_LIST of (owner, signature) entries, which must be of equal size."""
    sizes = {len(signature) for _owner, signature in entries}
    if len(sizes) > 1:
        raise ValueError("signatures in one EFI_SIGNATURE_LIST must have the same size")
    signature_size = 16 + (sizes.pop() if sizes else 0)
    body = b"".join(encode_signature_data(owner, signature) for owner, signature in entries)
    list_size = 28 + len(header) + len(body)
    return (
        struct.pack("<16sIII", signature_type.bytes_le, list_size, len(header), signature_size)
        + header
        + body
    )


def encode_image_load_event(
    device_path: bytes, *, location: int = 0, length: int = 0, link_time_address: int = 0
) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT: u64 location, length, link-time address, device path length,
    then the device path."""
    header = struct.pack("<QQQQ", location, length, link_time_address, len(device_path))
    return header + device_path


def encode_firmware_blob(base: int, length: int) -> bytes:
    return struct.pack("<QQ", base, length)


def encode_firmware_blob2(description: bytes, base: int, length: int) -> bytes:
    return bytes([len(description)]) + description + struct.pack("<QQ", base, length)


def encode_load_option(
    description: str, device_path: bytes, *, attributes: int = 1, optional_data: bytes = b""
) -> bytes:
    """EFI_LOAD_OPTION, the contents of a Boot#### variable."""
    encoded = description.encode("utf-16-le") + b"\x00\x00"
    return struct.pack("<IH", attributes, len(device_path)) + encoded + device_path + optional_data


# Device path nodes (EFI_DEVICE_PATH_PROTOCOL): u8 type, u8 subtype, u16 length, payload.


def device_path_node(node_type: int, subtype: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BBH", node_type, subtype, 4 + len(payload)) + payload


def acpi_node(hid: int = 0x0A0341D0, uid: int = 0) -> bytes:
    """ACPI node; the default HID is PNP0A03, a PCI root bridge."""
    return device_path_node(0x02, 0x01, struct.pack("<II", hid, uid))


def pci_node(device: int, function: int) -> bytes:
    return device_path_node(0x01, 0x01, struct.pack("<BB", function, device))


def sata_node(hba_port: int, multiplier_port: int = 0xFFFF, lun: int = 0) -> bytes:
    return device_path_node(0x03, 0x12, struct.pack("<HHH", hba_port, multiplier_port, lun))


def nvme_node(namespace_id: int, eui64: bytes = bytes(8)) -> bytes:
    return device_path_node(0x03, 0x17, struct.pack("<I", namespace_id) + eui64)


def hard_drive_node(number: int, start: int, size: int, partition_guid: UUID) -> bytes:
    """GPT partition node (MBR type 2, signature type 2)."""
    payload = struct.pack("<IQQ16sBB", number, start, size, partition_guid.bytes_le, 2, 2)
    return device_path_node(0x04, 0x01, payload)


def file_path_node(path: str) -> bytes:
    return device_path_node(0x04, 0x04, path.encode("utf-16-le") + b"\x00\x00")


def end_node() -> bytes:
    return device_path_node(0x7F, 0xFF)
