"""``edgetrust evidence``: inspect evidence files the way the verifier reads them."""

from __future__ import annotations

import click

from edgetrust.commands.evidence_eventlog import eventlog_command
from edgetrust.commands.evidence_ima import ima_command
from edgetrust.commands.evidence_quote import quote_command


@click.group("evidence")
def evidence_group() -> None:
    """Parse and check evidence files: UEFI event logs, IMA lists, TPM quotes."""


evidence_group.add_command(eventlog_command)
evidence_group.add_command(ima_command)
evidence_group.add_command(quote_command)
