"""UEFI device paths (EFI_DEVICE_PATH_PROTOCOL) converted to the text form of the UEFI
specification's "Device Path to Text" rules, e.g.
``PciRoot(0x0)/Pci(0x1d,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)/HD(1,GPT,...)/\\EFI\\BOOT\\BOOTX64.EFI``.

The common hardware, ACPI, messaging and media nodes get their names. Any other node, and a
known node too short for its fields, prints as ``Path(type,subtype,hex data)``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from uuid import UUID

HARDWARE = 0x01
ACPI = 0x02
MESSAGING = 0x03
MEDIA = 0x04
BIOS_BOOT = 0x05
END = 0x7F
END_ENTIRE = 0xFF
END_INSTANCE = 0x01

_NODE_HEADER = struct.Struct("<BBH")


class DevicePathError(ValueError):
    """A device path whose node lengths do not fit its bytes."""


def device_path_to_text(raw: bytes) -> str:
    """Convert a device path to text. Raise DevicePathError if a node length is invalid."""
    parts: list[str] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < _NODE_HEADER.size:
            raise DevicePathError(f"device path node at offset {offset} is truncated")
        node_type, subtype, length = _NODE_HEADER.unpack_from(raw, offset)
        if length < _NODE_HEADER.size or offset + length > len(raw):
            raise DevicePathError(
                f"device path node at offset {offset} has length {length}, "
                f"expected 4 to {len(raw) - offset}"
            )
        payload = raw[offset + _NODE_HEADER.size : offset + length]
        offset += length

        if node_type == END and subtype == END_ENTIRE:
            break
        if node_type == END and subtype == END_INSTANCE:
            parts.append(",")
            continue
        parts.append(_node_to_text(node_type, subtype, payload))
    return _join(parts)


def _join(parts: list[str]) -> str:
    text = ""
    for part in parts:
        if part == "," or not text or text.endswith(","):
            text += part
        else:
            text += "/" + part
    return text


def _node_to_text(node_type: int, subtype: int, payload: bytes) -> str:
    formatter = _FORMATTERS.get((node_type, subtype))
    if formatter is not None:
        try:
            return formatter(payload)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError):
            pass
    return f"Path({node_type},{subtype},{payload.hex()})"


def _guid(payload: bytes, offset: int = 0) -> UUID:
    if len(payload) < offset + 16:
        raise ValueError("GUID truncated")
    return UUID(bytes_le=payload[offset : offset + 16])


def _vendor(name: str) -> Callable[[bytes], str]:
    def format_vendor(payload: bytes) -> str:
        guid = _guid(payload)
        extra = payload[16:]
        return f"{name}({guid},{extra.hex()})" if extra else f"{name}({guid})"

    return format_vendor


def _pci(payload: bytes) -> str:
    function, device = struct.unpack_from("<BB", payload)
    return f"Pci(0x{device:x},0x{function:x})"


def _controller(payload: bytes) -> str:
    (number,) = struct.unpack_from("<I", payload)
    return f"Ctrl(0x{number:x})"


def _memory_mapped(payload: bytes) -> str:
    memory_type, start, end = struct.unpack_from("<IQQ", payload)
    return f"MemoryMapped(0x{memory_type:x},0x{start:x},0x{end:x})"


def _eisa_id(hid: int) -> str:
    """Decode a compressed EISA id: three 5-bit letters in the low 16 bits, product number in
    the high 16 bits (0x0a0341d0 is PNP0A03)."""
    vendor = hid & 0xFFFF
    letters = "".join(chr(((vendor >> shift) & 0x1F) + 0x40) for shift in (10, 5, 0))
    return f"{letters}{hid >> 16:04X}"


_ACPI_NAMES = {"PNP0A03": "PciRoot", "PNP0A08": "PcieRoot", "PNP0604": "Floppy",
               "PNP0301": "Keyboard", "PNP0501": "Serial", "PNP0401": "ParallelPort"}


def _acpi(payload: bytes) -> str:
    hid, uid = struct.unpack_from("<II", payload)
    eisa = _eisa_id(hid)
    name = _ACPI_NAMES.get(eisa)
    if name is not None:
        return f"{name}(0x{uid:x})"
    return f"Acpi({eisa},0x{uid:x})"


def _acpi_expanded(payload: bytes) -> str:
    hid, uid, cid = struct.unpack_from("<III", payload)
    strings = payload[12:].split(b"\x00")
    hid_str, uid_str, cid_str = (strings + [b"", b"", b""])[:3]
    return (
        f"AcpiEx({_eisa_id(hid)},{_eisa_id(cid)},0x{uid:x},"
        f"{hid_str.decode('ascii')},{cid_str.decode('ascii')},{uid_str.decode('ascii')})"
    )


def _acpi_adr(payload: bytes) -> str:
    count = len(payload) // 4
    if count == 0:
        raise ValueError("AcpiAdr without an address")
    addresses = struct.unpack_from(f"<{count}I", payload)
    return "AcpiAdr(" + ",".join(f"0x{address:x}" for address in addresses) + ")"


def _ata(payload: bytes) -> str:
    primary, slave, lun = struct.unpack_from("<BBH", payload)
    channel = "Secondary" if primary else "Primary"
    drive = "Slave" if slave else "Master"
    return f"Ata({channel},{drive},0x{lun:x})"


def _scsi(payload: bytes) -> str:
    target, lun = struct.unpack_from("<HH", payload)
    return f"Scsi(0x{target:x},0x{lun:x})"


def _usb(payload: bytes) -> str:
    port, interface = struct.unpack_from("<BB", payload)
    return f"USB(0x{port:x},0x{interface:x})"


def _usb_class(payload: bytes) -> str:
    vendor, product, device_class, subclass, protocol = struct.unpack_from("<HHBBB", payload)
    return (
        f"UsbClass(0x{vendor:x},0x{product:x},0x{device_class:x},"
        f"0x{subclass:x},0x{protocol:x})"
    )


def _mac(payload: bytes) -> str:
    if len(payload) < 33:
        raise ValueError("MAC node truncated")
    interface_type = payload[32]
    size = 6 if interface_type in (0, 1) else 32
    return f"MAC({payload[:size].hex()},0x{interface_type:x})"


def _ipv4(payload: bytes) -> str:
    local, remote = payload[0:4], payload[4:8]
    local_port, remote_port, protocol, static = struct.unpack_from("<HHHB", payload, 8)
    protocol_name = {6: "TCP", 17: "UDP"}.get(protocol, f"0x{protocol:x}")
    origin = "Static" if static else "DHCP"
    return (
        f"IPv4({'.'.join(map(str, remote))}:{remote_port},{protocol_name},{origin},"
        f"{'.'.join(map(str, local))}:{local_port})"
    )


def _unit(payload: bytes) -> str:
    return f"Unit(0x{payload[0]:x})"


def _sata(payload: bytes) -> str:
    hba_port, multiplier_port, lun = struct.unpack_from("<HHH", payload)
    return f"Sata(0x{hba_port:x},0x{multiplier_port:x},0x{lun:x})"


def _nvme(payload: bytes) -> str:
    (namespace_id,) = struct.unpack_from("<I", payload)
    eui = payload[4:12]
    if len(eui) != 8:
        raise ValueError("NVMe EUI-64 truncated")
    return f"NVMe(0x{namespace_id:x},{'-'.join(f'{byte:02X}' for byte in eui)})"


def _uri(payload: bytes) -> str:
    return f"Uri({payload.decode('ascii')})"


def _slot(name: str) -> Callable[[bytes], str]:
    def format_slot(payload: bytes) -> str:
        return f"{name}(0x{payload[0]:x})"

    return format_slot


def _hard_drive(payload: bytes) -> str:
    number, start, size = struct.unpack_from("<IQQ", payload)
    signature = payload[20:36]
    partition_format, signature_type = struct.unpack_from("<BB", payload, 36)
    if signature_type == 2:
        return f"HD({number},GPT,{UUID(bytes_le=signature)},0x{start:x},0x{size:x})"
    if signature_type == 1:
        (mbr_signature,) = struct.unpack_from("<I", signature)
        return f"HD({number},MBR,0x{mbr_signature:08x},0x{start:x},0x{size:x})"
    return f"HD({number},{partition_format},0,0x{start:x},0x{size:x})"


def _cdrom(payload: bytes) -> str:
    entry, start, size = struct.unpack_from("<IQQ", payload)
    return f"CDROM(0x{entry:x},0x{start:x},0x{size:x})"


def _file_path(payload: bytes) -> str:
    return payload.decode("utf-16-le").split("\x00", 1)[0]


def _guid_node(name: str) -> Callable[[bytes], str]:
    def format_guid_node(payload: bytes) -> str:
        return f"{name}({_guid(payload)})"

    return format_guid_node


def _offset(payload: bytes) -> str:
    _reserved, start, end = struct.unpack_from("<IQQ", payload)
    return f"Offset(0x{start:x},0x{end:x})"


def _bbs(payload: bytes) -> str:
    device_type, status = struct.unpack_from("<HH", payload)
    description = payload[4:].split(b"\x00", 1)[0].decode("ascii")
    return f"BBS(0x{device_type:x},{description},0x{status:x})"


_FORMATTERS: dict[tuple[int, int], Callable[[bytes], str]] = {
    (HARDWARE, 1): _pci,
    (HARDWARE, 3): _memory_mapped,
    (HARDWARE, 4): _vendor("VenHw"),
    (HARDWARE, 5): _controller,
    (ACPI, 1): _acpi,
    (ACPI, 2): _acpi_expanded,
    (ACPI, 3): _acpi_adr,
    (MESSAGING, 1): _ata,
    (MESSAGING, 2): _scsi,
    (MESSAGING, 5): _usb,
    (MESSAGING, 10): _vendor("VenMsg"),
    (MESSAGING, 11): _mac,
    (MESSAGING, 12): _ipv4,
    (MESSAGING, 15): _usb_class,
    (MESSAGING, 17): _unit,
    (MESSAGING, 18): _sata,
    (MESSAGING, 23): _nvme,
    (MESSAGING, 24): _uri,
    (MESSAGING, 26): _slot("SD"),
    (MESSAGING, 29): _slot("eMMC"),
    (MEDIA, 1): _hard_drive,
    (MEDIA, 2): _cdrom,
    (MEDIA, 3): _vendor("VenMedia"),
    (MEDIA, 4): _file_path,
    (MEDIA, 5): _guid_node("Media"),
    (MEDIA, 6): _guid_node("FvFile"),
    (MEDIA, 7): _guid_node("Fv"),
    (MEDIA, 8): _offset,
    (BIOS_BOOT, 1): _bbs,
}
