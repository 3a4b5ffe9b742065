"""Parsing of UEFI event logs: framing errors, algorithm tables and event data layouts."""

from __future__ import annotations

import struct
import time
from uuid import UUID

import pytest

from evidence.errors import ParseError
from evidence.eventlog import (
    EventLogParseError,
    EventType,
    FirmwareBlob,
    GptData,
    HandoffTables,
    ImageLoadEvent,
    Separator,
    SpecIdEvent,
    StartupLocality,
    Text,
    UefiVariable,
    device_path_to_text,
    event_type_name,
    parse_event_log,
    replay_event_log,
)
from evidence.eventlog.devicepath import DevicePathError
from tests.support.eventlog import (
    EFI_GLOBAL_VARIABLE,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_GPT_EVENT,
    EV_EFI_HANDOFF_TABLES,
    EV_EFI_HCRTM_EVENT,
    EV_EFI_PLATFORM_FIRMWARE_BLOB2,
    EV_EFI_VARIABLE_BOOT,
    EV_NO_ACTION,
    EV_S_CRTM_CONTENTS,
    EV_S_CRTM_VERSION,
    EV_SEPARATOR,
    EventLogBuilder,
    UnknownAlgorithm,
    acpi_node,
    device_path_node,
    encode_event2,
    encode_firmware_blob2,
    encode_load_option,
    encode_sha1_event,
    encode_spec_id_data,
    end_node,
    file_path_node,
    hard_drive_node,
    nvme_node,
    pci_node,
    sata_node,
)

PARTITION = UUID("1a504613-19b5-4b44-a83d-d926d40daa1c")


def _spec_id_header(algorithms: list[tuple[int, int]]) -> bytes:
    return encode_sha1_event(0, EV_NO_ACTION, bytes(20), encode_spec_id_data(algorithms))


def _malformed(raw: bytes) -> EventLogParseError:
    with pytest.raises(EventLogParseError) as caught:
        parse_event_log(raw)
    assert caught.value.code == "eventlog-malformed"
    return caught.value


def test_spec_id_event_decoded_as_first_event() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"), vendor_info=b"vendor")

    log = parse_event_log(builder.build())

    spec_id = log.events[0].decoded
    assert isinstance(spec_id, SpecIdEvent)
    assert spec_id.signature == "Spec ID Event03"
    assert [a.name for a in spec_id.algorithms] == ["sha1", "sha256"]
    assert spec_id.vendor_info == b"vendor"
    assert spec_id.spec_version_major == 2
    assert log.spec_id == spec_id


def test_unknown_algorithm_uses_declared_digest_size() -> None:
    builder = EventLogBuilder(
        banks=("sha256",), unknown_algorithms=(UnknownAlgorithm(0x00FF, 7, fill=0xCD),)
    )
    builder.add(0, EV_S_CRTM_VERSION, b"v\x00")
    builder.separator([0])

    log = parse_event_log(builder.build())
    replayed = replay_event_log(log)

    assert log.bank_names == ("sha256", "alg_0x00ff")
    assert log.events[1].digests["alg_0x00ff"] == b"\xcd" * 7
    assert replayed == builder.expected_pcrs()
    assert "alg_0x00ff" not in replayed


def test_known_algorithm_with_wrong_declared_size_is_malformed() -> None:
    error = _malformed(_spec_id_header([(0x000B, 20)]))

    assert "digest size 20, expected 32" in error.message
    assert error.event_index == 0


@pytest.mark.parametrize(
    ("algorithms", "problem"),
    [
        ([], "declares 0 algorithms"),
        ([(0x0004, 20), (0x0004, 20)], "twice"),
        ([(0x00FF, 0)], "digest size 0"),
    ],
)
def test_spec_id_table_errors(algorithms: list[tuple[int, int]], problem: str) -> None:
    error = _malformed(_spec_id_header(algorithms))

    assert problem in error.message


