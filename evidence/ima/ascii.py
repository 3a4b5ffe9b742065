"""The ASCII form of IMA measurement lists (``ascii_runtime_measurements``).

Each line is ``<pcr> <template-hash> <template> <fields...>`` with single spaces. The parser
splits off the leading columns only and takes the rest of the line as the file name, so a name
is never stripped and may contain spaces (kernels that predate replacing spaces with ``_``) and
UTF-8 multibyte characters. Hexadecimal columns must be lowercase as the kernel writes them:
``A`` and ``a`` differ in one bit, and a flipped bit must never parse into the same entry.
"""

from __future__ import annotations

import binascii
import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

from evidence.errors import ImaParseError
from evidence.ima import native
from evidence.ima.algorithms import (
    KERNEL_DIGEST_SIZES,
    TEMPLATE_HASH_ALGORITHM_BY_SIZE,
    template_hash_size_of,
)
from evidence.ima.entry import (
    TEMPLATE_IMA,
    TEMPLATE_IMA_BUF,
    TEMPLATE_IMA_NG,
    TEMPLATE_IMA_SIG,
    ImaEntry,
    ImaMeasurementList,
)
from evidence.ima.template_data import (
    LEGACY_DIGEST_SIZE,
    U32,
    TemplateFields,
    build_template_data,
    check_digest_size,
    check_name,
    d_ng_field,
)

_PCR_BY_TEXT = {str(pcr): pcr for pcr in range(24)}

# u32 length and "<algorithm>:\0" that start a d-ng field whose digest has the algorithm's
# full size, the number of hex digits of such a digest, and the algorithm name that entries
# share instead of keeping a copy each.
_D_NG_PREFIXES = {
    algorithm: (
        U32.pack(len(d_ng_field(algorithm, bytes(size)))) + algorithm.encode() + b":\0",
        2 * size,
        algorithm,
    )
    for algorithm, size in KERNEL_DIGEST_SIZES.items()
}

