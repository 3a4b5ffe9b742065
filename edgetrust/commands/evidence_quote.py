"""``edgetrust evidence quote``."""

from __future__ import annotations

import click


@click.command("quote")
def quote_command() -> None:
    """Not implemented yet."""
    raise click.ClickException("edgetrust evidence quote is not implemented yet")
