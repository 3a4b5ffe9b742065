"""Reading ASCII IMA measurement lists that are still being appended to."""

from __future__ import annotations

from pathlib import Path

import pytest

from evidence.ima import ImaListReader, read_ascii_list
from tests.support.ima import ImaListBuilder


def _built(count: int) -> ImaListBuilder:
    built = ImaListBuilder()
    for number in range(count):
        built.ima_ng(f"/usr/lib/caf\u00e9/lib{number}.so", b"lib %d" % number)
    return built


def test_reader_reads_whole_file_in_small_chunks(tmp_path: Path) -> None:
    built = _built(20)
    path = tmp_path / "list"
    path.write_bytes(built.ascii_bytes())

    with ImaListReader(path, chunk_size=7) as reader:
        parsed = reader.read_list()

    assert len(parsed) == 20
    assert parsed[19].path == "/usr/lib/caf\u00e9/lib19.so"
    assert reader.next_index == 20


def test_reader_keeps_partial_line_across_many_appends(tmp_path: Path) -> None:
    built = _built(6)
    data = built.ascii_bytes()
    path = tmp_path / "list"
    path.write_bytes(b"")
    seen = []

    with ImaListReader(path) as reader:
        for position in range(0, len(data), 13):
            with path.open("ab") as appending:
                appending.write(data[position : position + 13])
            seen.extend(reader.read_lines())

    assert [line.encode() for line in seen] == built.lines()


def test_reader_never_splits_multibyte_character(tmp_path: Path) -> None:
    built = _built(1)
    data = built.ascii_bytes()
    cut = data.index("\u00e9".encode()) + 1
    path = tmp_path / "list"
    path.write_bytes(data[:cut])

    with ImaListReader(path) as reader:
        assert reader.read_lines() == []
        with path.open("ab") as appending:
            appending.write(data[cut:])
        lines = reader.read_lines()

    assert lines == [built.lines()[0].decode()]


def test_reader_starts_at_entry_index(tmp_path: Path) -> None:
    built = _built(10)
    path = tmp_path / "list"
    path.write_bytes(built.ascii_bytes())

    parsed = read_ascii_list(path, start_index=7)

    assert [entry.index for entry in parsed] == [7, 8, 9]
    assert parsed[0].template_data == built.entries[7].template_data


def test_reader_start_index_beyond_current_end_waits(tmp_path: Path) -> None:
    built = _built(10)
    data = built.ascii_bytes()
    split = sum(len(line) + 1 for line in built.lines()[:4])
    path = tmp_path / "list"
    path.write_bytes(data[:split])

    with ImaListReader(path, start_index=6) as reader:
        first = reader.read_list()
        with path.open("ab") as appending:
            appending.write(data[split:])
        second = reader.read_list()

    assert len(first) == 0
    assert first.start_index == 6
    assert [entry.index for entry in second] == [6, 7, 8, 9]


def test_read_ascii_list_leaves_out_unterminated_last_line(tmp_path: Path) -> None:
    built = _built(3)
    path = tmp_path / "list"
    path.write_bytes(built.ascii_bytes()[:-1])

    parsed = read_ascii_list(path)

    assert len(parsed) == 2


def test_reader_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_ascii_list(tmp_path / "absent")