# The same table in the shape the native parser takes: algorithm name, template data prefix,
# digest size and shared name.
_D_NG_TABLE = tuple(
    (algorithm.encode(), prefix, hex_length // 2, name)
    for algorithm, (prefix, hex_length, name) in _D_NG_PREFIXES.items()
)

_SPLIT_LINE_HINT = "a file name that contains a newline splits its entry over two lines"

_new_entry = cast(Callable[[type, tuple[object, ...]], ImaEntry], tuple.__new__)


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a list's entries are built.

    Entries are tuples of bytes and strings, which cannot form cycles, yet every 700 of them
    trigger a collection, and the growing heap triggers full ones: about a fifth of the parse
    time of a 100,000-entry list. A collector that the caller had disabled stays disabled.
    The pause is process-wide, so other threads collect no cycles while a list is parsed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def decode_list_text(unverified_data: bytes) -> str:
    """Decode a list read as bytes; bytes that are not UTF-8 survive as surrogate escapes."""
    return unverified_data.decode("utf-8", "surrogateescape")


def split_list_lines(text: str) -> list[str]:
    """Split list text into lines, dropping only the newline that ends the last line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def parse_ascii_list(
    unverified_text: str | bytes,
    *,
    start_index: int = 0,
    template_hash_algorithm: str | None = None,
) -> ImaMeasurementList:
    """Parse an ASCII IMA measurement list whose first line is entry ``start_index``.

    ``template_hash_algorithm`` names the algorithm of the template-hash column (Keylime's
    ``ima.log_hash_alg``); without it the length of the first line's column decides.
    Raises ImaParseError naming the line of the first malformed entry.
    """
    # The native parser counts indexes in a C integer, so it takes start indexes below 2**62.
    if native.accel is not None and abs(start_index) < 1 << 62:
        unverified_data = _native_input(unverified_text)
        if unverified_data is not None:
            return _parse_ascii_natively(unverified_data, start_index, template_hash_algorithm)
    if isinstance(unverified_text, bytes):
        unverified_text = decode_list_text(unverified_text)
    return parse_ascii_lines(
        split_list_lines(unverified_text),
        start_index=start_index,
        template_hash_algorithm=template_hash_algorithm,
    )


def parse_ascii_lines(
    unverified_lines: Sequence[str],
    *,
    start_index: int = 0,
    template_hash_algorithm: str | None = None,
) -> ImaMeasurementList:
    """Parse lines of an ASCII IMA measurement list (without their newlines).

    Canonical ima-ng lines, nearly all of a real list, take an inlined path. Any other line,
    or one that path does not accept, goes through ``_parse_line``, which accepts a superset
    of it, builds the same entry, and reports what is wrong with a malformed line.
    """
    algorithm = template_hash_algorithm or _infer_template_hash_algorithm(unverified_lines)
    template_hash_size = template_hash_size_of(algorithm)
    template_hash_hex_length = 2 * template_hash_size
    d_ng_prefixes = _D_NG_PREFIXES
    pcr_by_text = _PCR_BY_TEXT
    unhexlify = binascii.a2b_hex
    pack_u32 = U32.pack
    new_entry = _new_entry

    entries: list[ImaEntry] = []
    append = entries.append
    with _collection_paused():
        for line_number, line in enumerate(unverified_lines, start=1):
            # Comparing with .hex() rejects uppercase digits, which _parse_line then reports.
            entry = None
            try:
                pcr_text, template_hash_hex, template, digest_field, name = line.split(" ", 4)
                digest_algorithm, _, digest_hex = digest_field.partition(":")
                prefix, digest_hex_length, digest_algorithm = d_ng_prefixes[digest_algorithm]
                template_hash = unhexlify(template_hash_hex)
                digest = unhexlify(digest_hex)
                if (
                    template == TEMPLATE_IMA_NG
                    and len(template_hash_hex) == template_hash_hex_length
                    and len(digest_hex) == digest_hex_length
                    and template_hash.hex() == template_hash_hex
                    and digest.hex() == digest_hex
                    and "\0" not in name
                ):
                    name_bytes = name.encode()
                    template_data = prefix + digest + pack_u32(len(name_bytes) + 1) + name_bytes + b"\0"
                    entry = new_entry(
                        ImaEntry,
                        (
                            start_index + line_number - 1,
                            pcr_by_text[pcr_text],
                            template_hash,
                            TEMPLATE_IMA_NG,
                            digest_algorithm,
                            digest,
                            name,
                            None,
                            None,
                            template_data,
                        ),
                    )
            except (ValueError, KeyError):
                entry = None

            if entry is None:
                entry = _parse_numbered_line(line, line_number, start_index, template_hash_size)
            append(entry)
    return ImaMeasurementList(tuple(entries), start_index, algorithm, "ascii")


def _native_input(unverified_text: str | bytes) -> str | bytes | None:
    """Return the list as the native parser reads it, or None for text it cannot take.

    The parser reads bytes, and ASCII text in place, whose offsets are those of its UTF-8
    form; other text is encoded first. Text with lone surrogates has no UTF-8 form; the
    Python parser handles it.
    """
    if isinstance(unverified_text, bytes) or (type(unverified_text) is str and unverified_text.isascii()):
        return unverified_text
    try:
        return unverified_text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _line_text(line: str | bytes) -> str:
    return decode_list_text(line) if isinstance(line, bytes) else line


def _parse_ascii_natively(
    unverified_data: str | bytes, start_index: int, template_hash_algorithm: str | None
) -> ImaMeasurementList:
    """Parse like ``parse_ascii_lines`` over the lines of ``unverified_data`` (bytes or ASCII
    text), letting the native parser take every canonical ima-ng line and ``_parse_line``
    every other one."""
    accel = native.accel
    assert accel is not None
    newline_mark: str | bytes = b"\n" if isinstance(unverified_data, bytes) else "\n"
    newline = unverified_data.find(newline_mark)  # type: ignore[arg-type]
    first_line = unverified_data if newline < 0 else unverified_data[:newline]
    algorithm = template_hash_algorithm or _infer_template_hash_algorithm(
        [_line_text(first_line)] if unverified_data else []
    )
    template_hash_size = template_hash_size_of(algorithm)

    entries: list[ImaEntry] = []
    position = 0
    size = len(unverified_data)
    with _collection_paused():
        while position < size:
            position = accel.parse_ima_ng(
                unverified_data, position, start_index + len(entries), template_hash_size,
                ImaEntry, TEMPLATE_IMA_NG, _D_NG_TABLE, entries,
            )
            if position >= size:
                break
            newline = unverified_data.find(newline_mark, position)  # type: ignore[arg-type]
            line_end = size if newline < 0 else newline
            line = _line_text(unverified_data[position:line_end])
            entries.append(_parse_numbered_line(line, len(entries) + 1, start_index, template_hash_size))
            position = line_end + 1
        # Built while collection is paused, so that no collection visits the entries first.
        parsed = accel.entries_tuple(entries)
    return ImaMeasurementList(parsed, start_index, algorithm, "ascii")


def format_ascii_list(entries: Sequence[ImaEntry]) -> str:
    """Write entries in the ASCII form, one newline-terminated line each, as the kernel does."""
    return "".join(_format_line(entry) for entry in entries)


def _format_line(entry: ImaEntry) -> str:
    if entry.template == TEMPLATE_IMA:
        fields = f"{entry.digest.hex()} {entry.path}"
    else:
        fields = f"{entry.digest_text} {entry.path}"
    if entry.template == TEMPLATE_IMA_SIG:
        fields += " " + (entry.signature or b"").hex()
    elif entry.template == TEMPLATE_IMA_BUF:
        fields += " " + (entry.buffer or b"").hex()
    return f"{entry.pcr:2d} {entry.template_hash.hex()} {entry.template} {fields}\n"


def _infer_template_hash_algorithm(lines: Sequence[str]) -> str:
    if not lines:
        return "sha1"
    columns = lines[0].lstrip(" ").split(" ", 3)
    if len(columns) < 4:
        # The line parser reports the malformed line itself.
        return "sha1"
    column = columns[1]
    algorithm = TEMPLATE_HASH_ALGORITHM_BY_SIZE.get(len(column) // 2) if len(column) % 2 == 0 else None
    if algorithm is None:
        raise ImaParseError(
            f"line 1: template hash has {len(column)} hex digits, expected 40, 64, 96 or 128",
            code="ima-template-hash-invalid",
            line=1,
        )
    return algorithm


def _parse_numbered_line(
    line: str, line_number: int, start_index: int, template_hash_size: int
) -> ImaEntry:
    """Parse line ``line_number`` (from 1) with ``_parse_line``, naming the line in any error."""
    try:
        return _parse_line(line, start_index + line_number - 1, template_hash_size)
    except ImaParseError as error:
        raise ImaParseError(
            f"line {line_number}: {error.message}", code=error.code, line=line_number
        ) from None


def _parse_line(line: str, index: int, template_hash_size: int) -> ImaEntry:
    pcr_text, template_hash_hex, template, fields_text = _split_columns(line)
    pcr = _parse_pcr(pcr_text)

    template_hash = _decode_hex(template_hash_hex, "template hash", "ima-template-hash-invalid")
    if len(template_hash) != template_hash_size:
        raise ImaParseError(
            f"template hash has {len(template_hash)} bytes, expected {template_hash_size} "
            "like the first line",
            code="ima-template-hash-invalid",
        )

    parse_fields = _FIELD_PARSERS.get(template)
    if parse_fields is None:
        raise ImaParseError(
            f"template {template!r} is not supported; expected one of ima, ima-ng, ima-sig, ima-buf",
            code="ima-template-unsupported",
        )
    fields = parse_fields(fields_text, not any(template_hash))
    check_name(fields.name, template)

    return ImaEntry(
        index,
        pcr,
        template_hash,
        template,
        fields.digest_algorithm,
        fields.digest,
        fields.name.decode("utf-8", "surrogateescape"),
        fields.signature,
        fields.buffer,
        build_template_data(template, fields),
    )


def _split_columns(line: str) -> list[str]:
    if not line:
        raise ImaParseError(f"line is empty; {_SPLIT_LINE_HINT}", code="ima-line-malformed")
    # The kernel prints the PCR with "%2d", so a PCR below 10 has a leading space.
    padded = line.startswith(" ")
    columns = (line[1:] if padded else line).split(" ", 3)
    if len(columns) < 4:
        raise ImaParseError(
            f"line has {len(columns)} of the columns '<pcr> <template-hash> <template> "
            f"<fields>'; {_SPLIT_LINE_HINT}",
            code="ima-line-malformed",
        )
    if padded and len(columns[0]) != 1:
        raise ImaParseError(
            f"line starts with a space, but PCR {columns[0]!r} is not a single digit",
            code="ima-pcr-invalid",
        )
    return columns


def _parse_pcr(text: str) -> int:
    pcr = _PCR_BY_TEXT.get(text)
    if pcr is None:
        raise ImaParseError(f"PCR {_clip(text)} is not a decimal number from 0 to 23", code="ima-pcr-invalid")
    return pcr


def _decode_hex(text: str, field_name: str, code: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ImaParseError(f"{field_name} {_clip(text)} is not hexadecimal", code=code) from None
    if value.hex() != text:
        raise ImaParseError(
            f"{field_name} {_clip(text)} is not lowercase hexadecimal without spaces", code=code
        )
    return value


def _encode_name(name: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ImaParseError(
            f"file name {_clip(name)} is not valid UTF-8 text", code="ima-name-invalid"
        ) from None


def _split_name_field(text: str, template: str) -> tuple[str, str]:
    digest_field, separator, name = text.partition(" ")
    if not separator:
        raise ImaParseError(
            f"{template} entry has no file name after {_clip(digest_field)}",
            code="ima-line-malformed",
        )
    return digest_field, name


def _parse_d_ng(text: str, violation: bool) -> tuple[str, bytes]:
    algorithm, colon, digest_hex = text.partition(":")
    if not colon:
        raise ImaParseError(
            f"file digest {_clip(text)} is not '<algorithm>:<hex>'", code="ima-digest-invalid"
        )
    if algorithm not in KERNEL_DIGEST_SIZES:
        raise ImaParseError(
            f"file digest algorithm {_clip(algorithm)} is not one the kernel writes",
            code="ima-digest-algorithm-unknown",
        )
    digest = _decode_hex(digest_hex, "file digest", "ima-digest-invalid")
    check_digest_size(algorithm, digest, violation=violation)
    return algorithm, digest


def _ima_fields(text: str, violation: bool) -> TemplateFields:
    digest_hex, name = _split_name_field(text, TEMPLATE_IMA)
    digest = _decode_hex(digest_hex, "file digest", "ima-digest-invalid")
    if len(digest) != LEGACY_DIGEST_SIZE:
        raise ImaParseError(
            f"ima template file digest has {len(digest)} bytes, expected {LEGACY_DIGEST_SIZE}",
            code="ima-digest-invalid",
        )
    return TemplateFields("sha1", digest, _encode_name(name), None, None)


def _ima_ng_fields(text: str, violation: bool) -> TemplateFields:
    digest_field, name = _split_name_field(text, TEMPLATE_IMA_NG)
    algorithm, digest = _parse_d_ng(digest_field, violation)
    return TemplateFields(algorithm, digest, _encode_name(name), None, None)


def _split_last_field(text: str, template: str) -> tuple[str, str, str]:
    """Split ``<d-ng> <name> <hex>`` from the right, so that a name may contain spaces.

    The kernel always writes the space before an empty last field; a line that lost it (a
    transport that strips trailing spaces) reads as an empty last field.
    """
    digest_field, rest = _split_name_field(text, template)
    name, separator, last = rest.rpartition(" ")
    if not separator:
        return digest_field, rest, ""
    return digest_field, name, last


def _ima_sig_fields(text: str, violation: bool) -> TemplateFields:
    digest_field, name, signature_hex = _split_last_field(text, TEMPLATE_IMA_SIG)
    algorithm, digest = _parse_d_ng(digest_field, violation)
    signature = _decode_hex(signature_hex, "signature", "ima-signature-invalid")
    return TemplateFields(algorithm, digest, _encode_name(name), signature, None)


def _ima_buf_fields(text: str, violation: bool) -> TemplateFields:
    digest_field, name, buffer_hex = _split_last_field(text, TEMPLATE_IMA_BUF)
    algorithm, digest = _parse_d_ng(digest_field, violation)
    buffer = _decode_hex(buffer_hex, "buffer", "ima-buffer-invalid")
    return TemplateFields(algorithm, digest, _encode_name(name), None, buffer)


_FIELD_PARSERS: dict[str, Callable[[str, bool], TemplateFields]] = {
    TEMPLATE_IMA: _ima_fields,
    TEMPLATE_IMA_NG: _ima_ng_fields,
    TEMPLATE_IMA_SIG: _ima_sig_fields,
    TEMPLATE_IMA_BUF: _ima_buf_fields,
}


def _clip(text: str, limit: int = 80) -> str:
    """Quote an untrusted value for an error message, cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"
