"""The binary form of IMA measurement lists (``binary_runtime_measurements``).

Each record is a u32 PCR, the template hash (20 bytes of SHA-1 in the classic securityfs
file), a u32 length and the template name, then a u32 length and the template data. The
legacy ``ima`` template differs: its record carries no template data length, and instead of
template data it has the 20-byte digest followed by a u32 length and the name without NUL.
Integers are little-endian: the kernel writes host order, which is little-endian on x86 and
on Arm Linux, and ``ima_canonical_fmt`` forces little-endian elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from evidence.errors import ImaParseError
from evidence.ima.algorithms import template_hash_size_of
from evidence.ima.ascii import parse_ascii_list
from evidence.ima.entry import SUPPORTED_TEMPLATES, TEMPLATE_IMA, ImaEntry, ImaMeasurementList
from evidence.ima.template_data import (
    LEGACY_DIGEST_SIZE,
    U32,
    TemplateFields,
    build_template_data,
    check_name,
    decode_template_data,
)

# NOTE: a list from a big-endian kernel without ima_canonical_fmt fails to parse, usually with
# ima-pcr-invalid, because every integer is read as little-endian.

# IMA template names have at most 15 characters (IMA_TEMPLATE_NAME_LEN_MAX).
_MAX_TEMPLATE_NAME_LENGTH = 15


def is_binary_list(unverified_data: bytes) -> bool:
    """Tell the binary form from the ASCII form by its first bytes.

    A binary list starts with a u32 PCR below 24, so its second byte is NUL; the ASCII form
    never contains NUL.
    """
    return b"\0" in unverified_data[:4]


def parse_measurement_list(
    unverified_data: bytes | str,
    *,
    start_index: int = 0,
    template_hash_algorithm: str | None = None,
) -> ImaMeasurementList:
    """Parse an IMA measurement list in either form, telling binary from ASCII by its start.

    Without ``template_hash_algorithm`` the binary form is taken to carry SHA-1 template
    hashes and the ASCII form's column length decides.
    """
    if isinstance(unverified_data, bytes) and is_binary_list(unverified_data):
        return parse_binary_list(
            unverified_data,
            start_index=start_index,
            template_hash_algorithm=template_hash_algorithm or "sha1",
        )
    return parse_ascii_list(
        unverified_data, start_index=start_index, template_hash_algorithm=template_hash_algorithm
    )


def parse_binary_list(
    unverified_data: bytes,
    *,
    start_index: int = 0,
    template_hash_algorithm: str = "sha1",
) -> ImaMeasurementList:
    """Parse a binary IMA measurement list whose first record is entry ``start_index``.

    Raises ImaParseError naming the entry and the byte offset of the first malformed record.
    """
    template_hash_size = template_hash_size_of(template_hash_algorithm)
    entries: list[ImaEntry] = []
    position = 0
    while position < len(unverified_data):
        index = start_index + len(entries)
        try:
            entry, next_position = _parse_record(unverified_data, position, index, template_hash_size)
        except ImaParseError as error:
            raise ImaParseError(
                f"entry {index} at byte offset {position}: {error.message}",
                code=error.code,
                offset=position,
            ) from None
        entries.append(entry)
        position = next_position
    return ImaMeasurementList(tuple(entries), start_index, template_hash_algorithm, "binary")


def format_binary_list(entries: Sequence[ImaEntry]) -> bytes:
    """Write entries in the binary form, little-endian, as the kernel does on x86."""
    return b"".join(_format_record(entry) for entry in entries)


def _format_record(entry: ImaEntry) -> bytes:
    template = entry.template.encode("ascii")
    header = U32.pack(entry.pcr) + entry.template_hash + U32.pack(len(template)) + template
    if entry.template == TEMPLATE_IMA:
        name = entry.path_bytes
        return header + entry.digest + U32.pack(len(name)) + name
    return header + U32.pack(len(entry.template_data)) + entry.template_data


class _Cursor:
    """Reads fields of one record and raises ImaParseError when the data ends early."""

    def __init__(self, data: bytes, position: int):
        self.data = data
        self.position = position

    def take(self, size: int, field_name: str) -> bytes:
        end = self.position + size
        if end > len(self.data):
            raise ImaParseError(
                f"{field_name} needs {size} bytes, only {len(self.data) - self.position} remain",
                code="ima-list-truncated",
            )
        value = self.data[self.position : end]
        self.position = end
        return value

    def take_u32(self, field_name: str) -> int:
        (value,) = U32.unpack(self.take(4, field_name))
        return int(value)


def _parse_record(data: bytes, position: int, index: int, template_hash_size: int) -> tuple[ImaEntry, int]:
    cursor = _Cursor(data, position)

    pcr = cursor.take_u32("PCR")
    if pcr > 23:
        raise ImaParseError(f"PCR {pcr} is not from 0 to 23", code="ima-pcr-invalid")
    template_hash = cursor.take(template_hash_size, "template hash")

    name_length = cursor.take_u32("template name length")
    if name_length > _MAX_TEMPLATE_NAME_LENGTH:
        raise ImaParseError(
            f"template name length {name_length} exceeds {_MAX_TEMPLATE_NAME_LENGTH}",
            code="ima-template-unsupported",
        )
    template = cursor.take(name_length, "template name").decode("ascii", "replace")
    if template not in SUPPORTED_TEMPLATES:
        raise ImaParseError(
            f"template {template!r} is not supported; expected one of ima, ima-ng, ima-sig, ima-buf",
            code="ima-template-unsupported",
        )

    if template == TEMPLATE_IMA:
        fields = _read_legacy_fields(cursor)
        template_data = build_template_data(template, fields)
    else:
        template_data = cursor.take(cursor.take_u32("template data length"), "template data")
        fields = decode_template_data(template, template_data, violation=not any(template_hash))

    entry = ImaEntry(
        index,
        pcr,
        template_hash,
        template,
        fields.digest_algorithm,
        fields.digest,
        fields.name.decode("utf-8", "surrogateescape"),
        fields.signature,
        fields.buffer,
        template_data,
    )
    return entry, cursor.position


def _read_legacy_fields(cursor: _Cursor) -> TemplateFields:
    digest = cursor.take(LEGACY_DIGEST_SIZE, "ima template digest")
    name = cursor.take(cursor.take_u32("ima template name length"), "ima template name")
    check_name(name, TEMPLATE_IMA)
    return TemplateFields("sha1", digest, name, None, None)
