"""The native fast paths of ``_accel.c``, or None where the extension was not built.

``pip install`` builds the extension, so an installed edgetrust always has it. A source tree
used without building it still works: every caller falls back to the Python code, which
stays the reference that the tests compare the native code with.
"""

from __future__ import annotations

from types import ModuleType

accel: ModuleType | None
try:
    from evidence.ima import _accel as accel
except ImportError:
    accel = None


class ReplayThreads:
    """From how many entries on a replay hashes in two threads (``_accel.replay``)."""

    parallel_from = 4096
    """Shorter lists are replayed in one thread; starting a thread costs more. Benchmarks set
    a larger value to measure one thread alone."""
