"""Replay of IMA measurement lists into PCR 10, and verification against quoted values.

PCR 10 in bank B is extended, for each entry, with H_B(template data); the template-hash
column is not what is extended. A violation (template-hash column all zeros) extends every
bank with 0xff bytes of the bank's digest size instead.

The template-hash column is checked on its own: it must equal H(template data) with the
list's template hash algorithm, which is SHA-1 for the classic securityfs files and a longer
algorithm where the caller names one or the column's length implies one (Keylime's
``ima.log_hash_alg``). A flipped bit in the column is then caught although no PCR covers it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evidence.errors import ParseError
from evidence.findings import Finding, Severity, is_failure
from evidence.ima.algorithms import (
    BANK_DIGEST_SIZES,
    bank_hash,
    hash_data,
    template_hash_size_of,
)
from evidence.ima.boot_aggregate import check_boot_aggregate
from evidence.ima.entry import IMA_PCR, TEMPLATE_IMA_BUF, ImaEntry, ImaMeasurementList

# Findings list at most this many entry indices in their context.
_MAX_LISTED_ENTRIES = 20


@dataclass(frozen=True, slots=True)
class ImaReplayState:
    """What incremental attestation keeps between two verifications within one boot.

    Store it after every attestation that passed (``to_json``) and pass it back to the next
    one; start from ``ImaReplayState()`` after enrollment and after every reboot.
    """

    next_index: int = 0
    """Index of the first entry not yet verified; ask the device for the list from here."""
    pcr10: Mapping[str, bytes] = field(default_factory=dict)
    """PCR 10 per bank after extending entries ``0 .. next_index - 1``."""
    seen_entries: int = 0
    """List length the device showed at the last verification, matched or not."""
    lagging_rounds: int = 0
    """Consecutive verifications whose quote did not yet cover entries shown the time before."""

    def pcr10_for(self, bank: str) -> bytes | None:
        """Return PCR 10 of ``bank`` at ``next_index``, or None if this state lacks the bank."""
        value = self.pcr10.get(bank)
        if value is None and self.next_index == 0:
            return bytes(BANK_DIGEST_SIZES[bank])
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "next_index": self.next_index,
            "pcr10": {bank: value.hex() for bank, value in sorted(self.pcr10.items())},
            "seen_entries": self.seen_entries,
            "lagging_rounds": self.lagging_rounds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImaReplayState:
        """Rebuild a state that ``to_json`` wrote; raise ParseError if it is malformed."""
        try:
            state = cls(
                next_index=_non_negative_int(data["next_index"]),
                pcr10={bank: _pcr_value(bank, text) for bank, text in data["pcr10"].items()},
                seen_entries=_non_negative_int(data["seen_entries"]),
                lagging_rounds=_non_negative_int(data["lagging_rounds"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ParseError(
                f"IMA replay state is malformed: {type(error).__name__}: {error}",
                code="ima-state-invalid",
            ) from None
        return state


@dataclass(frozen=True, slots=True)
class ImaVerification:
    """Result of verifying one IMA measurement list against a quote."""

    findings: tuple[Finding, ...]
    verified_entries: tuple[ImaEntry, ...]
    """Entries that the quoted PCR 10 covers: evaluate these against the runtime policy."""
    pending_entries: tuple[ImaEntry, ...]
    """Entries logged after the quote; the next verification covers them."""
    next_state: ImaReplayState
    """State to store when the whole attestation passed; equals the previous state when
    this verification found an error, so that the failing entries are checked again."""


def extend_value(bank: str, entry: ImaEntry) -> bytes:
    """Return the digest that ``entry`` extends PCR ``entry.pcr`` of ``bank`` with."""
    if entry.is_violation:
        return b"\xff" * BANK_DIGEST_SIZES[bank]
    return bytes(bank_hash(bank)(entry.template_data).digest())


def replay_pcr10(entries: Iterable[ImaEntry], bank: str, *, initial: bytes | None = None) -> bytes:
    """Return PCR 10 of ``bank`` after extending ``initial`` (zeros) with every entry.

    Entries logged for another PCR do not extend PCR 10.
    """
    new_hash = bank_hash(bank)
    violation_extend = b"\xff" * BANK_DIGEST_SIZES[bank]
    value = bytes(BANK_DIGEST_SIZES[bank]) if initial is None else initial
    for entry in entries:
        if entry.pcr != IMA_PCR:
            continue
        if any(entry.template_hash):
            value = new_hash(value + new_hash(entry.template_data).digest()).digest()
        else:
            value = new_hash(value + violation_extend).digest()
    return value


def check_template_hashes(entries: Sequence[ImaEntry], algorithm: str) -> list[Finding]:
    """Check every non-violation entry's template hash against H_algorithm(template data)."""
    new_hash = bank_hash(algorithm)
    zero = bytes(template_hash_size_of(algorithm))
    mismatched = [
        entry
        for entry in entries
        if entry.template_hash != zero and new_hash(entry.template_data).digest() != entry.template_hash
    ]
    if not mismatched:
        return []

    first = mismatched[0]
    expected = new_hash(first.template_data).digest().hex()
    return [
        Finding(
            "ima-template-hash-mismatch",
            Severity.ERROR,
            f"{len(mismatched)} IMA entries have a template hash that is not the {algorithm} "
            f"of their template data; first entry {first.index}: got "
            f"{first.template_hash.hex()}, expected {expected}",
            {
                "template_hash_algorithm": algorithm,
                "count": len(mismatched),
                "entries": [entry.index for entry in mismatched[:_MAX_LISTED_ENTRIES]],
            },
        )
    ]


