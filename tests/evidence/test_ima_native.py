"""The native IMA fast paths (evidence/ima/_accel.c) against the Python code they mirror.

Each test runs the public function twice, once as installed and once with
``evidence.ima.native.accel`` set to None, which is how a source tree without the built
extension runs. Both
runs must give the same entries, the same errors, the same replayed values and the same
findings, on lists built here and on the same lists mutated at random.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evidence.errors import ImaParseError
from evidence.ima import (
    ImaEntry,
    ImaMeasurementList,
    ImaReplayState,
    parse_ascii_list,
    replay_pcr10,
    verify_measurement_list,
)
from evidence.ima.ascii import _D_NG_TABLE
from evidence.ima.native import accel
from policies.runtime import empty_policy_document, evaluate, parse_runtime_policy
from tests.evidence.test_ima_properties import SETTINGS, _mutate, built_lists, edits
from tests.support.ima import BANK_SIZES, ImaListBuilder

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
REAL_LIST = FIXTURES / "ima" / "rust-keylime-agent.ascii"

Result = TypeVar("Result")


@contextlib.contextmanager
def python_only() -> Iterator[None]:
    """Run the block on the Python code alone, as without the built extension."""
    with mock.patch("evidence.ima.native.accel", None):
        yield


def both(call: Callable[[], Result]) -> tuple[Result | ImaParseError, Result | ImaParseError]:
    """Return what ``call`` returns or raises natively and in Python alone."""

    def outcome() -> Result | ImaParseError:
        try:
            return call()
        except ImaParseError as error:
            return error

    native = outcome()
    with python_only():
        python = outcome()
    return native, python


def assert_same_outcome(native: object, python: object) -> None:
    if isinstance(python, ImaParseError):
        assert isinstance(native, ImaParseError), f"Python raised {python}, native gave {native!r}"
        assert (native.code, native.message, native.line) == (python.code, python.message, python.line)
        return
    assert not isinstance(native, ImaParseError), f"native raised {native}, Python gave {python!r}"
    assert native == python
    if isinstance(python, ImaMeasurementList):
        assert isinstance(native, ImaMeasurementList)
        for native_entry, python_entry in zip(native.entries, python.entries, strict=True):
            assert type(native_entry) is ImaEntry
            assert [type(field) for field in native_entry] == [type(field) for field in python_entry]


def test_native_module_is_built() -> None:
    # pip install builds the extension; a test run without it would measure and check only
    # the Python code.
    assert accel is not None, "evidence/ima/_accel.c is not built: run `pip install -e .`"


@SETTINGS
@given(built_lists(), st.integers(min_value=0, max_value=5), st.sampled_from([None, "sha1", "sha256"]))
def test_parse_agrees_on_built_lists(built: ImaListBuilder, start: int, algorithm: str | None) -> None:
    data = built.ascii_bytes()

    for text in (data, built.ascii()):
        native, python = both(
            lambda text=text: parse_ascii_list(text, start_index=start, template_hash_algorithm=algorithm)
        )
        assert_same_outcome(native, python)


@SETTINGS
@given(built_lists(), edits)
def test_parse_agrees_on_mutated_lists(built: ImaListBuilder, changes: list[tuple[int, int, bytes]]) -> None:
    data = _mutate(built.ascii_bytes(), changes)

    native, python = both(lambda: parse_ascii_list(data))

    assert_same_outcome(native, python)


@SETTINGS
@given(st.binary(max_size=300))
def test_parse_agrees_on_random_bytes(data: bytes) -> None:
    native, python = both(lambda: parse_ascii_list(data))

    assert_same_outcome(native, python)


@SETTINGS
@given(st.text(max_size=200))
def test_parse_agrees_on_random_text(text: str) -> None:
    native, python = both(lambda: parse_ascii_list(text))

    assert_same_outcome(native, python)


def _quoted_values(built: ImaListBuilder, draw: st.DrawFn) -> dict[str, bytes]:
    """PCR 10 values for some banks: the list's value after some prefix, or random bytes."""
    banks = draw(st.lists(st.sampled_from(sorted(BANK_SIZES)), min_size=1, max_size=3, unique=True))
    quoted = {}
    for bank in banks:
        if draw(st.booleans()):
            count = draw(st.integers(min_value=0, max_value=len(built.entries)))
            quoted[bank] = built.pcr10(bank, count)
        else:
            quoted[bank] = draw(st.binary(min_size=BANK_SIZES[bank], max_size=BANK_SIZES[bank]))
    return quoted