def test_spec_id_with_trailing_bytes_is_malformed() -> None:
    data = encode_spec_id_data([(0x000B, 32)]) + b"\x00"
    raw = encode_sha1_event(0, EV_NO_ACTION, bytes(20), data)

    error = _malformed(raw)

    assert "its fields need" in error.message


def test_event_digest_algorithm_not_in_table_is_malformed() -> None:
    raw = _spec_id_header([(0x000B, 32)])
    offset = len(raw)
    raw += encode_event2(0, EV_SEPARATOR, [(0x0004, bytes(20))], bytes(4))

    error = _malformed(raw)

    assert error.event_index == 1
    assert error.offset == offset
    assert "digest algorithm 0x0004" in error.message
    assert f"event 1 at byte offset {offset}" in error.message


def test_event_missing_a_declared_bank_is_malformed() -> None:
    raw = _spec_id_header([(0x0004, 20), (0x000B, 32)])
    raw += encode_event2(0, EV_SEPARATOR, [(0x000B, bytes(32))], bytes(4))

    error = _malformed(raw)

    assert "no digest for sha1" in error.message


def test_event_with_duplicate_bank_is_malformed() -> None:
    raw = _spec_id_header([(0x0004, 20), (0x000B, 32)])
    raw += encode_event2(0, EV_SEPARATOR, [(0x000B, bytes(32)), (0x000B, bytes(32))], bytes(4))

    error = _malformed(raw)

    assert "two sha256 digests" in error.message


def test_no_action_event_may_omit_digests() -> None:
    raw = _spec_id_header([(0x0004, 20), (0x000B, 32)])
    raw += encode_event2(0, EV_NO_ACTION, [], b"StartupLocality\x00\x03")

    log = parse_event_log(raw)

    assert log.events[1].digests == {}
    assert log.startup_locality == 3


def test_zero_padding_is_malformed() -> None:
    raw = encode_sha1_event(0, EV_SEPARATOR, bytes(20), bytes(4))

    error = _malformed(raw + bytes(64))

    assert error.event_index == 1
    assert error.offset == len(raw)
    assert "all zero bytes" in error.message


def test_pcr_index_out_of_range_is_malformed() -> None:
    raw = encode_sha1_event(32, EV_SEPARATOR, bytes(20), bytes(4))

    error = _malformed(raw)

    assert "PCR index 32 is out of range 0-31" in error.message


def test_every_truncation_names_event_and_offset() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le"))
    builder.separator(range(3))
    raw = builder.build()
    starts = _event_offsets(raw)

    for length in range(1, len(raw)):
        if length in starts:
            continue
        error = _malformed(raw[:length])
        index = max(i for i, start in enumerate(starts) if start < length)
        assert error.event_index == index, length
        assert error.offset == starts[index], length
        assert f"event {index} at byte offset {starts[index]}" in error.message


def _event_offsets(raw: bytes) -> list[int]:
    log = parse_event_log(raw)
    return [event.offset for event in log.events]


def test_sha1_format_truncated_event_data_is_malformed() -> None:
    raw = encode_sha1_event(0, EV_SEPARATOR, bytes(20), bytes(4))
    raw += struct.pack("<II20sI", 1, EV_SEPARATOR, bytes(20), 100) + bytes(4)

    error = _malformed(raw)

    assert error.event_index == 1
    assert error.offset == 36
    assert "event data size 100 exceeds the 4 bytes left in the log" in error.message


def test_conflicting_startup_localities_are_malformed() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.startup_locality(3)
    builder.startup_locality(0)

    error = _malformed(builder.build())

    assert error.event_index == 2
    assert "contradicts" in error.message


def test_h_crtm_event_starts_pcr0_at_locality_4() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_EFI_HCRTM_EVENT, b"HCRTM", measured=b"H-CRTM code")
    builder.separator([0])

    log = parse_event_log(builder.build())

    assert log.h_crtm
    assert replay_event_log(log) == builder.expected_pcrs()
    assert builder.initial_locality() == 4


def test_parse_error_is_an_evidence_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_event_log(b"\x00")


