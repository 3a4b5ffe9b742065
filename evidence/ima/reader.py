"""Reading an ASCII IMA measurement list that is still being appended to.

The kernel appends to ``ascii_runtime_measurements`` while it is read. Securityfs files also
report size 0 and may return short reads. So a reader reads until EOF in a loop, and keeps a
line without its newline for the next read instead of returning half an entry.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import BinaryIO

from evidence.ima.ascii import decode_list_text, parse_ascii_lines
from evidence.ima.entry import ImaMeasurementList

_CHUNK_SIZE = 1 << 16


class ImaListReader:
    """Reads complete lines of an ASCII IMA measurement list, from entry ``start_index`` on.

    Each call returns only lines that have gained their newline since the previous call. The
    file stays open between calls, so a securityfs file continues where it stopped.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start_index: int = 0,
        chunk_size: int = _CHUNK_SIZE,
    ):
        self.path = os.fspath(path)
        self._chunk_size = chunk_size
        self._file: BinaryIO | None = None
        self._tail = b""
        self._lines_to_skip = start_index
        self._next_index = start_index

    @property
    def next_index(self) -> int:
        """Index of the entry that the next returned line will be."""
        return self._next_index

    def read_lines(self) -> list[str]:
        """Read to EOF and return the new complete lines, without their newlines.

        Raises OSError when the file cannot be opened or read.
        """
        data = self._tail + self._read_to_eof()
        complete_end = data.rfind(b"\n") + 1
        self._tail = data[complete_end:]
        if complete_end == 0:
            return []

        lines = decode_list_text(data[: complete_end - 1]).split("\n")
        if self._lines_to_skip:
            skipped = min(self._lines_to_skip, len(lines))
            lines = lines[skipped:]
            self._lines_to_skip -= skipped
        self._next_index += len(lines)
        return lines

    def read_list(self, *, template_hash_algorithm: str | None = None) -> ImaMeasurementList:
        """Read the new complete lines and parse them as entries from ``next_index`` on."""
        start_index = self._next_index
        lines = self.read_lines()
        return parse_ascii_lines(
            lines, start_index=start_index, template_hash_algorithm=template_hash_algorithm
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ImaListReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _read_to_eof(self) -> bytes:
        if self._file is None:
            # Kept open across calls: a securityfs file continues from where it stopped.
            self._file = open(self.path, "rb", buffering=0)
        chunks: list[bytes] = []
        while True:
            chunk = self._file.read(self._chunk_size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def read_ascii_list(
    path: str | os.PathLike[str],
    *,
    start_index: int = 0,
    template_hash_algorithm: str | None = None,
) -> ImaMeasurementList:
    """Read and parse the complete lines of an ASCII list file once, from ``start_index`` on.

    A last line without its newline is being written and is left out.
    """
    with ImaListReader(path, start_index=start_index) as reader:
        return reader.read_list(template_hash_algorithm=template_hash_algorithm)
