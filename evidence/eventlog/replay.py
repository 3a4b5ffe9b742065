"""Replay of a UEFI event log into PCR values, and the checks of a log against quoted PCRs.

A TPM extends a PCR as ``new = H(old || digest)`` in every allocated bank. Replaying the log
computes the values each bank must contain after the logged events. The event data can be
trusted only after these equal the quoted PCRs, and only as far as those PCRs cover it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

from evidence.eventlog.data import IplText
from evidence.eventlog.model import Event, EventLog
from evidence.eventlog.types import KNOWN_HASH_ALGORITHMS, EventType, hash_algorithm
from evidence.findings import Finding, Severity

PcrBanks = Mapping[str, Mapping[int, bytes]]
# Quoted PCR values keyed by bank name (``sha256``) or by TPM_ALG_ID (0x000B, or an IntEnum
# such as ``evidence.tpm.TpmAlg.SHA256``).
QuotedPcrs = Mapping[str, Mapping[int, bytes]] | Mapping[int, Mapping[int, bytes]]

# PCRs that only pre-OS code extends, so the UEFI event log accounts for all of their
# extensions: PCR 0-7 (firmware), 8-9 (boot loader) and 14 (shim's MOK lists). Keylime's
# measured-boot policy checks the same set. PCR 10-13 and 15 can be extended after the log
# ends (IMA, systemd-stub and userspace).
EVENT_LOG_PCRS: frozenset[int] = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14})

# H-CRTM resets PCR 0 to locality 4 before extending it (TPM 2.0 Library, Part 1).
H_CRTM_LOCALITY = 4

# Event types whose digest the PFP defines as the hash of the event data itself. A mismatch
# in a variable measurement fails the evidence, because measured-boot policies evaluate the
# logged variable contents (PK, KEK, db, dbx). In the other types the data is informational.
_DATA_DIGEST_SEVERITY: dict[int, Severity] = {
    EventType.EV_EFI_VARIABLE_DRIVER_CONFIG: Severity.ERROR,
    EventType.EV_SEPARATOR: Severity.WARNING,
    EventType.EV_S_CRTM_VERSION: Severity.WARNING,
    EventType.EV_EFI_GPT_EVENT: Severity.WARNING,
    EventType.EV_EFI_ACTION: Severity.WARNING,
}

# EV_IPL events whose data is the string that was measured: GRUB's commands and command lines
# in PCR 8, systemd-boot's kernel command line in PCR 12 (older releases: PCR 8). In PCR 9
# (files) and PCR 14 (MOK lists) the data only names what was measured.
_STRING_IPL_PCRS = frozenset({8, 12})


def replay_event_log(log: EventLog) -> dict[str, dict[int, bytes]]:
    """Compute the PCR values of every bank the log carries, from the logged digests.

    Returns ``{bank: {pcr index: value}}`` for each PCR that an event extends, plus PCR 0
    when a StartupLocality or H-CRTM event sets its initial value. ``EV_NO_ACTION`` events
    are never extended. Banks whose hash algorithm Python cannot compute (an algorithm that
    only the Spec ID event declares) are left out.
    """
    banks: dict[str, dict[int, bytes]] = {}
    hashers: dict[str, Callable[[bytes], Any]] = {}
    for algorithm in log.algorithms:
        if algorithm.can_replay and algorithm.hashlib_name is not None:
            hashers[algorithm.name] = _hasher(algorithm.hashlib_name)
            banks[algorithm.name] = _initial_values(log, algorithm.digest_size)

    for event in log.events:
        if not event.extends_pcr:
            continue
        for bank, digest in event.digests.items():
            values = banks.get(bank)
            if values is None:
                continue
            current = values.get(event.pcr)
            if current is None:
                current = bytes(len(digest))
            values[event.pcr] = hashers[bank](current + digest).digest()
    return banks


def _hasher(hashlib_name: str) -> Callable[[bytes], Any]:
    def new_hash(data: bytes) -> Any:
        return hashlib.new(hashlib_name, data)

    return new_hash


def _initial_values(log: EventLog, digest_size: int) -> dict[int, bytes]:
    if log.h_crtm:
        locality = H_CRTM_LOCALITY
    elif log.startup_locality is not None:
        locality = log.startup_locality
    else:
        return {}
    return {0: bytes(digest_size - 1) + bytes([locality])}


def compare_replayed_pcrs(
    replayed: PcrBanks,
    quoted_pcrs: QuotedPcrs,
    *,
    pcr_indexes: Collection[int] = EVENT_LOG_PCRS,
) -> list[Finding]:
    """Compare replayed PCR values with quoted ones and return findings.

    Steps:
    1. Every quoted bank that the log carries no digests for is reported
       (``eventlog-bank-missing``, a warning: the TPM has more banks than the firmware logs).
    2. If no quoted bank is in the log, nothing can be verified (``eventlog-no-common-bank``).
    3. In each common bank, each quoted PCR in ``pcr_indexes`` must equal its replayed value.
       A PCR that no event extended must still hold its initial value (zeros, or the
       StartupLocality value for PCR 0); a difference is ``eventlog-pcr-mismatch``.
    4. If no PCR value was compared at all, the check did not happen
       (``eventlog-nothing-compared``).

    ``quoted_pcrs`` maps banks to ``{pcr index: value}``, the banks named as in
    ``QuotedPcrs``.
    """
    findings: list[Finding] = []
    quoted = _by_bank_name(quoted_pcrs)

    for bank in sorted(quoted):
        if bank not in replayed:
            findings.append(_bank_missing(bank, replayed))

    common = sorted(bank for bank in quoted if bank in replayed)
    if not common:
        findings.append(_no_common_bank(replayed, quoted))
        return findings

    compared = 0
    for bank in common:
        for pcr in sorted(quoted[bank]):
            if pcr not in pcr_indexes:
                continue
            compared += 1
            mismatch = _compare_pcr(bank, pcr, replayed[bank], quoted[bank][pcr])
            if mismatch is not None:
                findings.append(mismatch)

    if compared == 0:
        findings.append(
            Finding(
                code="eventlog-nothing-compared",
                severity=Severity.ERROR,
                message=(
                    f"no quoted PCR is one the event log covers: quoted banks {common} contain "
                    f"none of PCRs {sorted(pcr_indexes)}"
                ),
                context={"banks": common, "pcr_indexes": sorted(pcr_indexes)},
            )
        )
    return findings


def _by_bank_name(quoted_pcrs: QuotedPcrs) -> dict[str, Mapping[int, bytes]]:
    by_name: dict[str, Mapping[int, bytes]] = {}
    for bank, values in quoted_pcrs.items():
        if isinstance(bank, str):
            by_name[bank] = values
        else:
            by_name[hash_algorithm(int(bank), 0).name] = values
    return by_name


def _bank_missing(bank: str, replayed: PcrBanks) -> Finding:
    return Finding(
        code="eventlog-bank-missing",
        severity=Severity.WARNING,
        message=(
            f"the event log has no {bank} digests, so the quoted {bank} PCRs cannot be "
            f"replayed; the log carries {sorted(replayed) or 'no replayable bank'}"
        ),
        context={"bank": bank, "log_banks": sorted(replayed)},
    )


def _no_common_bank(replayed: PcrBanks, quoted: Mapping[str, Mapping[int, bytes]]) -> Finding:
    return Finding(
        code="eventlog-no-common-bank",
        severity=Severity.ERROR,
        message=(
            f"no PCR bank is both quoted and in the event log: quoted {sorted(quoted)}, "
            f"log {sorted(replayed)}"
        ),
        context={"quoted_banks": sorted(quoted), "log_banks": sorted(replayed)},
    )


def _compare_pcr(
    bank: str, pcr: int, replayed_bank: Mapping[int, bytes], quoted_value: bytes
) -> Finding | None:
    expected = replayed_bank.get(pcr)
    if expected is None:
        expected = bytes(_digest_size(bank, quoted_value))
    if expected == quoted_value:
        return None
    return Finding(
        code="eventlog-pcr-mismatch",
        severity=Severity.ERROR,
        message=(
            f"{bank} PCR {pcr}: the event log replays to {expected.hex()}, "
            f"the quote has {quoted_value.hex()}"
        ),
        context={
            "bank": bank,
            "pcr": pcr,
            "replayed": expected.hex(),
            "quoted": quoted_value.hex(),
        },
    )


def _digest_size(bank: str, fallback: bytes) -> int:
    for algorithm in KNOWN_HASH_ALGORITHMS.values():
        if algorithm.name == bank:
            return algorithm.digest_size
    return len(fallback)


def event_data_matches_digests(event: Event) -> bool | None:
    """Tell whether the event's data hashes to every digest it carries.

    Returns None for events whose digest does not cover their data as logged (firmware
    images, boot variables, EV_IPL file and MOK events, unknown types). For GRUB's EV_IPL
    strings in PCR 8 the digest covers the text after ``label: ``, with or without its
    trailing NUL.
    """
    if event.event_type in _DATA_DIGEST_SEVERITY:
        candidates = [event.data]
    elif event.event_type == EventType.EV_IPL and event.pcr in _STRING_IPL_PCRS:
        candidates = _ipl_measured_bytes(event)
    else:
        return None

    for bank, digest in event.digests.items():
        algorithm = _hashlib_name(bank)
        if algorithm is None:
            continue
        if not any(hashlib.new(algorithm, candidate).digest() == digest
                   for candidate in candidates):
            return False
    return True


def _ipl_measured_bytes(event: Event) -> list[bytes]:
    candidates = [event.data]
    decoded = event.decoded
    if isinstance(decoded, IplText) and decoded.label is not None:
        _label, _separator, value = event.data.partition(b": ")
        candidates.append(value)
        if value.endswith(b"\x00"):
            candidates.append(value[:-1])
    return candidates


def _hashlib_name(bank: str) -> str | None:
    for algorithm in KNOWN_HASH_ALGORITHMS.values():
        if algorithm.name == bank and algorithm.can_replay:
            return algorithm.hashlib_name
    return None


def check_event_data(log: EventLog) -> list[Finding]:
    """Return a finding for each event whose data does not hash to its logged digest.

    Replay always uses the logged digest, so such an event does not change the PCR values.
    The finding reports that the data shown for it is not what was measured. An EV_IPL string
    (kernel command line, GRUB command) is a warning, as is a separator, S-CRTM version,
    GPT or EFI action event. A Secure Boot variable (EV_EFI_VARIABLE_DRIVER_CONFIG) is an
    error, because policies read its contents.
    """
    findings: list[Finding] = []
    for event in log.events:
        if event_data_matches_digests(event) is not False:
            continue
        severity = _DATA_DIGEST_SEVERITY.get(event.event_type, Severity.WARNING)
        findings.append(
            Finding(
                code="eventlog-digest-data-mismatch",
                severity=severity,
                message=(
                    f"event {event.index} at byte offset {event.offset} ({event.type_name}, "
                    f"PCR {event.pcr}): the logged digest is not the hash of the event data; "
                    f"the replay uses the logged digest"
                ),
                context={
                    "event_index": event.index,
                    "offset": event.offset,
                    "pcr": event.pcr,
                    "event_type": event.type_name,
                    "digests": {bank: digest.hex() for bank, digest in event.digests.items()},
                },
            )
        )
    return findings


def verify_event_log(
    unverified_log: EventLog,
    quoted: QuotedPcrs,
    *,
    pcr_indexes: Collection[int] = EVENT_LOG_PCRS,
) -> list[Finding]:
    """Check a parsed event log against PCR values from a verified quote.

    Steps:
    1. Check each event's data against its digest where the PFP makes the digest the hash
       of the data (``check_event_data``).
    2. Replay the logged digests into every bank the log carries (``replay_event_log``).
    3. Compare the replayed values with the quoted ones (``compare_replayed_pcrs``).
    """
    findings = check_event_data(unverified_log)

    replayed = replay_event_log(unverified_log)

    findings.extend(compare_replayed_pcrs(replayed, quoted, pcr_indexes=pcr_indexes))
    return findings
