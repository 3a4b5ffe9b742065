"""API tokens: the table, creation, listing, revocation and authentication.

A token is ``et_`` followed by the URL-safe base64 of 32 random bytes. The server stores only
the SHA-256 digest of those 32 bytes, so a copy of the database does not let anyone call the
API; the token itself is shown once, when it is created.

Each token has one scope:

- ``read``: verdicts, the trust API (batch, stream, signing keys), admission and the gate;
- ``admin``: every route, including the mutations and the admin reads.

``edgetrust.auth`` decides which scope a route needs; this module only stores and checks tokens.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import CheckConstraint, DateTime, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgetrust.db import Base

TOKEN_PREFIX: Final = "et_"  # noqa: S105 - a fixed prefix, not a secret
SECRET_BYTES: Final = 32
NAME_MAX_LENGTH: Final = 100
_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The URL-safe base64 of 32 bytes without padding is 43 characters.
_TOKEN_PATTERN: Final = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")


class Scope(enum.StrEnum):
    READ = "read"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        """Tell whether a token of this scope may call a route that needs ``needed``."""
        return self is Scope.ADMIN or needed is Scope.READ


class TokenError(Exception):
    """A token that cannot be created, found or accepted; ``code`` is stable kebab-case."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


class ApiToken(Base):
    """An API token, by name, with the digest of its secret and its scope."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("scope IN ('read', 'admin')", name="scope_known"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    # Hex SHA-256 of the 32 secret bytes; the token is looked up by it.
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # NULL means the token does not expire.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """The name and scope of an accepted token."""

    name: str
    scope: Scope


def check_name(unverified_name: str) -> str:
    if not _NAME_PATTERN.fullmatch(unverified_name):
        raise TokenError(
            f"token name {unverified_name[:80]!r} is invalid: use 1 to {NAME_MAX_LENGTH} "
            "characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
            code="token-name-invalid",
        )
    return unverified_name


def create_token(session: Session, name: str, scope: Scope, *, now: datetime,
                 expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Store a new token and return its row and the token text, which is not stored anywhere.

    Raises TokenError ``token-name-invalid`` or ``token-exists``.
    """
    check_name(name)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise _exists(name)

    secret = secrets.token_bytes(SECRET_BYTES)
    token = ApiToken(name=name, secret_sha256=hashlib.sha256(secret).hexdigest(), scope=scope.value,
                     created_at=now, expires_at=expires_at, revoked_at=None)
    session.add(token)
    try:
        session.flush()
    except IntegrityError:
        # Another transaction created a token of the same name after the check.
        raise _exists(name) from None
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")
    return token, text


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def revoke_token(session: Session, name: str, *, now: datetime) -> ApiToken:
    """Revoke the token ``name``; revoking it again keeps the first revocation time.

    Raises TokenError ``token-not-found``.
    """
    token = session.scalars(select(ApiToken).where(ApiToken.name == name).with_for_update()).one_or_none()
    if token is None:
        raise TokenError(f"no API token named {name!r}; `edgetrust token list` shows the names",
                         code="token-not-found")
    if token.revoked_at is None:
        token.revoked_at = now
    return token


def authenticate(session: Session, unverified_token: str, *, now: datetime) -> TokenIdentity:
    """Return the identity of a presented token, or raise TokenError.

    Codes: ``token-malformed``, ``token-unknown``, ``token-revoked``, ``token-expired``. The
    row is found by the digest of the secret. The digests are then compared in constant time,
    so the comparison does not reveal how much of a guessed token was right.
    """
    digest = _secret_digest(unverified_token)

    # Columns rather than an ORM entity: this runs on every request.
    token = session.execute(
        select(ApiToken.name, ApiToken.secret_sha256, ApiToken.scope, ApiToken.expires_at,
               ApiToken.revoked_at).where(ApiToken.secret_sha256 == digest)
    ).one_or_none()
    if token is None or not hmac.compare_digest(token.secret_sha256, digest):
        raise TokenError("the API token is not known to this server", code="token-unknown")

    if token.revoked_at is not None:
        raise TokenError(f"API token {token.name!r} was revoked", code="token-revoked")

    if token.expires_at is not None and now >= _as_utc(token.expires_at):
        raise TokenError(f"API token {token.name!r} expired at {token.expires_at.isoformat()}",
                         code="token-expired")

    return TokenIdentity(token.name, Scope(token.scope))


def _secret_digest(unverified_token: str) -> str:
    if not _TOKEN_PATTERN.fullmatch(unverified_token):
        raise TokenError(f"an API token is {TOKEN_PREFIX!r} followed by 43 base64url characters",
                         code="token-malformed")
    try:
        secret = base64.urlsafe_b64decode(unverified_token.removeprefix(TOKEN_PREFIX) + "=")
    except (binascii.Error, ValueError):
        raise TokenError("the API token is not valid base64url", code="token-malformed") from None
    return hashlib.sha256(secret).hexdigest()


def _exists(name: str) -> TokenError:
    return TokenError(f"an API token named {name!r} exists; revoke it or choose another name",
                      code="token-exists")


def _as_utc(value: datetime) -> datetime:
    # SQLite returns stored times without a time zone; they were stored in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
