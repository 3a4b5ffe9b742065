"""``edgetrust evidence ima``."""

from __future__ import annotations

import click


@click.command("ima")
def ima_command() -> None:
    """Not implemented yet."""
    raise click.ClickException("edgetrust evidence ima is not implemented yet")