def test_event_type_names() -> None:
    assert event_type_name(0x0D) == "EV_IPL"
    assert event_type_name(0x800000E0) == "EV_EFI_VARIABLE_AUTHORITY"
    assert event_type_name(0x8401) == "EV_UNKNOWN_0x00008401"
    assert EventType.EV_EFI_HCRTM_EVENT == 0x80000010


def test_event_data_layouts_decode() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.startup_locality(0)
    builder.add(0, EV_S_CRTM_CONTENTS, struct.pack("<QQ", 0xFF000000, 0x1000))
    builder.add(0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, encode_firmware_blob2(b"FVMAIN", 0x800000, 4096))
    builder.add(0, EV_S_CRTM_VERSION, bytes.fromhex("1efb6b540c1d5540a4ad4ef4bf17b83a"))
    builder.add(1, EV_EFI_HANDOFF_TABLES,
                struct.pack("<Q", 1) + EFI_GLOBAL_VARIABLE.bytes_le + struct.pack("<Q", 0x7F000))
    builder.separator([0], value=1)

    decoded = [event.decoded for event in parse_event_log(builder.build()).events[1:]]

    assert decoded[0] == StartupLocality(0)
    assert decoded[1] == FirmwareBlob(0xFF000000, 0x1000)
    assert decoded[2] == FirmwareBlob(0x800000, 4096, "FVMAIN")
    assert decoded[3] is not None and decoded[3].to_json()["guid"] == (
        "546bfb1e-1d0c-4055-a4ad-4ef4bf17b83a"
    )
    assert decoded[4] == HandoffTables(((EFI_GLOBAL_VARIABLE, 0x7F000),))
    assert decoded[5] == Separator(1)


def test_boot_variables_decode_load_option_and_order() -> None:
    boot_file = file_path_node("\\EFI\\BOOT\\BOOTX64.EFI")
    path = acpi_node() + pci_node(0x1D, 0) + nvme_node(1) + boot_file + end_node()
    builder = EventLogBuilder(banks=("sha256",))
    builder.efi_variable(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL_VARIABLE, "BootOrder",
                         struct.pack("<3H", 1, 0, 0x2001))
    builder.efi_variable(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL_VARIABLE, "Boot0001",
                         encode_load_option("Fedora", path, optional_data=b"opt"))

    order, option = (event.decoded for event in parse_event_log(builder.build()).events[1:])

    assert isinstance(order, UefiVariable)
    assert order.boot_order == (1, 0, 0x2001)
    assert order.to_json()["boot_order"] == ["Boot0001", "Boot0000", "Boot2001"]
    assert isinstance(option, UefiVariable)
    assert option.load_option is not None
    assert option.load_option.description == "Fedora"
    assert option.load_option.optional_data == b"opt"
    assert option.load_option.device_path_text == (
        "PciRoot(0x0)/Pci(0x1d,0x0)/NVMe(0x1,00-00-00-00-00-00-00-00)/\\EFI\\BOOT\\BOOTX64.EFI"
    )


def test_image_load_event_device_path_text() -> None:
    path = (
        acpi_node()
        + pci_node(0x17, 0)
        + sata_node(1)
        + hard_drive_node(1, 0x800, 0x80000, PARTITION)
        + file_path_node("\\EFI\\fedora\\shimx64.efi")
        + end_node()
    )
    builder = EventLogBuilder(banks=("sha256",))
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"shim image", path)

    log = parse_event_log(builder.build())
    event = log.boot_applications[0]

    assert isinstance(event.decoded, ImageLoadEvent)
    assert event.decoded.device_path == path
    assert event.decoded.device_path_text == (
        "PciRoot(0x0)/Pci(0x17,0x0)/Sata(0x1,0xffff,0x0)/"
        f"HD(1,GPT,{PARTITION},0x800,0x80000)/\\EFI\\fedora\\shimx64.efi"
    )