@SETTINGS
@given(built_lists(), st.data())
def test_verification_agrees(built: ImaListBuilder, data: st.DataObject) -> None:
    changes = data.draw(st.none() | edits)
    text = built.ascii_bytes() if changes is None else _mutate(built.ascii_bytes(), changes)
    try:
        parsed = parse_ascii_list(text)
    except ImaParseError:
        return
    quoted = _quoted_values(built, data.draw)

    native, python = both(lambda: verify_measurement_list(parsed, quoted))

    assert native == python


@SETTINGS
@given(built_lists(), st.sampled_from(sorted(BANK_SIZES)), st.booleans())
def test_incremental_verification_agrees(built: ImaListBuilder, bank: str, as_list: bool) -> None:
    parsed = parse_ascii_list(built.ascii_bytes())
    half = len(parsed) // 2
    state = ImaReplayState(next_index=half, pcr10={bank: built.pcr10(bank, half)}, seen_entries=half)
    rest = parse_ascii_list(b"".join(line + b"\n" for line in built.lines()[half:]), start_index=half)

    native, python = both(lambda: verify_measurement_list(rest, {bank: built.pcr10(bank)}, state))
    assert native == python

    entries: Any = list(parsed.entries) if as_list else parsed.entries
    native_value, python_value = both(lambda: replay_pcr10(entries, bank))
    assert native_value == python_value == built.pcr10(bank)


@SETTINGS
@given(built_lists(), st.data())
def test_policy_evaluation_agrees(built: ImaListBuilder, data: st.DataObject) -> None:
    entries = parse_ascii_list(built.ascii_bytes()).entries
    digests: dict[str, list[str]] = {}
    for entry in entries:
        choice = data.draw(st.sampled_from(["listed", "other digest", "both", "absent"]))
        listed = digests.setdefault(entry.path, [])
        if choice in ("listed", "both"):
            listed.append(entry.digest.hex())
        if choice in ("other digest", "both"):
            listed.append(hashlib.sha256(entry.template_data).hexdigest())
    digests = {path: sorted(set(values)) for path, values in digests.items() if values}
    document = empty_policy_document()
    document["digests"] = digests
    if data.draw(st.booleans()):
        document["excludes"] = ["/proc/.*", "boot_aggregate"]
    policy = parse_runtime_policy(document)
    boot_aggregates = data.draw(st.none() | st.just({"sha1": bytes(20), "sha256": bytes(32)}))

    native, python = both(lambda: evaluate(entries, policy, boot_aggregates=boot_aggregates))

    assert native == python


@pytest.mark.skipif(not REAL_LIST.is_file(), reason="the shared fixtures are not beside the project")
def test_real_list_parses_and_replays_alike() -> None:
    data = REAL_LIST.read_bytes()

    native, python = both(lambda: parse_ascii_list(data))
    assert_same_outcome(native, python)
    assert isinstance(native, ImaMeasurementList)
    for bank in sorted(BANK_SIZES):
        native_value, python_value = both(lambda bank=bank: replay_pcr10(native.entries, bank))
        assert native_value == python_value


needs_native = pytest.mark.skipif(accel is None, reason="the native extension is not built")


@needs_native
def test_replay_of_non_entries_returns_none() -> None:
    assert accel is not None
    entry = parse_ascii_list(ImaListBuilder().ima_ng(b"/bin/sh", b"x").ascii_line()).entries[0]

    # None: the Python code takes over, and raises or replays as it does without the extension.
    assert accel.replay([entry, ("not", "an", "entry")], ImaEntry, "sha256", bytes(32), None, None) is None
    assert accel.replay([tuple(entry)], ImaEntry, "sha256", bytes(32), None, None) is None
    text_data = entry._replace(template_data="text")
    assert accel.replay([text_data], ImaEntry, "sha256", bytes(32), None, None) is None
    with pytest.raises(ValueError, match="has 20 bytes, expected 32 for sha256"):
        accel.replay([entry], ImaEntry, "sha256", bytes(20), None, None)
    with pytest.raises(ValueError, match="bank .md5. is not supported"):
        accel.replay([entry], ImaEntry, "md5", bytes(16), None, None)
    with pytest.raises(ValueError, match="not supported"):
        accel.replay([entry], ImaEntry, "sha256", bytes(32), None, "md5")


