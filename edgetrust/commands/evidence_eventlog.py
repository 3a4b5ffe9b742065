"""``edgetrust evidence eventlog``."""

from __future__ import annotations

import click


@click.command("eventlog")
def eventlog_command() -> None:
    """Not implemented yet."""
    raise click.ClickException("edgetrust evidence eventlog is not implemented yet")
