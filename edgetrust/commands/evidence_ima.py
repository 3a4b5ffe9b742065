"""``edgetrust evidence ima``: parse an IMA measurement list and print its replayed PCR 10."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click

from evidence.errors import EvidenceError
from evidence.findings import Finding, is_failure
from evidence.ima import (
    BANK_DIGEST_SIZES,
    ImaMeasurementList,
    check_buffer_digests,
    check_template_hashes,
    describe_entries,
    parse_measurement_list,
    replay_pcr10,
    verify_measurement_list,
)

_BANKS = list(BANK_DIGEST_SIZES)


@click.command("ima")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--bank",
    "banks",
    type=click.Choice(_BANKS),
    multiple=True,
    default=("sha256",),
    show_default=True,
    help="PCR bank to replay PCR 10 into; repeat the option for several banks.",
)
@click.option(
    "--template-hash-algorithm",
    type=click.Choice(_BANKS),
    default=None,
    help="Algorithm of the template-hash column. Default: inferred from the column's length in "
    "the ASCII form, sha1 in the binary form.",
)
@click.option(
    "--expected-pcr10",
    metavar="HEX",
    default=None,
    help="Quoted PCR 10 value of the (single) --bank: fail unless the list, or a prefix of "
    "it, replays to this value.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result and all entries as JSON.")
def ima_command(
    file: Path,
    banks: tuple[str, ...],
    template_hash_algorithm: str | None,
    expected_pcr10: str | None,
    as_json: bool,
) -> None:
    """Parse the IMA measurement list FILE, ASCII or binary, and replay PCR 10.

    Without --json, prints the entry count, the templates, PCR 10 of every --bank and the
    findings. With --json, prints {"entries": N, "pcrs": {BANK: {"10": "hex"}}, "findings":
    [...], "measurements": [...]}. Exits 1 when a finding is an error.
    """
    unverified_list = _load(file, template_hash_algorithm)
    pcrs = {bank: {"10": replay_pcr10(unverified_list, bank).hex()} for bank in dict.fromkeys(banks)}
    findings = _findings(unverified_list, banks, expected_pcr10)

    if as_json:
        click.echo(json.dumps(_to_json(unverified_list, pcrs, findings), indent=2))
    else:
        click.echo(_summary(file, unverified_list, pcrs, findings))
    if is_failure(findings):
        raise click.exceptions.Exit(1)


def _load(file: Path, template_hash_algorithm: str | None) -> ImaMeasurementList:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read IMA measurement list {file}: {exc.strerror or exc}") from exc
    if not data:
        raise click.ClickException(f"{file}: IMA measurement list is empty")
    try:
        return parse_measurement_list(data, template_hash_algorithm=template_hash_algorithm)
    except EvidenceError as exc:
        raise click.ClickException(f"{file}: {exc.message} [{exc.code}]") from exc


def _findings(
    unverified_list: ImaMeasurementList, banks: tuple[str, ...], expected_pcr10: str | None
) -> list[Finding]:
    if expected_pcr10 is None:
        entries = unverified_list.entries
        findings = check_template_hashes(entries, unverified_list.template_hash_algorithm)
        return findings + check_buffer_digests(entries) + describe_entries(entries)

    if len(set(banks)) != 1:
        raise click.UsageError("--expected-pcr10 needs exactly one --bank")
    try:
        quoted = bytes.fromhex(expected_pcr10)
    except ValueError:
        raise click.BadParameter(
            f"{expected_pcr10!r} is not hexadecimal", param_hint="--expected-pcr10"
        ) from None
    result = verify_measurement_list(unverified_list, {banks[0]: quoted})
    return list(result.findings)


def _to_json(
    unverified_list: ImaMeasurementList, pcrs: dict[str, dict[str, str]], findings: list[Finding]
) -> dict[str, Any]:
    return {
        "entries": len(unverified_list),
        "form": unverified_list.form,
        "template_hash_algorithm": unverified_list.template_hash_algorithm,
        "pcrs": pcrs,
        "findings": [finding.to_json() for finding in findings],
        "measurements": [
            {
                "index": entry.index,
                "pcr": entry.pcr,
                "template": entry.template,
                "path": entry.path,
                "digest": entry.digest_text,
            }
            for entry in unverified_list
        ],
    }


def _summary(
    file: Path,
    unverified_list: ImaMeasurementList,
    pcrs: dict[str, dict[str, str]],
    findings: list[Finding],
) -> str:
    templates = Counter(entry.template for entry in unverified_list)
    lines = [
        f"IMA measurement list: {file}",
        f"Form: {unverified_list.form}, template hash {unverified_list.template_hash_algorithm}",
        f"Entries: {len(unverified_list)} "
        f"({', '.join(f'{name} {count}' for name, count in sorted(templates.items()))})",
        "PCR 10:",
    ]
    lines.extend(f"  {bank}: {values['10']}" for bank, values in pcrs.items())
    if not findings:
        lines.append("Findings: none")
    for finding in findings:
        lines.append(f"{finding.severity.name.lower()}: {finding.code}: {finding.message}")
    return "\n".join(lines)
