"""The ``edgetrust`` command."""

from __future__ import annotations

import click

from edgetrust.commands.evidence import evidence_group


@click.group()
def main() -> None:
    """edgetrust: remote attestation for edge-AI fleets."""


main.add_command(evidence_group)
