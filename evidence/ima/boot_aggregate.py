"""The ``boot_aggregate`` entry: IMA's first measurement, a digest over the boot PCRs."""

from __future__ import annotations

from collections.abc import Mapping

from evidence.findings import Finding, Severity
from evidence.ima.algorithms import BANK_HASHES
from evidence.ima.entry import BOOT_AGGREGATE_NAME, ImaEntry


def boot_aggregate_pcrs(bank: str) -> range:
    """Return the PCRs that the boot_aggregate of ``bank`` covers.

    The SHA-1 digest covers PCR 0-7. Other banks also cover PCR 8 and 9, which hold the
    kernel command line and kernel image in a typical PCR allocation. The kernel leaves them
    out of SHA-1 so that older SHA-1 aggregates keep their meaning.
    """
    return range(8) if bank == "sha1" else range(10)


def compute_boot_aggregate(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """Hash the concatenated values of the boot PCRs of ``bank`` with the bank's algorithm."""
    digest = BANK_HASHES[bank]()
    for pcr in boot_aggregate_pcrs(bank):
        digest.update(pcrs[pcr])
    return bytes(digest.digest())


def check_boot_aggregate(
    entry: ImaEntry | None,
    quoted_pcrs: Mapping[str, Mapping[int, bytes]],
    *,
    allow_zero: bool = False,
) -> list[Finding]:
    """Check that ``entry``, the first of the list, is a boot_aggregate of the quoted PCRs.

    1. The first entry is named ``boot_aggregate``.
    2. An all-zeros digest (no TPM when the kernel booted) passes only with ``allow_zero``.
    3. The quote covers the bank that the digest's algorithm names and its boot PCRs.
    4. The digest equals the bank's hash over those PCR values.

    ``quoted_pcrs`` maps a bank name to PCR index and value, taken from a verified quote.
    """
    if entry is None or entry.index != 0 or entry.path != BOOT_AGGREGATE_NAME:
        got = "no entry" if entry is None else f"entry {entry.index} named {entry.path!r}"
        return [
            Finding(
                "ima-boot-aggregate-missing",
                Severity.ERROR,
                f"expected entry 0 of the IMA measurement list to be boot_aggregate, got {got}",
            )
        ]

    bank = entry.digest_algorithm
    context = {"bank": bank, "digest": entry.digest.hex()}
    if not any(entry.digest):
        severity = Severity.INFO if allow_zero else Severity.ERROR
        outcome = "allowed by the caller" if allow_zero else "not allowed"
        return [
            Finding(
                "ima-boot-aggregate-zero",
                severity,
                f"boot_aggregate is all zeros (no TPM when the kernel booted); {outcome}",
                context,
            )
        ]

    if bank not in BANK_HASHES:
        return [
            Finding(
                "ima-boot-aggregate-algorithm-unsupported",
                Severity.ERROR,
                f"boot_aggregate uses {bank}, which is not a PCR bank that can be recomputed",
                context,
            )
        ]

    bank_pcrs = quoted_pcrs.get(bank, {})
    missing = [pcr for pcr in boot_aggregate_pcrs(bank) if pcr not in bank_pcrs]
    if missing:
        return [
            Finding(
                "ima-boot-aggregate-pcrs-missing",
                Severity.ERROR,
                f"boot_aggregate needs PCRs {missing} of the {bank} bank, which the quote lacks",
                {**context, "missing_pcrs": missing},
            )
        ]

    expected = compute_boot_aggregate(bank, bank_pcrs)
    if entry.digest != expected:
        return [
            Finding(
                "ima-boot-aggregate-mismatch",
                Severity.ERROR,
                f"boot_aggregate is {bank}:{entry.digest.hex()}, expected {bank}:{expected.hex()} "
                f"from the quoted PCRs {boot_aggregate_pcrs(bank).start}-"
                f"{boot_aggregate_pcrs(bank).stop - 1}",
                {**context, "expected": expected.hex()},
            )
        ]
    return []
