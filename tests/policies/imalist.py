"""Single ASCII IMA list lines for the runtime policy tests, made with ``tests.support.ima``.

Each helper returns one line without its newline, with a correct SHA-1 template hash, so that
edgetrust's parser and Keylime's both accept it and a test can mix lines freely.
"""

from __future__ import annotations

from collections.abc import Sequence

from evidence.ima import ImaEntry, parse_ascii_lines
from tests.support.ima import BuiltEntry, ImaListBuilder


def _line(entry: BuiltEntry) -> str:
    return entry.ascii_line().decode("utf-8", "surrogateescape")


def file_line(path: str, content: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-ng line for a file with this content."""
    return _line(ImaListBuilder().ima_ng(path, content, algorithm=algorithm))


def ng_line(path: str, digest: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-ng line with this file digest."""
    return _line(ImaListBuilder().ima_ng(path, algorithm=algorithm, digest=digest))


def sig_line(path: str, digest: bytes, signature: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-sig line; an empty signature leaves the trailing space, as the kernel does."""
    return _line(ImaListBuilder().ima_sig(path, signature=signature, algorithm=algorithm, digest=digest))


def buf_line(name: str, buffer: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-buf line whose digest is the hash of the buffer."""
    return _line(ImaListBuilder().ima_buf(name, buffer, algorithm=algorithm))


def violation_line(path: str) -> str:
    """Return an ima-ng violation line: template hash and file digest all zeros."""
    return _line(ImaListBuilder().violation(path, algorithm="sha1"))


def parse(lines: Sequence[str], start_index: int = 0) -> tuple[ImaEntry, ...]:
    return parse_ascii_lines(list(lines), start_index=start_index).entries
