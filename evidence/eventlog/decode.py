"""Decoding of event data into the typed layouts of ``evidence.eventlog.data``.

Decoders never raise. Data that does not have the layout its event type calls for is left
undecoded (None) and stays raw bytes on the event. Firmware writes many variants, and an
unfamiliar one is no reason to reject a log: only the event framing, which the parser checks,
can make a log malformed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from uuid import UUID

from evidence.eventlog.data import (
    EventData,
    FirmwareBlob,
    GptData,
    GptPartition,
    GuidData,
    HandoffTables,
    ImageLoadEvent,
    IplText,
    LoadOption,
    Separator,
    SignatureData,
    SignatureList,
    StartupLocality,
    Text,
    UefiVariable,
)
from evidence.eventlog.devicepath import DevicePathError, device_path_to_text
from evidence.eventlog.types import SIGNATURE_DATABASE_NAMES, EventType

STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"

_U64 = struct.Struct("<Q")
_U64_PAIR = struct.Struct("<QQ")
_VARIABLE_HEADER = struct.Struct("<16sQQ")
_IMAGE_LOAD_HEADER = struct.Struct("<QQQQ")
_SIGNATURE_LIST_HEADER = struct.Struct("<16sIII")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")

# GRUB prefixes the strings it measures into PCR 8 with one of these labels.
_GRUB_LABELS = ("kernel_cmdline", "module_cmdline", "grub_cmd", "grub_kernel_cmdline")


def decode_event_data(event_type: int, data: bytes) -> EventData | None:
    """Decode ``data`` by the layout the PFP defines for ``event_type``. Return None if the
    type has no such layout or the data does not fit it."""
    decoder = _DECODERS.get(event_type)
    if decoder is None:
        return None
    return decoder(data)


def decode_text(data: bytes) -> Text | None:
    """Decode printable ASCII/UTF-8 or UTF-16LE text, dropping trailing NULs."""
    decoded = _decode_string(data)
    if decoded is None:
        return None
    text, encoding = decoded
    return Text(text, encoding)


def _decode_string(data: bytes) -> tuple[str, str] | None:
    if not data:
        return None
    utf8 = _printable(data, "utf-8")
    if utf8 is not None:
        return utf8, "utf-8"
    # systemd-boot releases have logged UTF-16LE strings followed by one extra NUL byte.
    if len(data) % 2 == 1 and data.endswith(b"\x00"):
        data = data[:-1]
    if len(data) % 2 == 0:
        utf16 = _printable(data, "utf-16-le")
        if utf16 is not None:
            return utf16, "utf-16-le"
    return None


def _printable(data: bytes, encoding: str) -> str | None:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    text = text.rstrip("\x00")
    if not text:
        return None
    if all(char.isprintable() or char in "\t\n\r" for char in text):
        return text
    return None


def _no_action(data: bytes) -> EventData | None:
    if len(data) == len(STARTUP_LOCALITY_SIGNATURE) + 1 and data.startswith(
        STARTUP_LOCALITY_SIGNATURE
    ):
        return StartupLocality(data[-1])
    return None


def _separator(data: bytes) -> EventData | None:
    if len(data) != 4:
        return None
    return Separator(int.from_bytes(data, "little"))


def _post_code(data: bytes) -> EventData | None:
    # A 16-byte POST code is a firmware blob (base, length) unless it is printable text.
    text = decode_text(data)
    if len(data) == _U64_PAIR.size and text is None:
        return _firmware_blob(data)
    return text


def _s_crtm_version(data: bytes) -> EventData | None:
    if data and not data.strip(b"\x00"):
        return Text("", "utf-16-le" if len(data) % 2 == 0 else "utf-8")
    text = decode_text(data)
    if text is not None:
        return text
    if len(data) == 16:
        return GuidData(UUID(bytes_le=data))
    return None


def _s_crtm_contents(data: bytes) -> EventData | None:
    # Firmware logs the S-CRTM as a firmware blob (16 bytes), a described blob, or text
    # such as "Boot Guard Measured S-CRTM".
    text = decode_text(data)
    if len(data) == _U64_PAIR.size and text is None:
        return _firmware_blob(data)
    blob2 = _firmware_blob2(data)
    if blob2 is not None:
        return blob2
    return text


def _firmware_blob(data: bytes) -> FirmwareBlob | None:
    if len(data) != _U64_PAIR.size:
        return None
    base, length = _U64_PAIR.unpack(data)
    return FirmwareBlob(base, length)


def _firmware_blob2(data: bytes) -> FirmwareBlob | None:
    if not data:
        return None
    size = data[0]
    if len(data) != 1 + size + _U64_PAIR.size:
        return None
    description = _decode_string(data[1 : 1 + size])
    if description is None and size:
        return None
    base, length = _U64_PAIR.unpack_from(data, 1 + size)
    return FirmwareBlob(base, length, description[0] if description else "")


def _ipl(data: bytes) -> EventData | None:
    decoded = _decode_string(data)
    if decoded is None:
        return None
    text, encoding = decoded
    label, separator, value = text.partition(": ")
    if separator and label in _GRUB_LABELS:
        return IplText(text, encoding, label, value)
    return IplText(text, encoding, None, text)


def _image_load(data: bytes) -> EventData | None:
    if len(data) < _IMAGE_LOAD_HEADER.size:
        return None
    location, length, link_address, path_length = _IMAGE_LOAD_HEADER.unpack_from(data)
    # Old shim releases log a few bytes past the device path (padding of their structure).
    path_end = _IMAGE_LOAD_HEADER.size + path_length
    if len(data) < path_end:
        return None
    path = data[_IMAGE_LOAD_HEADER.size : path_end]
    return ImageLoadEvent(location, length, link_address, path, _device_path_text(path))


def _device_path_text(path: bytes) -> str | None:
    try:
        return device_path_to_text(path)
    except DevicePathError:
        return None


def _handoff_tables(data: bytes) -> EventData | None:
    return _handoff_table_pointers(data, 0, None)


def _handoff_tables2(data: bytes) -> EventData | None:
    if not data:
        return None
    size = data[0]
    if len(data) < 1 + size:
        return None
    description = _decode_string(data[1 : 1 + size])
    if description is None and size:
        return None
    return _handoff_table_pointers(data, 1 + size, description[0] if description else "")


def _handoff_table_pointers(data: bytes, offset: int, description: str | None) -> EventData | None:
    if len(data) < offset + _U64.size:
        return None
    (count,) = _U64.unpack_from(data, offset)
    offset += _U64.size
    if len(data) != offset + count * 24:
        return None
    tables = tuple(
        (UUID(bytes_le=data[start : start + 16]), _U64.unpack_from(data, start + 16)[0])
        for start in range(offset, len(data), 24)
    )
    return HandoffTables(tables, description)


def _gpt(data: bytes) -> EventData | None:
    if len(data) < _GPT_HEADER.size + _U64.size:
        return None
    header = _GPT_HEADER.unpack_from(data)
    signature, disk_guid, entry_size = header[0], header[9], header[12]
    if signature != b"EFI PART" or entry_size < _GPT_ENTRY.size:
        return None
    (count,) = _U64.unpack_from(data, _GPT_HEADER.size)
    start = _GPT_HEADER.size + _U64.size
    if len(data) != start + count * entry_size:
        return None
    partitions = []
    for offset in range(start, len(data), entry_size):
        type_guid, unique_guid, first, last, attributes, raw_name = _GPT_ENTRY.unpack_from(
            data, offset
        )
        try:
            name = raw_name.decode("utf-16-le").split("\x00", 1)[0]
        except UnicodeDecodeError:
            return None
        partitions.append(
            GptPartition(
                UUID(bytes_le=type_guid), UUID(bytes_le=unique_guid), first, last, attributes, name
            )
        )
    return GptData(UUID(bytes_le=disk_guid), tuple(partitions))


def _efi_action(data: bytes) -> EventData | None:
    return decode_text(data)


def _variable(data: bytes) -> UefiVariable | None:
    """Decode UEFI_VARIABLE_DATA: vendor GUID, u64 name length in UTF-16 code units, u64 data
    length, the name and the data."""
    if len(data) < _VARIABLE_HEADER.size:
        return None
    guid, name_length, data_length = _VARIABLE_HEADER.unpack_from(data)
    name_end = _VARIABLE_HEADER.size + 2 * name_length
    # Some shim releases pad the structure with a few bytes past the variable data. The
    # lengths inside it still give where the name and the data end.
    if len(data) < name_end + data_length:
        return None
    try:
        name = data[_VARIABLE_HEADER.size : name_end].decode("utf-16-le").rstrip("\x00")
    except UnicodeDecodeError:
        return None
    return UefiVariable(UUID(bytes_le=guid), name, data[name_end : name_end + data_length])


def _variable_config(data: bytes) -> EventData | None:
    variable = _variable(data)
    if variable is None or variable.name not in SIGNATURE_DATABASE_NAMES:
        return variable
    signature_lists = decode_signature_lists(variable.data)
    if signature_lists is None:
        return variable
    return UefiVariable(variable.vendor_guid, variable.name, variable.data, signature_lists)


def _variable_boot(data: bytes) -> EventData | None:
    variable = _variable(data)
    if variable is None:
        return None
    if variable.name == "BootOrder" and len(variable.data) % 2 == 0:
        count = len(variable.data) // 2
        order = struct.unpack(f"<{count}H", variable.data)
        return UefiVariable(variable.vendor_guid, variable.name, variable.data, boot_order=order)
    if _is_boot_option_name(variable.name):
        option = decode_load_option(variable.data)
        if option is not None:
            return UefiVariable(
                variable.vendor_guid, variable.name, variable.data, load_option=option
            )
    return variable


def _is_boot_option_name(name: str) -> bool:
    suffix = name[4:]
    return (
        name.startswith("Boot")
        and len(suffix) == 4
        and all(char in "0123456789ABCDEFabcdef" for char in suffix)
    )


def _variable_authority(data: bytes) -> EventData | None:
    variable = _variable(data)
    if variable is None or variable.name not in SIGNATURE_DATABASE_NAMES:
        return variable
    # The authority is the one EFI_SIGNATURE_DATA entry of the database that verified the
    # image: owner GUID then the signature, with no list header.
    if len(variable.data) <= 16:
        return variable
    entry = SignatureData(UUID(bytes_le=variable.data[:16]), variable.data[16:])
    return UefiVariable(variable.vendor_guid, variable.name, variable.data, signature=entry)


def decode_signature_lists(data: bytes) -> tuple[SignatureList, ...] | None:
    """Decode a sequence of EFI_SIGNATURE_LIST structures that fills ``data`` exactly.
    Return None if the sizes are inconsistent, and an empty tuple for empty data."""
    lists: list[SignatureList] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _SIGNATURE_LIST_HEADER.size:
            return None
        raw_type, list_size, header_size, signature_size = _SIGNATURE_LIST_HEADER.unpack_from(
            data, offset
        )
        body_start = offset + _SIGNATURE_LIST_HEADER.size + header_size
        end = offset + list_size
        if signature_size < 16 or end > len(data) or body_start > end:
            return None
        if (end - body_start) % signature_size != 0:
            return None
        signature_type = UUID(bytes_le=raw_type)
        entries = tuple(
            SignatureData(
                UUID(bytes_le=data[start : start + 16]),
                data[start + 16 : start + signature_size],
                signature_type,
            )
            for start in range(body_start, end, signature_size)
        )
        header = data[offset + _SIGNATURE_LIST_HEADER.size : body_start]
        lists.append(SignatureList(signature_type, header, entries))
        offset = end
    return tuple(lists)


def decode_load_option(data: bytes) -> LoadOption | None:
    """Decode EFI_LOAD_OPTION: u32 attributes, u16 device path length, a NUL-terminated
    UTF-16 description, the device path, then optional data."""
    if len(data) < 6:
        return None
    attributes, path_length = struct.unpack_from("<IH", data)
    description_end = _utf16_terminator(data, 6)
    if description_end is None:
        return None
    try:
        description = data[6:description_end].decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    path_start = description_end + 2
    path_end = path_start + path_length
    if path_end > len(data):
        return None
    path = data[path_start:path_end]
    return LoadOption(attributes, description, path, _device_path_text(path), data[path_end:])


def _utf16_terminator(data: bytes, start: int) -> int | None:
    for offset in range(start, len(data) - 1, 2):
        if data[offset] == 0 and data[offset + 1] == 0:
            return offset
    return None


_DECODERS: dict[int, Callable[[bytes], EventData | None]] = {
    EventType.EV_NO_ACTION: _no_action,
    EventType.EV_SEPARATOR: _separator,
    EventType.EV_POST_CODE: _post_code,
    EventType.EV_ACTION: _efi_action,
    EventType.EV_EFI_ACTION: _efi_action,
    EventType.EV_S_CRTM_VERSION: _s_crtm_version,
    EventType.EV_S_CRTM_CONTENTS: _s_crtm_contents,
    EventType.EV_EFI_HCRTM_EVENT: _efi_action,
    EventType.EV_IPL: _ipl,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB: _firmware_blob,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2: _firmware_blob2,
    EventType.EV_EFI_BOOT_SERVICES_APPLICATION: _image_load,
    EventType.EV_EFI_BOOT_SERVICES_DRIVER: _image_load,
    EventType.EV_EFI_RUNTIME_SERVICES_DRIVER: _image_load,
    EventType.EV_EFI_HANDOFF_TABLES: _handoff_tables,
    EventType.EV_EFI_HANDOFF_TABLES2: _handoff_tables2,
    EventType.EV_EFI_GPT_EVENT: _gpt,
    EventType.EV_EFI_VARIABLE_DRIVER_CONFIG: _variable_config,
    EventType.EV_EFI_VARIABLE_BOOT: _variable_boot,
    EventType.EV_EFI_VARIABLE_BOOT2: _variable_boot,
    EventType.EV_EFI_VARIABLE_AUTHORITY: _variable_authority,
}
