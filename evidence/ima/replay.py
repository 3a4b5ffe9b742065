"""Replay of IMA measurement lists into PCR 10, and the state incremental replay resumes from.

PCR 10 in bank B is extended, for each entry, with H_B(template data); the template-hash
column is not what is extended. A violation (template-hash column all zeros) extends every
bank with 0xff bytes of the bank's digest size instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evidence.errors import ParseError
from evidence.ima import native
from evidence.ima.algorithms import BANK_DIGEST_SIZES, bank_hash
from evidence.ima.entry import IMA_PCR, ImaEntry


@dataclass(frozen=True, slots=True)
class ImaReplayState:
    """State that incremental attestation keeps between two verifications within one boot.

    Store it after every attestation that passed (``to_json``) and pass it back to the next
    one. Start from ``ImaReplayState()`` after enrollment and after every reboot.
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
    if isinstance(entries, (list, tuple)):
        replayed = native.replay(entries, bank, value, None, None)
        if replayed is not None:
            return replayed[1]
    for entry in entries:
        if entry.pcr != IMA_PCR:
            continue
        if any(entry.template_hash):
            value = new_hash(value + new_hash(entry.template_data).digest()).digest()
        else:
            value = new_hash(value + violation_extend).digest()
    return value


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
