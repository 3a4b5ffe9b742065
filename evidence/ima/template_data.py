"""Template data: the bytes of an entry that its template hash and PCR extends cover.

For every template but ``ima``, template data is each field as a u32 little-endian length
followed by the field's bytes:

- ``d-ng``: algorithm name, ``:``, NUL, raw digest;
- ``n-ng``: the name followed by NUL;
- ``sig`` and ``buf``: raw bytes, possibly empty.

The legacy ``ima`` template has no length prefixes: a 20-byte digest, then the name
NUL-padded to 256 bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from evidence.errors import ImaParseError
from evidence.ima.algorithms import KERNEL_DIGEST_SIZES, VIOLATION_DIGEST
from evidence.ima.entry import (
    TEMPLATE_IMA,
    TEMPLATE_IMA_BUF,
    TEMPLATE_IMA_SIG,
)

U32 = struct.Struct("<I")

# The ima template's name field is NUL-padded to this size (IMA_EVENT_NAME_LEN_MAX + 1),
# so a name there has at most 255 bytes.
LEGACY_NAME_SIZE = 256
# NOTE: the kernel also allows MD5 (16 bytes) in the ima template; such lists are rejected.
LEGACY_DIGEST_SIZE = 20


class TemplateFields(NamedTuple):
    """The fields of one entry's template data, decoded."""

    digest_algorithm: str
    digest: bytes
    name: bytes
    signature: bytes | None
    buffer: bytes | None


def d_ng_field(algorithm: str, digest: bytes) -> bytes:
    return algorithm.encode("ascii") + b":\0" + digest


def build_template_data(template: str, fields: TemplateFields) -> bytes:
    """Build the template data of ``template`` from its decoded ``fields``."""
    if template == TEMPLATE_IMA:
        return fields.digest + fields.name.ljust(LEGACY_NAME_SIZE, b"\0")

    parts = [d_ng_field(fields.digest_algorithm, fields.digest), fields.name + b"\0"]
    if template == TEMPLATE_IMA_SIG:
        parts.append(fields.signature or b"")
    elif template == TEMPLATE_IMA_BUF:
        parts.append(fields.buffer or b"")
    return b"".join(U32.pack(len(part)) + part for part in parts)


def check_digest_size(algorithm: str, digest: bytes, *, violation: bool) -> None:
    """Raise unless ``digest`` has the size of ``algorithm``, or is a violation's zero digest."""
    expected = KERNEL_DIGEST_SIZES[algorithm]
    if len(digest) == expected:
        return
    if violation and digest == VIOLATION_DIGEST:
        return
    raise ImaParseError(
        f"{algorithm} file digest has {len(digest)} bytes, expected {expected}",
        code="ima-digest-invalid",
    )


def check_name(name: bytes, template: str) -> None:
    """Raise if ``name`` could not have come from the kernel's name field of ``template``."""
    if b"\0" in name:
        raise ImaParseError("file name contains a NUL byte", code="ima-name-invalid")
    if template == TEMPLATE_IMA and len(name) >= LEGACY_NAME_SIZE:
        raise ImaParseError(
            f"ima template file name has {len(name)} bytes, expected at most {LEGACY_NAME_SIZE - 1}",
            code="ima-name-too-long",
        )


def split_d_ng(field: bytes) -> tuple[str, bytes]:
    """Split a binary d-ng field into the algorithm name and the raw digest."""
    colon = field.find(b":")
    if colon < 0 or field[colon + 1 : colon + 2] != b"\0":
        raise ImaParseError(
            "d-ng field does not start with '<algorithm>:' and a NUL byte",
            code="ima-digest-invalid",
        )
    algorithm = field[:colon].decode("ascii", "replace")
    if algorithm not in KERNEL_DIGEST_SIZES:
        raise ImaParseError(
            f"file digest algorithm {algorithm!r} is not one the kernel writes",
            code="ima-digest-algorithm-unknown",
        )
    return algorithm, field[colon + 2 :]


def decode_template_data(template: str, data: bytes, *, violation: bool) -> TemplateFields:
    """Decode the template data of ``template``; raise ImaParseError where it is malformed."""
    if template == TEMPLATE_IMA:
        return _decode_legacy(data)

    field_count = 3 if template in (TEMPLATE_IMA_SIG, TEMPLATE_IMA_BUF) else 2
    fields = _split_fields(data, field_count)
    algorithm, digest = split_d_ng(fields[0])
    check_digest_size(algorithm, digest, violation=violation)

    name_field = fields[1]
    if not name_field.endswith(b"\0"):
        raise ImaParseError("n-ng field does not end with a NUL byte", code="ima-name-invalid")
    name = name_field[:-1]
    check_name(name, template)

    signature = fields[2] if template == TEMPLATE_IMA_SIG else None
    buffer = fields[2] if template == TEMPLATE_IMA_BUF else None
    return TemplateFields(algorithm, digest, name, signature, buffer)


def _decode_legacy(data: bytes) -> TemplateFields:
    if len(data) != LEGACY_DIGEST_SIZE + LEGACY_NAME_SIZE:
        raise ImaParseError(
            f"ima template data has {len(data)} bytes, expected {LEGACY_DIGEST_SIZE + LEGACY_NAME_SIZE}",
            code="ima-template-data-malformed",
        )
    padded_name = data[LEGACY_DIGEST_SIZE:]
    name = padded_name.split(b"\0", 1)[0]
    if padded_name != name.ljust(LEGACY_NAME_SIZE, b"\0"):
        raise ImaParseError("ima template name field is not NUL-padded", code="ima-template-data-malformed")
    check_name(name, TEMPLATE_IMA)
    return TemplateFields("sha1", data[:LEGACY_DIGEST_SIZE], name, None, None)


def _split_fields(data: bytes, count: int) -> list[bytes]:
    fields: list[bytes] = []
    position = 0
    for _ in range(count):
        if position + 4 > len(data):
            raise ImaParseError(
                f"template data ends after {len(fields)} of {count} fields",
                code="ima-template-data-malformed",
            )
        (size,) = U32.unpack_from(data, position)
        position += 4
        if position + size > len(data):
            raise ImaParseError(
                f"template data field {len(fields) + 1} claims {size} bytes, "
                f"only {len(data) - position} remain",
                code="ima-template-data-malformed",
            )
        fields.append(data[position : position + size])
        position += size
    if position != len(data):
        raise ImaParseError(
            f"template data has {len(data) - position} bytes after its {count} fields",
            code="ima-template-data-malformed",
        )
    return fields
