"""Property tests of the event log parser. Arbitrary and mutated bytes make it raise
ParseError or return a log, never another exception. Logs of our own making replay as built."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from evidence.eventlog import (
    EventLog,
    EventType,
    check_event_data,
    parse_event_log,
    replay_event_log,
)
from evidence.eventlog.decode import decode_event_data
from tests.conftest import FIXTURES
from tests.support.eventlog import (
    EFI_GLOBAL_VARIABLE,
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_POST_CODE,
    EV_SEPARATOR,
    EventLogBuilder,
    acpi_node,
    end_node,
    file_path_node,
)

FIXTURE_LOGS = [
    path.read_bytes()
    for path in sorted((FIXTURES / "eventlog").iterdir())
    if not path.name.endswith(("-bogus", "-empty"))
]

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _parse_fully(raw: bytes) -> EventLog | None:
    """Parse, then use everything a caller would: replay, data checks and JSON."""
    try:
        log = parse_event_log(raw)
    except ParseError as error:
        assert error.code in {"eventlog-empty", "eventlog-malformed"}
        return None
    replay_event_log(log)
    check_event_data(log)
    json.dumps(log.to_json())
    return log


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_parse_error(raw: bytes) -> None:
    _parse_fully(raw)


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(FIXTURE_LOGS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        position = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if operation == "flip" and raw:
            raw[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif operation == "truncate":
            del raw[position:]
        elif operation == "insert":
            raw[position:position] = draw(st.binary(min_size=1, max_size=64))
        else:
            del raw[position : position + draw(st.integers(min_value=1, max_value=64))]
    return bytes(raw)


@PROPERTY_SETTINGS
@given(mutated_fixture())
def test_mutated_fixture_logs_raise_only_parse_error(raw: bytes) -> None:
    _parse_fully(raw)


@PROPERTY_SETTINGS
@given(
    st.sampled_from([int(member) for member in EventType] + [0x8401, 0xFFFFFFFF]),
    st.binary(max_size=512),
)
def test_event_data_decoders_never_raise(event_type: int, data: bytes) -> None:
    decoded = decode_event_data(event_type, data)

    if decoded is not None:
        json.dumps(decoded.to_json())


_EVENTS = st.one_of(
    st.tuples(st.just(EV_SEPARATOR), st.sampled_from([b"\x00" * 4, b"\x01\x00\x00\x00"])),
    st.tuples(st.just(EV_EFI_ACTION), st.text(min_size=1, max_size=40).map(str.encode)),
    st.tuples(st.just(EV_POST_CODE), st.binary(max_size=32)),
    st.tuples(st.just(EV_IPL), st.binary(max_size=64)),
    st.tuples(st.just(0x8401), st.binary(max_size=16)),
)


@PROPERTY_SETTINGS
@given(
    banks=st.sampled_from([("sha1",), ("sha256",), ("sha1", "sha256"), ("sha256", "sha384")]),
    locality=st.none() | st.sampled_from([0, 3, 4]),
    events=st.lists(st.tuples(st.integers(min_value=0, max_value=23), _EVENTS), max_size=30),
)
def test_built_logs_replay_as_built(
    banks: tuple[str, ...], locality: int | None, events: list[tuple[int, tuple[int, bytes]]]
) -> None:
    builder = EventLogBuilder(banks=banks)
    if locality is not None:
        builder.startup_locality(locality)
    builder.efi_variable(7, EV_EFI_VARIABLE_DRIVER_CONFIG, EFI_GLOBAL_VARIABLE, "SecureBoot",
                         b"\x01")
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"image",
                       acpi_node() + file_path_node("\\EFI\\BOOT\\BOOTX64.EFI") + end_node())
    for pcr, (event_type, data) in events:
        builder.add(pcr, event_type, data)

    log = parse_event_log(builder.build())

    assert len(log.events) == len(builder.events) + 1
    assert replay_event_log(log) == builder.expected_pcrs()