def check_buffer_digests(entries: Sequence[ImaEntry]) -> list[Finding]:
    """Check that each ima-buf entry's digest is the hash of its buffer."""
    mismatched = []
    unchecked = []
    for entry in entries:
        if entry.template != TEMPLATE_IMA_BUF or entry.is_violation:
            continue
        expected = hash_data(entry.digest_algorithm, entry.buffer or b"")
        if expected is None:
            unchecked.append(entry.index)
        elif expected != entry.digest:
            mismatched.append(entry.index)

    findings = []
    if mismatched:
        findings.append(
            Finding(
                "ima-buffer-digest-mismatch",
                Severity.ERROR,
                f"{len(mismatched)} ima-buf entries have a digest that is not the hash of "
                f"their buffer; first entry {mismatched[0]}",
                {"count": len(mismatched), "entries": mismatched[:_MAX_LISTED_ENTRIES]},
            )
        )
    if unchecked:
        findings.append(
            Finding(
                "ima-buffer-digest-unchecked",
                Severity.WARNING,
                f"{len(unchecked)} ima-buf entries use a digest algorithm this verifier "
                f"cannot compute; first entry {unchecked[0]}",
                {"count": len(unchecked), "entries": unchecked[:_MAX_LISTED_ENTRIES]},
            )
        )
    return findings


