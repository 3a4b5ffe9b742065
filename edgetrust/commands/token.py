"""``edgetrust token``: create, list and revoke API tokens.

The commands work on the database named by the settings, not over HTTP, so that the first
admin token can be made before any token exists. ``create`` prints the token once, on
standard output; only its SHA-256 digest is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.commands.common import config_option, settings_from
from edgetrust.commands.server import prepare_database
from edgetrust.db import make_engine, make_session_factory, transaction
from verifier.tokens import ApiToken, Scope, TokenError, create_token, list_tokens, revoke_token


@click.group("token")
def token_group() -> None:
    """Create, list and revoke API tokens."""


@token_group.command("create")
@click.option("--name", required=True, help="Unique name of the token, such as the client using it.")
@click.option("--scope", required=True, type=click.Choice([scope.value for scope in Scope]),
              help="read: verdicts, trust API, admission and gate; admin: every route.")
@click.option("--expires-in", "expires_in_days", type=click.FloatRange(min=0, min_open=True),
              help="Days until the token expires (default: never).")
@config_option
def create_command(name: str, scope: str, expires_in_days: float | None, config_file: Path | None) -> None:
    """Create a token and print it; it cannot be shown again."""
    now = datetime.now(UTC)
    expires_at = None if expires_in_days is None else now + timedelta(days=expires_in_days)

    try:
        with transaction(_sessions(config_file)) as session:
            token, text = create_token(session, name, Scope(scope), now=now, expires_at=expires_at)
    except TokenError as error:
        raise click.ClickException(error.message) from None

    until = "never expires" if token.expires_at is None else f"expires at {token.expires_at.isoformat()}"
    click.echo(f"created API token {token.name!r} with scope {token.scope}; it {until}. "
               "Store it now: it cannot be shown again.", err=True)
    click.echo(text)


@token_group.command("list")
@config_option
def list_command(config_file: Path | None) -> None:
    """List the tokens with their scope, times and state; never the tokens themselves."""
    now = datetime.now(UTC)
    with _sessions(config_file)() as session:
        tokens = list_tokens(session)
    click.echo(f"{'NAME':<32} {'SCOPE':<6} {'STATE':<8} {'CREATED':<26} EXPIRES")
    for token in tokens:
        expires = "-" if token.expires_at is None else _utc(token.expires_at).isoformat()
        click.echo(f"{token.name:<32} {token.scope:<6} {_state(token, now):<8} "
                   f"{_utc(token.created_at).isoformat():<26} {expires}")


@token_group.command("revoke")
@click.argument("name")
@config_option
def revoke_command(name: str, config_file: Path | None) -> None:
    """Revoke the token NAME; requests with it get 401 from then on."""
    try:
        with transaction(_sessions(config_file)) as session:
            token = revoke_token(session, name, now=datetime.now(UTC))
    except TokenError as error:
        raise click.ClickException(error.message) from None
    revoked_at = _utc(token.revoked_at or datetime.now(UTC))
    click.echo(f"revoked API token {token.name!r} at {revoked_at.isoformat()}")


def _sessions(config_file: Path | None) -> sessionmaker[Session]:
    settings = settings_from(config_file)
    engine = make_engine(settings.effective_database_url)
    prepare_database(engine)
    return make_session_factory(engine)


def _state(token: ApiToken, now: datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and _utc(token.expires_at) <= now:
        return "expired"
    return "active"


def _utc(value: datetime) -> datetime:
    # SQLite returns stored times without a time zone; they were stored in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
