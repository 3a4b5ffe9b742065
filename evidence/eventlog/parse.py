"""Parsing of UEFI event logs (TCG PC Client Platform Firmware Profile) into ``EventLog``.

Two formats exist, both little-endian:

- crypto-agile: a first event in the SHA-1 format whose data is the ``Spec ID Event03``
  structure naming the hash algorithms and their digest sizes, then TCG_PCR_EVENT2 events
  (u32 PCR index, u32 event type, TPML_DIGEST_VALUES, u32 data size, data);
- SHA-1 (TCG 1.2 style): TCG_PCClientPCREvent events only (u32 PCR index, u32 event type,
  20-byte SHA-1 digest, u32 data size, data). A log whose first event is not a Spec ID event
  is parsed whole in this format.

Framing errors (a truncated event, a size past the end, an unknown digest algorithm) raise
``EventLogParseError``. Event data of an unexpected layout stays raw (see ``decode``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from evidence.errors import ParseError
from evidence.eventlog.data import SpecIdEvent, StartupLocality
from evidence.eventlog.decode import decode_event_data
from evidence.eventlog.model import Event, EventLog
from evidence.eventlog.types import SHA1, EventType, HashAlgorithm, hash_algorithm

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"

# TPM2_MAX_PCRS in the TSS headers; PC Client TPMs have 24, so higher numbers only occur in
# garbled logs.
MAX_PCR_INDEX = 31

_SHA1_EVENT_HEADER = struct.Struct("<II20sI")
_EVENT2_HEADER = struct.Struct("<III")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")
_ALGORITHM_ENTRY = struct.Struct("<HH")

_READ_CHUNK_SIZE = 64 * 1024


class EventLogParseError(ParseError):
    """An event log that cannot be parsed. ``event_index`` and ``offset`` (bytes from the
    start of the log) locate where parsing stopped, when known."""

    default_code = "eventlog-malformed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        event_index: int | None = None,
        offset: int | None = None,
    ):
        super().__init__(message, code=code)
        self.event_index = event_index
        self.offset = offset


def read_event_log(path: str | os.PathLike[str]) -> bytes:
    """Read an event log file to EOF.

    securityfs (``/sys/kernel/security/tpm0/binary_bios_measurements``) reports a size of 0
    and returns short reads, so this reads in a loop until a read returns nothing rather than
    trusting the file size or a single read. Raises OSError if the file cannot be read.
    """
    chunks: list[bytes] = []
    with Path(path).open("rb", buffering=0) as stream:
        while True:
            chunk = stream.read(_READ_CHUNK_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_event_log(unverified_log: bytes) -> EventLog:
    """Parse a UEFI event log in the crypto-agile or the SHA-1 format.

    Raises EventLogParseError (a ParseError) with code ``eventlog-empty`` for 0 bytes and
    ``eventlog-malformed`` for anything that is not a complete event log, naming the event
    index and byte offset where parsing stopped.
    """
    if not unverified_log:
        raise EventLogParseError(
            "no event log: the event log is empty (0 bytes)", code="eventlog-empty"
        )
    data = bytes(unverified_log)

    first, offset = _parse_sha1_event(data, 0, 0)
    if first.event_type == EventType.EV_NO_ACTION and first.data.startswith(SPEC_ID_SIGNATURE):
        spec_id = _decode_spec_id(first)
        first = Event(first.index, 0, first.pcr, first.event_type, first.digests, first.data,
                      spec_id)
        events = _parse_crypto_agile_events(data, offset, spec_id.algorithms)
        algorithms = spec_id.algorithms
    else:
        spec_id = None
        events = _parse_sha1_events(data, offset)
        algorithms = (SHA1,)

    all_events = (first, *events)
    return EventLog(
        events=all_events,
        spec_id=spec_id,
        algorithms=algorithms,
        startup_locality=_startup_locality(all_events),
        h_crtm=any(
            event.pcr == 0 and event.event_type == EventType.EV_EFI_HCRTM_EVENT
            for event in all_events
        ),
    )


def _malformed(index: int, offset: int, problem: str) -> EventLogParseError:
    return EventLogParseError(
        f"malformed event log: event {index} at byte offset {offset}: {problem}",
        event_index=index,
        offset=offset,
    )


def _parse_sha1_events(data: bytes, offset: int) -> list[Event]:
    events: list[Event] = []
    index = 1
    while offset < len(data):
        event, offset = _parse_sha1_event(data, offset, index)
        events.append(event)
        index += 1
    return events


def _parse_sha1_event(data: bytes, offset: int, index: int) -> tuple[Event, int]:
    remaining = len(data) - offset
    if remaining < _SHA1_EVENT_HEADER.size:
        raise _malformed(
            index, offset,
            f"event header needs {_SHA1_EVENT_HEADER.size} bytes, {remaining} remain",
        )
    pcr, event_type, digest, size = _SHA1_EVENT_HEADER.unpack_from(data, offset)
    if not any(data[offset : offset + _SHA1_EVENT_HEADER.size]):
        # Zero bytes would otherwise read as EV_PREBOOT_CERT events extending PCR 0.
        raise _malformed(index, offset, "event header is all zero bytes (padding, not an event)")
    _check_pcr(pcr, index, offset)
    data_start = offset + _SHA1_EVENT_HEADER.size
    end = _data_end(data, data_start, size, index, offset)
    event_data = data[data_start:end]
    decoded = decode_event_data(event_type, event_data)
    return Event(index, offset, pcr, event_type, {SHA1.name: digest}, event_data, decoded), end


def _check_pcr(pcr: int, index: int, offset: int) -> None:
    if pcr > MAX_PCR_INDEX:
        raise _malformed(index, offset, f"PCR index {pcr} is out of range 0-{MAX_PCR_INDEX}")


def _data_end(data: bytes, data_start: int, size: int, index: int, offset: int) -> int:
    end = data_start + size
    if end > len(data):
        raise _malformed(
            index, offset,
            f"event data size {size} exceeds the {len(data) - data_start} bytes left in the log",
        )
    return end


def _decode_spec_id(event: Event) -> SpecIdEvent:
    """Decode TCG_EfiSpecIDEvent; its algorithm table gives every digest size in the log."""
    data = event.data
    if len(data) < _SPEC_ID_FIXED.size:
        raise _malformed(
            event.index, event.offset,
            f"Spec ID event data is {len(data)} bytes, expected at least {_SPEC_ID_FIXED.size}",
        )
    _signature, platform_class, minor, major, errata, uintn_size, count = (
        _SPEC_ID_FIXED.unpack_from(data)
    )
    table_end = _SPEC_ID_FIXED.size + count * _ALGORITHM_ENTRY.size
    if count == 0 or table_end + 1 > len(data):
        raise _malformed(
            event.index, event.offset,
            f"Spec ID event declares {count} algorithms in {len(data)} bytes of data",
        )
    algorithms = _decode_algorithm_table(event, data, count)
    vendor_size = data[table_end]
    if table_end + 1 + vendor_size != len(data):
        raise _malformed(
            event.index, event.offset,
            f"Spec ID event data is {len(data)} bytes, its fields need {table_end + 1 + vendor_size}",
        )
    return SpecIdEvent(
        signature=SPEC_ID_SIGNATURE.rstrip(b"\x00").decode("ascii"),
        platform_class=platform_class,
        spec_version_minor=minor,
        spec_version_major=major,
        spec_errata=errata,
        uintn_size=uintn_size,
        algorithms=algorithms,
        vendor_info=data[table_end + 1 :],
    )


def _decode_algorithm_table(event: Event, data: bytes, count: int) -> tuple[HashAlgorithm, ...]:
    algorithms: list[HashAlgorithm] = []
    for position in range(count):
        alg_id, size = _ALGORITHM_ENTRY.unpack_from(
            data, _SPEC_ID_FIXED.size + position * _ALGORITHM_ENTRY.size
        )
        algorithm = hash_algorithm(alg_id, size)
        if size == 0 or size != algorithm.digest_size:
            raise _malformed(
                event.index, event.offset,
                f"Spec ID event declares algorithm 0x{alg_id:04x} ({algorithm.name}) with digest "
                f"size {size}, expected {algorithm.digest_size or 'more than 0'}",
            )
        if any(known.alg_id == alg_id for known in algorithms):
            raise _malformed(
                event.index, event.offset,
                f"Spec ID event declares algorithm 0x{alg_id:04x} ({algorithm.name}) twice",
            )
        algorithms.append(algorithm)
    return tuple(algorithms)


def _parse_crypto_agile_events(
    data: bytes, offset: int, algorithms: tuple[HashAlgorithm, ...]
) -> list[Event]:
    by_id = {algorithm.alg_id: algorithm for algorithm in algorithms}
    events: list[Event] = []
    index = 1
    while offset < len(data):
        event, offset = _parse_event2(data, offset, index, by_id)
        events.append(event)
        index += 1
    return events


def _parse_event2(
    data: bytes, offset: int, index: int, algorithms: dict[int, HashAlgorithm]
) -> tuple[Event, int]:
    remaining = len(data) - offset
    if remaining < _EVENT2_HEADER.size:
        raise _malformed(
            index, offset, f"event header needs {_EVENT2_HEADER.size} bytes, {remaining} remain"
        )
    pcr, event_type, count = _EVENT2_HEADER.unpack_from(data, offset)
    _check_pcr(pcr, index, offset)
    if count > len(algorithms):
        raise _malformed(
            index, offset,
            f"event carries {count} digests, the Spec ID event declares {len(algorithms)} algorithms",
        )

    digests, position = _parse_digests(data, offset + _EVENT2_HEADER.size, count, index, offset,
                                       algorithms)
    if len(digests) != len(algorithms) and event_type != EventType.EV_NO_ACTION:
        missing = [a.name for a in algorithms.values() if a.name not in digests]
        raise _malformed(
            index, offset,
            f"event has no digest for {', '.join(missing)}, which the Spec ID event declares",
        )

    if len(data) - position < _U32.size:
        raise _malformed(index, offset, "event data size field is truncated")
    (size,) = _U32.unpack_from(data, position)
    data_start = position + _U32.size
    end = _data_end(data, data_start, size, index, offset)
    event_data = data[data_start:end]
    decoded = decode_event_data(event_type, event_data)
    return Event(index, offset, pcr, event_type, digests, event_data, decoded), end


def _parse_digests(
    data: bytes,
    position: int,
    count: int,
    index: int,
    offset: int,
    algorithms: dict[int, HashAlgorithm],
) -> tuple[dict[str, bytes], int]:
    digests: dict[str, bytes] = {}
    for _ in range(count):
        if len(data) - position < _U16.size:
            raise _malformed(index, offset, "digest algorithm field is truncated")
        (alg_id,) = _U16.unpack_from(data, position)
        algorithm = algorithms.get(alg_id)
        if algorithm is None:
            raise _malformed(
                index, offset,
                f"digest algorithm 0x{alg_id:04x} at byte offset {position} is not in the "
                f"Spec ID event's table ({', '.join(a.name for a in algorithms.values())})",
            )
        if algorithm.name in digests:
            raise _malformed(index, offset, f"event carries two {algorithm.name} digests")
        start = position + _U16.size
        end = start + algorithm.digest_size
        if end > len(data):
            raise _malformed(index, offset, f"{algorithm.name} digest is truncated")
        digests[algorithm.name] = data[start:end]
        position = end
    return digests, position


def _startup_locality(events: tuple[Event, ...]) -> int | None:
    locality: int | None = None
    for event in events:
        if event.pcr != 0 or not isinstance(event.decoded, StartupLocality):
            continue
        if locality is not None and event.decoded.locality != locality:
            raise _malformed(
                event.index, event.offset,
                f"StartupLocality {event.decoded.locality} contradicts the earlier "
                f"StartupLocality {locality}",
            )
        locality = event.decoded.locality
    return locality