def test_device_path_unknown_node_prints_raw_hex() -> None:
    path = device_path_node(0x01, 0x99, b"\xde\xad") + device_path_node(0x04, 0x01, b"\x01") + end_node()

    assert device_path_to_text(path) == "Path(1,153,dead)/Path(4,1,01)"


def test_device_path_bad_length_raises() -> None:
    with pytest.raises(DevicePathError, match="has length 2"):
        device_path_to_text(struct.pack("<BBH", 4, 4, 2))


def test_image_load_broken_device_path() -> None:
    broken = struct.pack("<BBH", 4, 4, 200) + b"abcd"
    builder = EventLogBuilder(banks=("sha256",))
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"image", broken)

    decoded = parse_event_log(builder.build()).events[1].decoded

    assert isinstance(decoded, ImageLoadEvent)
    assert decoded.device_path == broken
    assert decoded.device_path_text is None


def test_gpt_event_decodes_partitions() -> None:
    header = struct.pack(
        "<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, 100, 34, 90,
        PARTITION.bytes_le, 2, 128, 128, 0,
    )
    entry = struct.pack(
        "<16s16sQQQ72s", EFI_GLOBAL_VARIABLE.bytes_le, PARTITION.bytes_le, 2048, 4095, 0,
        "EFI System".encode("utf-16-le"),
    )
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(5, EV_EFI_GPT_EVENT, header + struct.pack("<Q", 1) + entry)

    decoded = parse_event_log(builder.build()).events[1].decoded

    assert isinstance(decoded, GptData)
    assert decoded.disk_guid == PARTITION
    assert decoded.partitions[0].name == "EFI System"
    assert decoded.partitions[0].starting_lba == 2048


def test_unknown_layouts_stay_raw() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(7, 0x800000E0, b"\x00" * 10)
    builder.add(5, EV_EFI_GPT_EVENT, b"not a GPT")
    builder.add(2, 0x00008401, b"\x01")

    events = parse_event_log(builder.build()).events[1:]

    assert [event.decoded for event in events] == [None, None, None]
    assert [event.to_json()["data"] for event in events] == ["00" * 10, b"not a GPT".hex(), "01"]


def test_s_crtm_contents_blob_or_text() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(0, EV_S_CRTM_CONTENTS, struct.pack("<QQ", 0xFFFF0000, 0x10000))
    builder.add(0, EV_S_CRTM_CONTENTS, b"Boot Guard S-CRT")
    builder.add(0, EV_S_CRTM_CONTENTS, b"Boot Guard Measured S-CRTM")

    decoded = [event.decoded for event in parse_event_log(builder.build()).events[1:]]

    assert decoded == [
        FirmwareBlob(0xFFFF0000, 0x10000),
        Text("Boot Guard S-CRT", "utf-8"),
        Text("Boot Guard Measured S-CRTM", "utf-8"),
    ]


def test_s_crtm_version_text() -> None:
    builder = EventLogBuilder(banks=("sha256",))
    builder.add(0, EV_S_CRTM_VERSION, "N40ET41W ".encode("utf-16-le") + b"\x00\x00")
    builder.add(0, EV_S_CRTM_VERSION, b"\x00\x00")

    decoded = [event.decoded for event in parse_event_log(builder.build()).events[1:]]

    assert decoded == [Text("N40ET41W ", "utf-16-le"), Text("", "utf-16-le")]


def test_parse_100_kb_log_in_milliseconds() -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    while len(builder.build()) < 100_000:
        builder.grub_string("grub_cmd", "insmod part_gpt")
        builder.efi_variable(1, EV_EFI_VARIABLE_BOOT, EFI_GLOBAL_VARIABLE, "Boot0000",
                             encode_load_option("disk", acpi_node() + end_node()))
    raw = builder.build()

    started = time.perf_counter()
    log = parse_event_log(raw)
    elapsed = time.perf_counter() - started

    assert len(log.events) == len(builder.events) + 1
    # About 6 ms on a 2-core development VM; the bound leaves room for slow CI machines.
    assert elapsed < 0.5