def describe_entries(entries: Sequence[ImaEntry]) -> list[Finding]:
    """Report facts about entries that a runtime policy may act on: violations, other PCRs."""
    findings = []
    violations = [entry.index for entry in entries if entry.is_violation]
    if violations:
        findings.append(
            Finding(
                "ima-violation-logged",
                Severity.INFO,
                f"{len(violations)} IMA entries are violations (a file measured while open "
                f"for writing, or opened for writing while measured); first entry {violations[0]}",
                {"count": len(violations), "entries": violations[:_MAX_LISTED_ENTRIES]},
            )
        )
    other_pcr = [entry.index for entry in entries if entry.pcr != IMA_PCR]
    if other_pcr:
        findings.append(
            Finding(
                "ima-entry-pcr-unexpected",
                Severity.WARNING,
                f"{len(other_pcr)} IMA entries are logged for a PCR other than {IMA_PCR}, so the "
                f"quoted PCR {IMA_PCR} does not cover them; first entry {other_pcr[0]}",
                {"count": len(other_pcr), "entries": other_pcr[:_MAX_LISTED_ENTRIES]},
            )
        )
    return findings


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
       quoted bank after one and the same prefix of the list, possibly an empty one: the
       kernel may log entries between the quote and the reading of the list. From entry 0
       on, the prefix holds at least the first entry.
    4. When the list starts at entry 0 and ``boot_pcrs`` (bank -> PCR -> value from the same
       quote) is given, the first entry is the boot_aggregate of those PCRs.
    5. Progress: the matched prefix covers the entries the device showed last time. It may
       lag once (warning); lagging twice in a row fails, so that a device cannot freeze
       PCR 10 while its list keeps growing.

    ``quoted_pcr10`` maps a bank name to the quoted PCR 10 value.
    """
    state = previous_state or ImaReplayState()

    # Step 1: the list continues the saved state.
    if unverified_list.start_index != state.next_index:
        return _failed(
            state,
            Finding(
                "ima-list-offset-mismatch",
                Severity.ERROR,
                f"IMA measurement list starts at entry {unverified_list.start_index}, expected "
                f"entry {state.next_index} where the last verification ended",
                {"start_index": unverified_list.start_index, "expected": state.next_index},
            ),
        )
    if not quoted_pcr10:
        return _failed(
            state,
            Finding(
                "ima-pcr10-not-quoted",
                Severity.ERROR,
                "no quoted PCR 10 value was given, so the IMA measurement list cannot be verified",
            ),
        )

    unsupported = sorted(set(quoted_pcr10) - set(BANK_DIGEST_SIZES))
    if unsupported:
        return _failed(
            state,
            Finding(
                "ima-bank-unsupported",
                Severity.ERROR,
                f"quoted PCR 10 banks {unsupported} cannot be replayed; expected banks among "
                f"{', '.join(BANK_DIGEST_SIZES)}",
                {"banks": unsupported},
            ),
        )

    # Step 2: entries are internally consistent.
    entries = unverified_list.entries
    findings = check_template_hashes(entries, unverified_list.template_hash_algorithm)
    findings += check_buffer_digests(entries)

    # Step 3: some prefix of the list replays to the quoted PCR 10 in every quoted bank.
    start_values = {}
    for bank in sorted(set(state.pcr10) | set(quoted_pcr10)):
        value = state.pcr10_for(bank)
        if value is None:
            return _failed(state, _bank_not_replayed(bank, state))
        start_values[bank] = value
    # The kernel extends boot_aggregate before user space runs, so from entry 0 on a quote
    # covers at least that entry: a PCR 10 of zeros beside a non-empty list is no match.
    shortest = 1 if state.next_index == 0 and entries else 0
    matched, mismatches = _match_prefix(entries, start_values, quoted_pcr10, shortest)
    if matched is None:
        return _failed(state, *findings, *mismatches)

    verified = entries[:matched]
    findings += describe_entries(verified)

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


def _match_prefix(
    entries: Sequence[ImaEntry],
    start_values: Mapping[str, bytes],
    quoted_pcr10: Mapping[str, bytes],
    shortest: int,
) -> tuple[int | None, list[Finding]]:
    """Return the longest prefix length, at least ``shortest``, whose replay equals the quote
    in every quoted bank.

    Returns None and one ``ima-pcr-mismatch`` finding per failing bank when there is none.
    """
    common: set[int] | None = None
    finals = {}
    for bank, quoted in quoted_pcr10.items():
        prefixes, finals[bank] = _matching_prefixes(entries, bank, start_values[bank], quoted)
        common = prefixes if common is None else common & prefixes
    if common and max(common) >= shortest:
        return max(common), []

    findings = []
    for bank, quoted in sorted(quoted_pcr10.items()):
        findings.append(
            Finding(
                "ima-pcr-mismatch",
                Severity.ERROR,
                f"quoted PCR 10 in the {bank} bank is {quoted.hex()}, but no prefix of the "
                f"{len(entries)} IMA entries replays to it (all of them give "
                f"{finals[bank].hex()})",
                {
                    "bank": bank,
                    "quoted": quoted.hex(),
                    "replayed": finals[bank].hex(),
                    "entries": len(entries),
                },
            )
        )
    return None, findings


def _matching_prefixes(
    entries: Sequence[ImaEntry], bank: str, initial: bytes, quoted: bytes
) -> tuple[set[int], bytes]:
    """Replay ``entries`` into PCR 10 of ``bank``; return the prefix lengths whose value
    equals ``quoted``, and the value after all entries."""
    new_hash = bank_hash(bank)
    violation_extend = b"\xff" * BANK_DIGEST_SIZES[bank]
    value = initial
    prefixes = {0} if value == quoted else set()
    for length, entry in enumerate(entries, start=1):
        if entry.pcr == IMA_PCR:
            if any(entry.template_hash):
                value = new_hash(value + new_hash(entry.template_data).digest()).digest()
            else:
                value = new_hash(value + violation_extend).digest()
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
                f"quoted PCR 10 covers IMA entries up to {next_index}, but the device showed "
                f"{seen_entries} entries last time; failing if this repeats",
                context,
            )
        ]
    return [
        Finding(
            "ima-progress-stalled",
            Severity.ERROR,
            f"quoted PCR 10 covers IMA entries up to {next_index}, but the device showed "
            f"{seen_entries} entries before; PCR 10 lagged behind the list "
            f"{lagging_rounds} times in a row",
            context,
        )
    ]


def _bank_not_replayed(bank: str, state: ImaReplayState) -> Finding:
    return Finding(
        "ima-bank-not-replayed",
        Severity.ERROR,
        f"the saved IMA state has no PCR 10 value for the {bank} bank at entry "
        f"{state.next_index}; replay this boot's list from entry 0",
        {"bank": bank, "next_index": state.next_index},
    )


def _failed(state: ImaReplayState, *findings: Finding) -> ImaVerification:
    return ImaVerification(tuple(findings), (), (), state)


def _non_negative_int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _pcr_value(bank: str, text: Any) -> bytes:
    size = BANK_DIGEST_SIZES.get(bank)
    if size is None:
        raise ValueError(f"bank {bank!r} is not one of {', '.join(BANK_DIGEST_SIZES)}")
    if not isinstance(text, str):
        raise TypeError(f"PCR 10 value of bank {bank} is {type(text).__name__}, expected hex text")
    value = bytes.fromhex(text)
    if len(value) != size or value.hex() != text:
        raise ValueError(f"PCR 10 value of bank {bank} is not {size} bytes of lowercase hex")
    return value
