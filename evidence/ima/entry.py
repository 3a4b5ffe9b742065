"""Typed IMA measurement list entries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, overload

# PCR that IMA extends unless its policy names another one.
IMA_PCR = 10

TEMPLATE_IMA = "ima"
TEMPLATE_IMA_NG = "ima-ng"
TEMPLATE_IMA_SIG = "ima-sig"
TEMPLATE_IMA_BUF = "ima-buf"
# NOTE: lists written with other templates (ima-ngv2, ima-sigv2, ima-modsig, custom ones) are
# rejected with ima-template-unsupported, although their template data could be replayed.
SUPPORTED_TEMPLATES = (TEMPLATE_IMA, TEMPLATE_IMA_NG, TEMPLATE_IMA_SIG, TEMPLATE_IMA_BUF)

BOOT_AGGREGATE_NAME = "boot_aggregate"

ListForm = Literal["ascii", "binary"]


class ImaEntry(NamedTuple):
    """One entry of an IMA measurement list, as logged and not yet verified.

    A NamedTuple rather than a dataclass because a verifier builds hundreds of thousands of
    them per list and a tuple is the cheapest immutable record CPython has.
    """

    # Position in the measurement list, counted from 0 at boot. It hides tuple.index(),
    # which no caller of an entry needs.
    index: int  # type: ignore[assignment]  # the field replaces tuple.index on purpose
    pcr: int
    # The template-hash column as logged; all zeros marks a violation.
    template_hash: bytes
    # Template name: ima, ima-ng, ima-sig or ima-buf.
    template: str
    # Algorithm of `digest` as the kernel names it (sha256); sha1 for the ima template.
    digest_algorithm: str
    # File digest. For ima-buf the digest of `buffer`; for boot_aggregate the digest over
    # the boot PCRs.
    digest: bytes
    # File path (n or n-ng field), or the buffer name for ima-buf. Bytes that are not UTF-8
    # are kept as surrogate escapes, so `path_bytes` gives back the logged bytes.
    path: str
    # Raw sig field of ima-sig (b"" when empty); None for other templates.
    signature: bytes | None
    # Raw buf field of ima-buf; None for other templates.
    buffer: bytes | None
    # The bytes that the template hash and every bank's PCR extend value are computed over.
    template_data: bytes

    @property
    def is_violation(self) -> bool:
        """Tell whether the kernel logged this entry as a violation (template hash all zeros)."""
        return not any(self.template_hash)

    @property
    def path_bytes(self) -> bytes:
        return self.path.encode("utf-8", "surrogateescape")

    @property
    def digest_text(self) -> str:
        """The digest as ``algorithm:hex``, the form the ASCII list shows for d-ng fields."""
        return f"{self.digest_algorithm}:{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class ImaMeasurementList:
    """A parsed IMA measurement list, whole or from entry ``start_index`` on."""

    entries: tuple[ImaEntry, ...]
    start_index: int
    template_hash_algorithm: str
    """Algorithm of the template-hash column (``sha1`` for the classic securityfs files)."""
    form: ListForm

    @property
    def end_index(self) -> int:
        """Index that the entry after the last one would have."""
        return self.start_index + len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ImaEntry]:
        return iter(self.entries)

    @overload
    def __getitem__(self, position: int) -> ImaEntry: ...

    @overload
    def __getitem__(self, position: slice) -> tuple[ImaEntry, ...]: ...

    def __getitem__(self, position: int | slice) -> ImaEntry | tuple[ImaEntry, ...]:
        return self.entries[position]
