"""Checks of IMA entries that need no quote: template hashes, ima-buf digests, and facts
about entries that a runtime policy may act on.

The template-hash column must equal H(template data) with the list's template hash
algorithm: SHA-1 for the classic securityfs files, or a longer algorithm where the caller
names one or the column's length implies one (Keylime's ``ima.log_hash_alg``). No PCR covers
the column, so this check is what catches a changed column.
"""

from __future__ import annotations

from collections.abc import Sequence

from evidence.findings import Finding, Severity
from evidence.ima.algorithms import bank_hash, hash_data, template_hash_size_of
from evidence.ima.entry import IMA_PCR, TEMPLATE_IMA_BUF, ImaEntry

# Findings list at most this many entry indices in their context.
MAX_LISTED_ENTRIES = 20


def check_template_hashes(entries: Sequence[ImaEntry], algorithm: str) -> list[Finding]:
    """Check every non-violation entry's template hash against H_algorithm(template data)."""
    new_hash = bank_hash(algorithm)
    zero = bytes(template_hash_size_of(algorithm))
    mismatched = [
        entry
        for entry in entries
        if entry.template_hash != zero and new_hash(entry.template_data).digest() != entry.template_hash
    ]
    return template_hash_findings(mismatched, algorithm)


def template_hash_findings(mismatched: Sequence[ImaEntry], algorithm: str) -> list[Finding]:
    """Report entries whose template hash is not H_algorithm(template data), if any."""
    if not mismatched:
        return []

    first = mismatched[0]
    expected = bank_hash(algorithm)(first.template_data).digest().hex()
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
                "entries": [entry.index for entry in mismatched[:MAX_LISTED_ENTRIES]],
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
                {"count": len(mismatched), "entries": mismatched[:MAX_LISTED_ENTRIES]},
            )
        )
    if unchecked:
        findings.append(
            Finding(
                "ima-buffer-digest-unchecked",
                Severity.WARNING,
                f"{len(unchecked)} ima-buf entries use a digest algorithm this verifier "
                f"cannot compute; first entry {unchecked[0]}",
                {"count": len(unchecked), "entries": unchecked[:MAX_LISTED_ENTRIES]},
            )
        )
    return findings


def describe_entries(entries: Sequence[ImaEntry]) -> list[Finding]:
    """Report facts about entries that a runtime policy may act on: violations, other PCRs."""
    violations = [entry.index for entry in entries if entry.is_violation]
    other_pcr = [entry.index for entry in entries if entry.pcr != IMA_PCR]
    return entry_facts_findings(violations, other_pcr)


def entry_facts_findings(violations: Sequence[int], other_pcr: Sequence[int]) -> list[Finding]:
    """Report the indices of violations and of entries logged for a PCR other than 10."""
    findings = []
    if violations:
        findings.append(
            Finding(
                "ima-violation-logged",
                Severity.INFO,
                f"{len(violations)} IMA entries are violations (a file measured while open "
                f"for writing, or opened for writing while measured); first entry {violations[0]}",
                {"count": len(violations), "entries": list(violations[:MAX_LISTED_ENTRIES])},
            )
        )
    if other_pcr:
        findings.append(
            Finding(
                "ima-entry-pcr-unexpected",
                Severity.WARNING,
                f"{len(other_pcr)} IMA entries are logged for a PCR other than {IMA_PCR}, so the "
                f"quoted PCR {IMA_PCR} does not cover them; first entry {other_pcr[0]}",
                {"count": len(other_pcr), "entries": list(other_pcr[:MAX_LISTED_ENTRIES])},
            )
        )
    return findings
