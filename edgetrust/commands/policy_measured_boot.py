"""``edgetrust policy create measured-boot``: a measured-boot policy from a known-good event log.

Exit status: 0 on success, 2 when the event log cannot be read or parsed or lacks a part the
policy needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from evidence.errors import EvidenceError
from evidence.eventlog import parse_event_log, read_event_log
from policies.errors import PolicyError
from policies.measured_boot_generate import create_measured_boot_policy


class InputError(click.ClickException):
    """An event log that cannot be read, parsed or turned into a policy (exit status 2)."""

    exit_code = 2


@click.command("measured-boot")
@click.option(
    "--eventlog", "eventlog_path", required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Binary UEFI event log of a known-good boot, such as "
    "/sys/kernel/security/tpm0/binary_bios_measurements.",
)
@click.option(
    "--without-secureboot", is_flag=True,
    help="Create a policy for a boot without Secure Boot (checks the kernel file that GRUB "
    "measured instead of shim's verification).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the policy here instead of stdout.")
def measured_boot_command(eventlog_path: Path, without_secureboot: bool, output: Path | None) -> None:
    """Create a measured-boot policy (Keylime's reference-state format) from an event log."""
    try:
        event_log = parse_event_log(read_event_log(eventlog_path))
    except OSError as error:
        raise InputError(f"cannot read {eventlog_path}: {error.strerror}") from None
    except EvidenceError as error:
        raise InputError(f"{eventlog_path}: {error.message}") from None

    if not event_log.secure_boot_enabled and not without_secureboot:
        raise InputError(f"{eventlog_path}: the event log shows Secure Boot disabled; pass "
                         "--without-secureboot to create a policy for a boot without it")
    try:
        document = create_measured_boot_policy(event_log, allow_without_secureboot=without_secureboot)
    except PolicyError as error:
        raise InputError(f"{eventlog_path}: {error.message}") from None

    text = json.dumps(document, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
