"""``edgetrust policy``: create, import, sign, verify and check runtime (IMA) policies.

Exit status: 0 on success, 1 when a signature does not verify or an IMA measurement list
fails the policy, 2 when an input file or option cannot be read or parsed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from edgetrust.commands.policy_measured_boot import measured_boot_command
from edgetrust.commands.policy_store import store_group
from evidence.errors import EvidenceError
from evidence.eventlog import parse_event_log
from evidence.findings import Finding, is_failure
from evidence.ima import check_template_hashes, parse_measurement_list
from policies import dsse
from policies.errors import DSSE_SIGNATURE_INVALID, PolicyError
from policies.generate import (
    FILE_DIGEST_ALGORITHMS,
    GeneratedPolicy,
    policy_from_directory,
    policy_from_donkeycar,
    policy_from_measurement_list,
)
from policies.measured_boot import evaluate_measured_boot, parse_measured_boot_policy
from policies.runtime import evaluate, import_allowlist, load_runtime_policy_file

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DIRECTORY = click.Path(exists=True, file_okay=False, path_type=Path)
_OUTPUT = click.Path(dir_okay=False, writable=True, path_type=Path)


class InputError(click.ClickException):
    """An input file or option that cannot be read or parsed (exit status 2)."""

    exit_code = 2


class CheckFailed(click.ClickException):
    """A signature that does not verify (exit status 1)."""

    exit_code = 1


@click.group("policy")
def policy_group() -> None:
    """Create, import, sign, verify and check runtime (IMA) policies."""


@policy_group.group("create")
def create_group() -> None:
    """Create a policy from files or measurements."""


@create_group.command("runtime")
@click.option("--from-dir", "from_dir", type=_DIRECTORY, help="Hash every regular file under this directory.")
@click.option(
    "--from-ima-list",
    "from_ima_list",
    type=_FILE,
    help="Allow every file, key and buffer of this IMA measurement list "
    "(ASCII or binary), boot_aggregate included.",
)
@click.option(
    "--donkeycar-car",
    "donkeycar_car",
    type=_DIRECTORY,
    help="A DonkeyCar car directory: its Python files, configuration and models, "
    "with the files of the installed donkeycar package.",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="REGEX",
    help="Python regular expression matched from the start of a device path; "
    "matching files are not hashed and the policy ignores them. Repeatable.",
)
@click.option(
    "--hash",
    "algorithm",
    type=click.Choice(FILE_DIGEST_ALGORITHMS),
    default="sha256",
    show_default=True,
    help="File digest algorithm, as the device's IMA uses (ima_hash=).",
)
@click.option(
    "--prefix", metavar="PATH", help="Device path of the directory given (default: its absolute path here)."
)
@click.option(
    "--root", "as_root", is_flag=True, help="The directory is a staged root file system: same as --prefix /."
)
@click.option("-o", "--output", type=_OUTPUT, help="Write the policy here instead of stdout.")
def create_runtime_command(
    from_dir: Path | None,
    from_ima_list: Path | None,
    donkeycar_car: Path | None,
    excludes: tuple[str, ...],
    algorithm: str,
    prefix: str | None,
    as_root: bool,
    output: Path | None,
) -> None:
    """Create a runtime policy in Keylime's format version 1."""
    sources = [source for source in (from_dir, from_ima_list, donkeycar_car) if source is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --from-dir, --from-ima-list and --donkeycar-car")
    if as_root and prefix is not None:
        raise click.UsageError("--root and --prefix exclude each other")
    if as_root:
        prefix = "/"

    try:
        if from_dir is not None:
            generated = policy_from_directory(from_dir, prefix=prefix, algorithm=algorithm, excludes=excludes)
        elif donkeycar_car is not None:
            generated = policy_from_donkeycar(
                donkeycar_car, prefix=prefix, algorithm=algorithm, excludes=excludes
            )
        else:
            assert from_ima_list is not None
            generated = _policy_from_list_file(from_ima_list, excludes)
    except PolicyError as exc:
        raise InputError(str(exc)) from None

    _report_skipped(generated)
    _write_json(generated.document, output)


@policy_group.command("import-allowlist")
@click.argument("allowlist", type=_FILE)
@click.option(
    "--excludes", "excludes_path", type=_FILE, help="Exclude list: one Python regular expression per line."
)
@click.option("-o", "--output", type=_OUTPUT, help="Write the policy here instead of stdout.")
def import_allowlist_command(allowlist: Path, excludes_path: Path | None, output: Path | None) -> None:
    """Convert a legacy Keylime allowlist (and exclude list) into a runtime policy."""
    excludes = _read_text(excludes_path) if excludes_path is not None else None
    try:
        document = import_allowlist(_read_text(allowlist), excludes=excludes)
    except PolicyError as exc:
        raise InputError(f"{allowlist}: {exc}") from None
    _write_json(document, output)


@policy_group.command("sign")
@click.argument("policy", type=_FILE)
@click.option("--key", "key_path", type=_FILE, required=True, help="ECDSA private key (PEM).")
@click.option("-o", "--output", type=_OUTPUT, required=True, help="Write the DSSE envelope here.")
def sign_command(policy: Path, key_path: Path, output: Path) -> None:
    """Wrap a runtime policy in a DSSE envelope signed with an ECDSA key."""
    payload = _read_bytes(policy)
    try:
        # Refuse to sign something that is not a valid runtime policy.
        load_runtime_policy_file(payload)
        envelope = dsse.sign_envelope(payload, _read_bytes(key_path))
    except PolicyError as exc:
        raise InputError(str(exc)) from None
    output.write_text(envelope + "\n")


@policy_group.command("verify")
@click.argument("envelope", type=_FILE)
@click.option("--key", "key_path", type=_FILE, required=True, help="ECDSA public key (PEM).")
def verify_command(envelope: Path, key_path: Path) -> None:
    """Verify a DSSE-signed runtime policy and check that its payload is a valid policy."""
    try:
        policy = load_runtime_policy_file(_read_bytes(envelope), public_key_pem=_read_bytes(key_path))
    except PolicyError as exc:
        if exc.code == DSSE_SIGNATURE_INVALID:
            raise CheckFailed(str(exc)) from None
        raise InputError(str(exc)) from None
    click.echo(f"signature verified; runtime policy {policy.content_hash} with {len(policy.digests)} paths")


@policy_group.command("check")
@click.option("--policy", "policy_path", type=_FILE, required=True, help="Runtime policy (JSON).")
@click.option(
    "--ima-list", "ima_list_path", type=_FILE, required=True, help="IMA measurement list, ASCII or binary."
)
@click.option(
    "--eventlog",
    "eventlog_path",
    type=_FILE,
    help="UEFI event log (binary_bios_measurements) to check against --mb-policy.",
)
@click.option(
    "--mb-policy",
    "mb_policy_path",
    type=_FILE,
    help="Measured-boot policy (Keylime's reference state JSON) for --eventlog.",
)
@click.option(
    "--key", "key_path", type=_FILE, help="ECDSA public key (PEM) that must have signed the policy (DSSE)."
)
@click.option("--allow-violations", is_flag=True, help="Report IMA violations as warnings only.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check_command(
    policy_path: Path,
    ima_list_path: Path,
    eventlog_path: Path | None,
    mb_policy_path: Path | None,
    key_path: Path | None,
    allow_violations: bool,
    as_json: bool,
) -> None:
    """Check an IMA measurement list (and a UEFI event log) against policies; print the findings.

    The files are checked as the verifier checks them after verifying a quote. Without a
    quote, nothing proves that they match the device's TPM.
    """
    if (eventlog_path is None) != (mb_policy_path is None):
        raise click.UsageError("--eventlog and --mb-policy go together")

    key = _read_bytes(key_path) if key_path is not None else None
    try:
        policy = load_runtime_policy_file(_read_bytes(policy_path), public_key_pem=key)
    except PolicyError as exc:
        if exc.code == DSSE_SIGNATURE_INVALID:
            raise CheckFailed(f"{policy_path}: {exc}") from None
        raise InputError(f"{policy_path}: {exc}") from None

    try:
        measurement_list = parse_measurement_list(
            _read_bytes(ima_list_path), template_hash_algorithm=policy.log_hash_alg
        )
    except EvidenceError as exc:
        raise InputError(f"{ima_list_path}: {exc.message}") from None

    findings = check_template_hashes(measurement_list.entries, measurement_list.template_hash_algorithm)
    findings += evaluate(measurement_list.entries, policy, allow_violations=allow_violations)
    if eventlog_path is not None and mb_policy_path is not None:
        findings += _check_event_log(eventlog_path, mb_policy_path)
    _print_findings(findings, len(measurement_list), as_json)
    if is_failure(findings):
        raise SystemExit(1)


def _check_event_log(eventlog_path: Path, mb_policy_path: Path) -> list[Finding]:
    try:
        mb_policy = parse_measured_boot_policy(_read_bytes(mb_policy_path))
    except PolicyError as exc:
        raise InputError(f"{mb_policy_path}: {exc}") from None
    try:
        event_log = parse_event_log(_read_bytes(eventlog_path))
    except EvidenceError as exc:
        raise InputError(f"{eventlog_path}: {exc.message}") from None
    return evaluate_measured_boot(mb_policy, event_log)


def _policy_from_list_file(path: Path, excludes: Sequence[str]) -> GeneratedPolicy:
    try:
        measurement_list = parse_measurement_list(_read_bytes(path))
    except EvidenceError as exc:
        raise InputError(f"{path}: {exc.message}") from None
    generated = policy_from_measurement_list(
        measurement_list.entries, template_hash_algorithm=measurement_list.template_hash_algorithm
    )
    if excludes:
        document = dict(generated.document, excludes=list(excludes))
        generated.document = load_runtime_policy_file(json.dumps(document).encode()).to_document()
    return generated


def _print_findings(findings: list[Finding], entry_count: int, as_json: bool) -> None:
    if as_json:
        result = {
            "passed": not is_failure(findings),
            "entries": entry_count,
            "findings": [finding.to_json() for finding in findings],
        }
        click.echo(json.dumps(result, indent=2))
        return
    for finding in findings:
        click.echo(f"{finding.severity.name.lower()}: {finding.code}: {finding.message}")
    verdict = "fails" if is_failure(findings) else "passes"
    click.echo(f"{entry_count} entries, {len(findings)} findings: the list {verdict} the policy")


def _report_skipped(generated: GeneratedPolicy) -> None:
    for path, reason in generated.skipped:
        click.echo(f"warning: skipped {path}: {reason}", err=True)


def _write_json(document: dict[str, Any], output: Path | None) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None


create_group.add_command(measured_boot_command)
policy_group.add_command(store_group)
