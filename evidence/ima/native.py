"""The native fast paths of ``_accel.c``, or None where the extension was not built.

``pip install`` builds the extension, so an installed edgetrust always has it. A source tree
used without building it still works: every caller falls back to the Python code, which
stays the reference that the tests compare the native code with.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from evidence.ima.algorithms import BANK_DIGEST_SIZES
from evidence.ima.entry import ImaEntry

accel: ModuleType | None
try:
    from evidence.ima import _accel as accel
except ImportError:
    accel = None


class ReplayThreads:
    """Threshold from which ``_accel.replay`` hashes a list in two threads."""

    parallel_from = 4096
    """Entry count from which a replay uses a second thread. Shorter lists are replayed in one
    thread because starting a thread costs more. Benchmarks raise it to measure one thread."""


ReplayResult = tuple[list[int], bytes, list[ImaEntry], list[int], list[int], list[ImaEntry]]


def replay(
    entries: Sequence[ImaEntry],
    bank: str,
    initial: bytes,
    quoted: bytes | None,
    check_algorithm: str | None,
) -> ReplayResult | None:
    """Replay ``entries`` natively and return what ``_accel.replay`` returns.

    Return None where the caller's Python code must do it: without the extension, for
    entries that are not a list or tuple of well-typed ImaEntry tuples, and for an initial
    value that does not have the bank's size.
    """
    if (
        accel is None
        or not isinstance(entries, (list, tuple))
        or len(initial) != BANK_DIGEST_SIZES.get(bank)
    ):
        return None
    result: ReplayResult | None = accel.replay(
        entries, ImaEntry, bank, initial, quoted, check_algorithm, ReplayThreads.parallel_from
    )
    return result
