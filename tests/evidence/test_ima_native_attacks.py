"""Edge inputs on which the native IMA fast paths (evidence/ima/_accel.c) once differed from
the Python code.

Each test compares the public function as installed with the same call on the Python code
alone, as tests/evidence/test_ima_native.py does, or runs the native code in a child
interpreter that would crash on a use-after-free.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from evidence.ima import (
    ImaMeasurementList,
    ImaReplayState,
    parse_ascii_list,
    replay_pcr10,
    verify_measurement_list,
)
from tests.evidence.test_ima_native import needs_native, python_only
from tests.support.ima import ImaListBuilder

REPO_ROOT = Path(__file__).resolve().parents[2]


def outcome(call: Callable[[], object]) -> object:
    """Return what ``call`` returns, or the type and text of the exception it raises."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - the test compares any exception
        return (type(error).__name__, str(error))


def native_and_python(call: Callable[[], object]) -> tuple[object, object]:
    """Return the outcome of ``call`` natively and in Python alone."""
    native = outcome(call)
    with python_only():
        python = outcome(call)
    return native, python


def two_line_list() -> bytes:
    builder = ImaListBuilder()
    builder.ima_ng(b"/bin/sh", b"sh")
    builder.ima_ng(b"/bin/ls", b"ls")
    return builder.ascii_bytes()


# --- Parsing ----------------------------------------------------------------------------------


@needs_native
def test_parse_start_index_above_ssize_t() -> None:
    # The verifier passes the device's ima_measurement_list_entry, which has no upper bound,
    # to parse_ascii_list before it compares the index with the saved state.
    start = 2**63

    native, python = native_and_python(lambda: parse_ascii_list(two_line_list(), start_index=start))

    assert isinstance(python, ImaMeasurementList)
    assert [entry.index for entry in python.entries] == [start, start + 1]
    assert native == python


@needs_native
def test_parse_start_index_overflows_index() -> None:
    start = 2**63 - 1

    native, python = native_and_python(lambda: parse_ascii_list(two_line_list(), start_index=start))

    assert isinstance(python, ImaMeasurementList)
    assert isinstance(native, ImaMeasurementList)
    assert [entry.index for entry in native.entries] == [start, start + 1]
    assert native == python


class _Text(str):
    """A str subclass, which the Python parser reads like a str."""


@needs_native
def test_parse_str_subclass() -> None:
    text = _Text(two_line_list().decode())

    native, python = native_and_python(lambda: parse_ascii_list(text))

    assert isinstance(python, ImaMeasurementList)
    assert native == python


# --- Replay -----------------------------------------------------------------------------------


@needs_native
def test_replay_plain_tuples_rejected() -> None:
    entries = [tuple(entry) for entry in parse_ascii_list(two_line_list()).entries]

    native, python = native_and_python(
        lambda: replay_pcr10(entries, "sha256")  # type: ignore[arg-type]  # not ImaEntry on purpose
    )

    assert isinstance(python, tuple) and python[0] == "AttributeError"
    assert native == python


@needs_native
def test_replay_pcr_above_c_long() -> None:
    entries = [
        entry._replace(pcr=2**64) for entry in parse_ascii_list(two_line_list()).entries
    ]
    unverified_list = ImaMeasurementList(tuple(entries), 0, "sha1", "ascii")

    native_value, python_value = native_and_python(lambda: replay_pcr10(entries, "sha256"))
    native_result, python_result = native_and_python(
        lambda: verify_measurement_list(unverified_list, {"sha256": bytes(32)})
    )

    assert python_value == bytes(32)
    assert native_value == python_value
    assert native_result == python_result


@needs_native
def test_verification_saved_value_of_wrong_size() -> None:
    unverified_list = parse_ascii_list(two_line_list())
    # ImaReplayState.from_json checks the size, but the constructor does not.
    state = ImaReplayState(next_index=0, pcr10={"sha256": bytes(20)})

    native, python = native_and_python(
        lambda: verify_measurement_list(unverified_list, {"sha256": bytes(32)}, state)
    )

    assert not isinstance(python, tuple), python
    assert native == python


# --- Runtime policy ---------------------------------------------------------------------------

# Calls accel.unlisted_entries on a list that a digest container's __contains__ empties, so
# the native loop must keep the entries alive itself. PYTHONMALLOC=debug overwrites freed
# memory, which turns a read after free into a crash instead of a silent read.
_MUTATED_LIST_SCRIPT = textwrap.dedent(
    """
    from evidence.ima import ImaEntry, parse_ascii_list
    from evidence.ima.native import accel
    from tests.support.ima import ImaListBuilder

    builder = ImaListBuilder()
    for number in range(50):
        builder.ima_ng(f"/bin/tool{number}".encode(), str(number).encode())
    entries = [
        entry._replace(path=entry.path + "-" * 100)
        for entry in parse_ascii_list(builder.ascii_bytes()).entries
    ]

    class ClearingContainer:
        def __contains__(self, digest):
            entries.clear()
            return False

    zero_hashes = frozenset(bytes(size) for size in (20, 32, 48, 64))
    unlisted = accel.unlisted_entries(
        entries, ImaEntry, {entries[0].path: ClearingContainer()}, zero_hashes, None
    )
    print(sorted({entry.template for entry in unlisted}))
    """
)


@needs_native
def test_unlisted_entries_list_emptied_during_call() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _MUTATED_LIST_SCRIPT],
        cwd=REPO_ROOT,
        env={"PYTHONMALLOC": "debug", "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['ima-ng']"
