"""Verification of an IMA measurement list against PCR 10 values from a verified quote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evidence.findings import Finding, Severity, is_failure
from evidence.ima import native
from evidence.ima.algorithms import BANK_DIGEST_SIZES, bank_hash, template_hash_size_of
from evidence.ima.boot_aggregate import check_boot_aggregate
from evidence.ima.checks import (
    check_buffer_digests,
    entry_facts_findings,
    template_hash_findings,
)
from evidence.ima.entry import IMA_PCR, TEMPLATE_IMA_BUF, ImaEntry, ImaMeasurementList
from evidence.ima.replay import ImaReplayState, replay_pcr10


@dataclass(frozen=True, slots=True)
class ImaVerification:
    """Result of verifying one IMA measurement list against a quote."""

    findings: tuple[Finding, ...]
    verified_entries: tuple[ImaEntry, ...]
    """Entries that the quoted PCR 10 covers: evaluate these against the runtime policy."""
    pending_entries: tuple[ImaEntry, ...]
    """Entries logged after the quote; the next verification covers them."""
    next_state: ImaReplayState
    """State to store when the whole attestation passed. It equals the previous state when
    this verification found an error, so that the failing entries are checked again."""


def verify_measurement_list(
    unverified_list: ImaMeasurementList,
    quoted_pcr10: Mapping[str, bytes],
    previous_state: ImaReplayState | None = None,
    *,
    boot_pcrs: Mapping[str, Mapping[int, bytes]] | None = None,
    allow_zero_boot_aggregate: bool = False,
) -> ImaVerification:
    """Verify an IMA measurement list against PCR 10 values from a verified quote.

    1. The list starts at ``previous_state.next_index``, where the last verification ended.
    2. Each entry's template hash is the hash of its template data, and each ima-buf digest
       is the hash of its buffer.
    3. Replaying the entries from the saved PCR 10 values reaches the quoted value in every
       quoted bank after one and the same prefix of the list, possibly an empty one, because
       the kernel may log entries between the quote and the reading of the list. From entry 0
       on, the prefix contains at least the first entry.
    4. When the list starts at entry 0 and ``boot_pcrs`` (bank -> PCR -> value from the same
       quote) is given, the first entry is the boot_aggregate of those PCRs.
    5. Progress: the matched prefix covers the entries the device showed last time. It may
       lag once (warning); lagging twice in a row fails, so that a device cannot freeze
       PCR 10 while its list keeps growing.

    ``quoted_pcr10`` maps a bank name to the quoted PCR 10 value.
    """
    state = previous_state or ImaReplayState()

    # Step 1: the list continues the saved state, in banks that can be replayed.
    problem = _precondition_problem(unverified_list, quoted_pcr10, state)
    if problem is not None:
        return _failed(state, problem)
    start_values = {
        bank: state.pcr10_for(bank) or b"" for bank in sorted(set(state.pcr10) | set(quoted_pcr10))
    }

    # Steps 2 and 3 share one pass over the entries for the first quoted bank.
    entries = unverified_list.entries
    first_bank, *other_banks = sorted(quoted_pcr10)
    scan = _scan_and_replay(
        entries,
        unverified_list.template_hash_algorithm,
        first_bank,
        start_values[first_bank],
        quoted_pcr10[first_bank],
    )

    # Step 2: entries are internally consistent.
    findings = template_hash_findings(scan.template_hash_mismatches, unverified_list.template_hash_algorithm)
    findings += check_buffer_digests(scan.buffers)

    # Step 3: some prefix of the list replays to the quoted PCR 10 in every quoted bank.
    replays = {first_bank: (scan.prefixes, scan.final)}
    for bank in other_banks:
        replays[bank] = _matching_prefixes(entries, bank, start_values[bank], quoted_pcr10[bank])
    # The kernel extends boot_aggregate before user space runs, so from entry 0 on a quote
    # covers at least that entry: a PCR 10 of zeros beside a non-empty list is no match.
    shortest = 1 if state.next_index == 0 and entries else 0
    matched, mismatches = _match_prefix(replays, quoted_pcr10, shortest, len(entries))
    if matched is None:
        return _failed(state, *findings, *mismatches)

    verified = entries[:matched]
    end = unverified_list.start_index + matched
    findings += entry_facts_findings(
        [index for index in scan.violations if index < end],
        [index for index in scan.other_pcr if index < end],
    )

    # Step 4: the boot_aggregate.
    if boot_pcrs is not None and unverified_list.start_index == 0:
        first = verified[0] if verified else None
        findings += check_boot_aggregate(first, boot_pcrs, allow_zero=allow_zero_boot_aggregate)

    # Step 5: progress.
    next_index = state.next_index + matched
    lagging_rounds = state.lagging_rounds + 1 if next_index < state.seen_entries else 0
    findings += _progress_findings(lagging_rounds, next_index, state.seen_entries)

    if is_failure(findings):
        return _failed(state, *findings)

    next_state = ImaReplayState(
        next_index=next_index,
        pcr10={bank: _pcr10_after(verified, bank, start_values, quoted_pcr10) for bank in start_values},
        seen_entries=unverified_list.end_index,
        lagging_rounds=lagging_rounds,
    )
    return ImaVerification(tuple(findings), verified, entries[matched:], next_state)


def _precondition_problem(
    unverified_list: ImaMeasurementList, quoted_pcr10: Mapping[str, bytes], state: ImaReplayState
) -> Finding | None:
    """Return why the list cannot be verified from ``state`` against the quote, if it cannot."""
    if unverified_list.start_index != state.next_index:
        return Finding(
            "ima-list-offset-mismatch",
            Severity.ERROR,
            f"IMA measurement list starts at entry {unverified_list.start_index}, expected "
            f"entry {state.next_index} where the last verification ended",
            {"start_index": unverified_list.start_index, "expected": state.next_index},
        )
    if not quoted_pcr10:
        return Finding(
            "ima-pcr10-not-quoted",
            Severity.ERROR,
            "no quoted PCR 10 value was given, so the IMA measurement list cannot be verified",
        )

    unsupported = sorted(set(quoted_pcr10) - set(BANK_DIGEST_SIZES))
    if unsupported:
        return Finding(
            "ima-bank-unsupported",
            Severity.ERROR,
            f"quoted PCR 10 banks {unsupported} cannot be replayed; expected banks among "
            f"{', '.join(BANK_DIGEST_SIZES)}",
            {"banks": unsupported},
        )

    for bank in sorted(quoted_pcr10):
        if state.pcr10_for(bank) is None:
            return Finding(
                "ima-bank-not-replayed",
                Severity.ERROR,
                f"the saved IMA state has no PCR 10 value for the {bank} bank at entry "
                f"{state.next_index}; replay this boot's list from entry 0",
                {"bank": bank, "next_index": state.next_index},
            )
    return None


@dataclass(slots=True)
class _Scan:
    """Findings of one pass over the entries, beside the replay of one bank."""

    prefixes: set[int]
    final: bytes
    template_hash_mismatches: list[ImaEntry] = field(default_factory=list)
    violations: list[int] = field(default_factory=list)
    other_pcr: list[int] = field(default_factory=list)
    buffers: list[ImaEntry] = field(default_factory=list)


def _scan_and_replay(
    entries: Sequence[ImaEntry],
    template_hash_algorithm: str,
    bank: str,
    initial: bytes,
    quoted: bytes,
) -> _Scan:
    """Check template hashes, collect violations, other-PCR and ima-buf entries, and replay
    ``bank``, noting each prefix length whose PCR 10 equals ``quoted``.

    One pass does all of it because the loop itself costs as much as one of its hashes.
    """
    replayed = native.replay(entries, bank, initial, quoted, template_hash_algorithm)
    if replayed is not None:
        prefixes, final, mismatched, violations, other_pcr, buffers = replayed
        return _Scan(set(prefixes), final, mismatched, violations, other_pcr, buffers)
    check_hash = bank_hash(template_hash_algorithm)
    new_hash = bank_hash(bank)
    reuse_measurement = template_hash_algorithm == bank
    zero = bytes(template_hash_size_of(template_hash_algorithm))
    violation_extend = b"\xff" * BANK_DIGEST_SIZES[bank]
    scan = _Scan({0} if initial == quoted else set(), initial)
    mismatched = scan.template_hash_mismatches
    value = initial

    for length, entry in enumerate(entries, start=1):
        template_hash = entry.template_hash
        if template_hash == zero:
            scan.violations.append(entry.index)
            measurement = violation_extend
        else:
            measurement = new_hash(entry.template_data).digest()
            expected = measurement if reuse_measurement else check_hash(entry.template_data).digest()
            if expected != template_hash:
                mismatched.append(entry)

        if entry.pcr == IMA_PCR:
            value = new_hash(value + measurement).digest()
        else:
            scan.other_pcr.append(entry.index)
        if value == quoted:
            scan.prefixes.add(length)
        if entry.template == TEMPLATE_IMA_BUF:
            scan.buffers.append(entry)

    scan.final = value
    return scan


def _match_prefix(
    replays: Mapping[str, tuple[set[int], bytes]],
    quoted_pcr10: Mapping[str, bytes],
    shortest: int,
    entry_count: int,
) -> tuple[int | None, list[Finding]]:
    """Return the longest prefix length, at least ``shortest``, whose replay equals the quote
    in every quoted bank.

    ``replays`` maps each bank to its matching prefix lengths and its value after all entries.

    Returns None and one ``ima-pcr-mismatch`` finding per quoted bank when there is none.
    """
    common = set.intersection(*(prefixes for prefixes, _ in replays.values()))
    if common and max(common) >= shortest:
        return max(common), []

    findings = []
    for bank, quoted in sorted(quoted_pcr10.items()):
        final = replays[bank][1]
        findings.append(
            Finding(
                "ima-pcr-mismatch",
                Severity.ERROR,
                f"quoted PCR 10 in the {bank} bank is {quoted.hex()}, but no prefix of the "
                f"{entry_count} IMA entries replays to it (all of them give {final.hex()})",
                {
                    "bank": bank,
                    "quoted": quoted.hex(),
                    "replayed": final.hex(),
                    "entries": entry_count,
                },
            )
        )
    return None, findings


def _matching_prefixes(
    entries: Sequence[ImaEntry], bank: str, initial: bytes, quoted: bytes
) -> tuple[set[int], bytes]:
    """Replay ``entries`` into PCR 10 of ``bank``; return the prefix lengths whose value
    equals ``quoted``, and the value after all entries."""
    replayed = native.replay(entries, bank, initial, quoted, None)
    if replayed is not None:
        return set(replayed[0]), replayed[1]
    new_hash = bank_hash(bank)
    violation_extend = b"\xff" * BANK_DIGEST_SIZES[bank]
    value = initial
    prefixes = {0} if value == quoted else set()
    for length, entry in enumerate(entries, start=1):
        if entry.pcr == IMA_PCR:
            if entry.is_violation:
                value = new_hash(value + violation_extend).digest()
            else:
                value = new_hash(value + new_hash(entry.template_data).digest()).digest()
        if value == quoted:
            prefixes.add(length)
    return prefixes, value


def _pcr10_after(
    verified: Sequence[ImaEntry],
    bank: str,
    start_values: Mapping[str, bytes],
    quoted_pcr10: Mapping[str, bytes],
) -> bytes:
    """Return PCR 10 of ``bank`` after the verified entries: the quoted value where the bank
    was quoted, else a replay of the entries."""
    quoted = quoted_pcr10.get(bank)
    if quoted is not None:
        return quoted
    return replay_pcr10(verified, bank, initial=start_values[bank])


def _progress_findings(lagging_rounds: int, next_index: int, seen_entries: int) -> list[Finding]:
    if lagging_rounds == 0:
        return []
    context = {"matched_until": next_index, "seen_entries": seen_entries, "rounds": lagging_rounds}
    if lagging_rounds == 1:
        return [
            Finding(
                "ima-progress-lagging",
                Severity.WARNING,
                f"quoted PCR 10 covers the first {next_index} IMA entries, but the device showed "
                f"{seen_entries} entries last time; this fails if it happens again",
                context,
            )
        ]
    return [
        Finding(
            "ima-progress-stalled",
            Severity.ERROR,
            f"quoted PCR 10 covers the first {next_index} IMA entries, but the device showed "
            f"{seen_entries} entries before; PCR 10 lagged behind the list "
            f"{lagging_rounds} times in a row",
            context,
        )
    ]


def _failed(state: ImaReplayState, *findings: Finding) -> ImaVerification:
    return ImaVerification(tuple(findings), (), (), state)
