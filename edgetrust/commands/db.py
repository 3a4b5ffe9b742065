"""``edgetrust db prune``: delete rows older than the retention settings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from edgetrust.commands.common import config_option, settings_from
from edgetrust.db import SchemaError, check_schema, make_engine
from edgetrust.settings import SettingsError


@click.command("prune")
@config_option
@click.option("--dry-run", is_flag=True,
              help="Count the rows that would be deleted, and delete nothing.")
def prune_command(config_file: Path | None, dry_run: bool) -> None:
    """Delete attestations and finished webhook deliveries older than their retention.

    The settings attestation_retention and outbox_retention set the ages. Each device's latest
    attestation, the attestations its current verdict depends on and pending deliveries are kept.
    """
    settings = settings_from(config_file)

    from verifier.retention import RetentionOptions, prune

    try:
        options = RetentionOptions.from_settings(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc

    engine = make_engine(settings.effective_database_url)
    try:
        check_schema(engine)
        result = prune(engine, options, now=datetime.now(UTC), dry_run=dry_run)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    except SQLAlchemyError as exc:
        url = engine.url.render_as_string(hide_password=True)
        detail = exc.args[0] if exc.args else exc
        raise click.ClickException(f"pruning the database {url} failed: {type(exc).__name__}: "
                                   f"{detail}") from exc
    finally:
        engine.dispose()

    if result.locked_out:
        raise click.ClickException("another process (a poller) is pruning the database now; run "
                                   "the command again when its pass has finished")

    verb = "would delete" if dry_run else "deleted"
    click.echo(_line("attestations", verb, result.attestations, result.attestation_cutoff,
                     "finished", "attestation_retention"))
    click.echo(_line("webhook deliveries", verb, result.webhook_deliveries, result.outbox_cutoff,
                     "delivered or failed", "outbox_retention"))


def _line(table: str, verb: str, count: int, cutoff: datetime | None, event: str,
          setting: str) -> str:
    if cutoff is None:
        return f"{table}: none deleted, {setting} is 0 (keep every row)"
    return f"{table}: {verb} {count} {event} before {cutoff.isoformat(timespec='seconds')}"
