"""Errors raised by the evidence package.

Every error carries a stable kebab-case ``code`` that tests assert and the web layer maps to an
HTTP status, a plain ``message`` with the value seen and the value expected, and, where the
input came from a named field, that ``field``.
"""

from __future__ import annotations


class EvidenceError(Exception):
    """Base of every error raised by ``evidence``."""

    default_code = "evidence-invalid"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field

    def with_field(self, field: str) -> EvidenceError:
        """Return this error naming ``field`` as the input it came from, unless one is set."""
        if self.field is None:
            self.field = field
        return self


class ParseError(EvidenceError):
    """Input that is not a well-formed structure of the kind expected (truncated, trailing
    bytes, unknown algorithm, bad encoding)."""

    default_code = "malformed-structure"


class VerificationError(EvidenceError):
    """Well-formed input that fails a cryptographic or consistency check."""

    default_code = "verification-failed"


class TrustStoreError(EvidenceError):
    """A configured CA bundle that cannot be used: a missing directory, a file without PEM
    certificates, or a certificate that cannot be parsed. The message names the file."""

    default_code = "trust-store-invalid"


class ImaParseError(ParseError):
    """An IMA measurement list that is not well formed.

    ``line`` is the 1-based line of the ASCII form, and ``offset`` the byte offset of the
    record in the binary form. Each is ``None`` where it does not apply.
    """

    default_code = "ima-list-malformed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        line: int | None = None,
        offset: int | None = None,
    ):
        super().__init__(message, code=code, field=field)
        self.line = line
        self.offset = offset
