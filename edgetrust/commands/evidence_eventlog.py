"""``edgetrust evidence eventlog``: parse a UEFI event log and print its replayed PCRs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from evidence.errors import ParseError
from evidence.eventlog import (
    EventLog,
    check_event_data,
    parse_event_log,
    read_event_log,
    replay_event_log,
)
from evidence.findings import Finding


@click.command("eventlog")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print PCRs and events as JSON.")
def eventlog_command(file: Path, as_json: bool) -> None:
    """Parse the UEFI event log FILE (binary_bios_measurements) and replay its PCRs.

    Without --json, prints the event count, the PCR banks and the replayed PCR values.
    With --json, prints {"pcrs": {BANK: {"INDEX": "hex"}}, "events": [...]}.
    """
    log = _load(file)
    pcrs = _pcrs_to_json(replay_event_log(log))

    if as_json:
        click.echo(json.dumps({"pcrs": pcrs, "events": log.to_json()}, indent=2))
        return

    click.echo(_summary(file, log, pcrs, check_event_data(log)))


def _load(file: Path) -> EventLog:
    try:
        raw = read_event_log(file)
    except OSError as exc:
        raise click.ClickException(f"cannot read event log {file}: {exc.strerror or exc}") from exc
    try:
        return parse_event_log(raw)
    except ParseError as exc:
        raise click.ClickException(f"{file}: {exc.message} [{exc.code}]") from exc


def _pcrs_to_json(replayed: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {
        bank: {str(index): values[index].hex() for index in sorted(values)}
        for bank, values in replayed.items()
    }


def _summary(
    file: Path, log: EventLog, pcrs: dict[str, dict[str, str]], findings: list[Finding]
) -> str:
    log_format = "crypto-agile (Spec ID Event03)" if log.crypto_agile else "SHA-1 (no Spec ID event)"
    lines = [
        f"Event log: {file}",
        f"Format: {log_format}",
        f"Events: {len(log.events)}",
        f"Banks: {', '.join(log.bank_names)}",
    ]
    if log.startup_locality is not None:
        lines.append(f"StartupLocality: {log.startup_locality}")
    lines.extend(_finding_lines(findings))
    lines.append("Replayed PCRs:")
    for bank, values in pcrs.items():
        lines.append(f"  {bank}:")
        lines.extend(f"    {index:>2}: {value}" for index, value in values.items())
    skipped = [name for name in log.bank_names if name not in pcrs]
    if skipped:
        lines.append(f"Not replayed (hash algorithm not available): {', '.join(skipped)}")
    return "\n".join(lines)


def _finding_lines(findings: list[Finding]) -> list[Any]:
    return [
        f"{finding.severity.name.lower()}: {finding.code}: {finding.message}"
        for finding in findings
    ]
