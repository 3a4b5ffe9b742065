"""Build small ASCII IMA measurement lists for the runtime policy tests.

Lines carry correct template hashes (SHA-1 over the template data, as the classic securityfs
file shows), so both edgetrust's parser and Keylime's accept them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from evidence.ima import ImaEntry, parse_ascii_lines

VIOLATION_TEMPLATE_HASH = bytes(20)


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def template_data(
    template: str, algorithm: str, digest: bytes, name: str, extra: bytes | None = None
) -> bytes:
    """Return the template data the kernel hashes for an ima-ng, ima-sig or ima-buf entry."""
    data = _field(algorithm.encode() + b":\0" + digest) + _field(name.encode() + b"\0")
    if template in ("ima-sig", "ima-buf"):
        data += _field(extra or b"")
    return data


def file_line(path: str, content: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-ng line for a file with this content."""
    return ng_line(path, hashlib.new(algorithm, content).digest(), algorithm=algorithm)


def ng_line(path: str, digest: bytes, *, algorithm: str = "sha256") -> str:
    data = template_data("ima-ng", algorithm, digest, path)
    return f"10 {hashlib.sha1(data).hexdigest()} ima-ng {algorithm}:{digest.hex()} {path}"


def sig_line(path: str, digest: bytes, signature: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-sig line; an empty signature leaves the trailing space, as the kernel does."""
    data = template_data("ima-sig", algorithm, digest, path, signature)
    return f"10 {hashlib.sha1(data).hexdigest()} ima-sig {algorithm}:{digest.hex()} {path} {signature.hex()}"


def buf_line(name: str, buffer: bytes, *, algorithm: str = "sha256") -> str:
    """Return an ima-buf line whose digest is the hash of the buffer."""
    digest = hashlib.new(algorithm, buffer).digest()
    data = template_data("ima-buf", algorithm, digest, name, buffer)
    return f"10 {hashlib.sha1(data).hexdigest()} ima-buf {algorithm}:{digest.hex()} {name} {buffer.hex()}"


def violation_line(path: str) -> str:
    """Return an ima-ng violation line: template hash and file digest all zeros."""
    return f"10 {VIOLATION_TEMPLATE_HASH.hex()} ima-ng sha1:{bytes(20).hex()} {path}"


def parse(lines: Sequence[str], start_index: int = 0) -> tuple[ImaEntry, ...]:
    return parse_ascii_lines(list(lines), start_index=start_index).entries