@needs_native
def test_parser_rejects_bad_arguments() -> None:
    assert accel is not None
    table = _D_NG_TABLE

    with pytest.raises(ValueError, match="outside data"):
        accel.parse_ima_ng(b"abc", 4, 0, 20, ImaEntry, "ima-ng", table, [])
    with pytest.raises(ValueError, match="from 1 to 64"):
        accel.parse_ima_ng(b"abc", 0, 0, 65, ImaEntry, "ima-ng", table, [])
    with pytest.raises(TypeError, match="tuple subclass"):
        accel.parse_ima_ng(b"abc", 0, 0, 20, dict, "ima-ng", table, [])
    with pytest.raises(TypeError, match="rows must be"):
        accel.parse_ima_ng(b"abc", 0, 0, 20, ImaEntry, "ima-ng", (("sha1",),), [])


@needs_native
@SETTINGS
@given(built_lists(), st.sampled_from(sorted(BANK_SIZES)), st.data())
def test_threaded_template_hash_check_agrees(built: ImaListBuilder, bank: str, data: st.DataObject) -> None:
    assert accel is not None
    changes = data.draw(st.none() | edits)
    text = built.ascii_bytes() if changes is None else _mutate(built.ascii_bytes(), changes)
    try:
        parsed = parse_ascii_list(text)
    except ImaParseError:
        return
    # Long lists of copies, so that the threaded path also meets every kind of entry.
    entries = list(parsed.entries) * data.draw(st.integers(min_value=1, max_value=300))
    check = data.draw(st.sampled_from([None, *sorted(BANK_SIZES)]))
    quoted = built.pcr10(bank)

    def run(parallel_from: int) -> object:
        return accel.replay(entries, ImaEntry, bank, bytes(BANK_SIZES[bank]), quoted, check, parallel_from)

    assert run(1) == run(len(entries) + 1)


@needs_native
def test_threaded_replay_of_bad_entry_returns_none() -> None:
    assert accel is not None
    entry = parse_ascii_list(ImaListBuilder().ima_ng(b"/bin/sh", b"x").ascii_line()).entries[0]
    entries: list[object] = [entry] * 5000 + [("not", "an", "entry")] + [entry] * 5000

    assert accel.replay(entries, ImaEntry, "sha256", bytes(32), None, "sha1", 1) is None



@needs_native
def test_parser_input_types() -> None:
    assert accel is not None
    table = _D_NG_TABLE
    line = ImaListBuilder().ima_ng(b"/bin/sh", b"x").ascii_line() + b"\n"

    from_bytes: list[ImaEntry] = []
    from_text: list[ImaEntry] = []
    assert accel.parse_ima_ng(line, 0, 0, 20, ImaEntry, "ima-ng", table, from_bytes) == len(line)
    assert accel.parse_ima_ng(line.decode(), 0, 0, 20, ImaEntry, "ima-ng", table, from_text) == len(line)
    assert from_bytes == from_text
    with pytest.raises(TypeError, match="bytes or ASCII str"):
        accel.parse_ima_ng("é" + line.decode(), 0, 0, 20, ImaEntry, "ima-ng", table, [])
    with pytest.raises(TypeError, match="bytes or ASCII str"):
        accel.parse_ima_ng(bytearray(line), 0, 0, 20, ImaEntry, "ima-ng", table, [])


@needs_native
def test_parsed_entries_untracked_by_gc() -> None:
    assert accel is not None
    builder = ImaListBuilder()
    for number in range(3):
        builder.ima_ng(f"/bin/tool{number}".encode(), b"x")
    builder.ima_sig(b"/bin/signed", b"y", signature=b"\x03\x02")

    parsed = parse_ascii_list(builder.ascii_bytes())

    # Entries contain only bytes, strings, integers and None, so neither they nor the tuple of
    # them can be part of a reference cycle.
    assert not gc.is_tracked(parsed.entries)
    assert not any(gc.is_tracked(entry) for entry in parsed.entries[:3])
    with pytest.raises(TypeError, match="must be a list"):
        accel.entries_tuple(tuple(parsed.entries))  # type: ignore[arg-type]
