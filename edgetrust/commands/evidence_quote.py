"""``edgetrust evidence quote``: verify a TPM quote from files, as the verifier would.

Exit status: 0 when the quote is valid, 1 when verification found a failure, 2 when an
input file cannot be read or parsed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from evidence.errors import EvidenceError
from evidence.quote import AkPublicKey, QuoteResult, verify_quote
from evidence.tpm import (
    Attest,
    PcrSelection,
    PublicArea,
    ak_qualified_name,
    parse_pcr_file,
    parse_tpm2b_public,
    parse_tpms_attest,
    parse_tpmt_public,
    parse_tpmt_signature,
)

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class InputError(click.ClickException):
    """An input file or option that cannot be read or parsed (exit status 2)."""

    exit_code = 2


@click.command("quote")
@click.option("--ak-public", "ak_path", type=_FILE, required=True,
              help="AK public key: TPM2B_PUBLIC (tpm2_createak -u), bare TPMT_PUBLIC or PEM.")
@click.option("--attest", "attest_path", type=_FILE, required=True,
              help="TPMS_ATTEST of the quote (tpm2_quote -m).")
@click.option("--signature", "signature_path", type=_FILE, required=True,
              help="TPMT_SIGNATURE of the quote (tpm2_quote -s).")
@click.option("--nonce", "nonce_hex", metavar="HEX",
              help="Qualifying data sent with the quote request, in hex. "
                   "Without it the quote may be a replay.")
@click.option("--pcr-file", "pcr_path", type=_FILE,
              help="PCR values in the tpm2-tools layout (tpm2_quote -o).")
@click.option("--pcr-selection", "selection_text", metavar="SELECTION",
              help="PCR selection requested, e.g. sha256:0,1,2,10.")
@click.option("--ek-public", "ek_path", type=_FILE,
              help="EK TPM2B_PUBLIC; enables the qualifiedSigner check for an AK under the EK.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quote_command(
    ak_path: Path,
    attest_path: Path,
    signature_path: Path,
    nonce_hex: str | None,
    pcr_path: Path | None,
    selection_text: str | None,
    ek_path: Path | None,
    as_json: bool,
) -> None:
    """Verify a TPM quote against an AK and print the findings."""
    ak, ak_format = _load_ak(ak_path)
    unverified_attest = _read(attest_path, "--attest")
    unverified_signature = _read(signature_path, "--signature")
    _parse_or_fail(parse_tpms_attest, unverified_attest, "--attest", attest_path)
    signature = _parse_or_fail(
        parse_tpmt_signature, unverified_signature, "--signature", signature_path
    )
    nonce = _parse_nonce(nonce_hex)
    pcr_values = (
        _parse_or_fail(parse_pcr_file, _read(pcr_path, "--pcr-file"), "--pcr-file", pcr_path).values
        if pcr_path is not None
        else None
    )
    selection = _parse_selection(selection_text)
    qualified_name = _qualified_name(ek_path, ak)

    result = verify_quote(
        ak, unverified_attest, unverified_signature, nonce=nonce, pcr_selection=selection,
        pcr_values=pcr_values, ak_qualified_name=qualified_name,
    )

    report = _report(result, ak, ak_format, signature.sig_alg.name, signature.hash_alg.name)
    if ak_format == "pem":
        report["notes"] = [
            "AK given as PEM: the signature scheme and qualifiedSigner checks, which need "
            "the TPM public area, were skipped"
        ]
    click.echo(json.dumps(report, indent=2) if as_json else _summary(report))
    if not result.valid:
        raise SystemExit(1)


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"{option} {path}: cannot read: {error.strerror}") from None


def _parse_or_fail(parse: Any, data: bytes, option: str, path: Path) -> Any:
    try:
        return parse(data)
    except EvidenceError as error:
        raise InputError(f"{option} {path}: {error.message}") from None


def _load_ak(path: Path) -> tuple[PublicArea | AkPublicKey, str]:
    """Load the AK as a TPM2B_PUBLIC, a bare TPMT_PUBLIC or a PEM public key."""
    data = _read(path, "--ak-public")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(data)
        except ValueError as error:
            raise InputError(f"--ak-public {path}: invalid PEM public key: {error}") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise InputError(f"--ak-public {path}: PEM key is not RSA or ECC")
        return key, "pem"
    if len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2:
        return _parse_or_fail(parse_tpm2b_public, data, "--ak-public", path), "tpm2b_public"
    return _parse_or_fail(parse_tpmt_public, data, "--ak-public", path), "tpmt_public"


def _parse_nonce(nonce_hex: str | None) -> bytes | None:
    if nonce_hex is None:
        return None
    try:
        return bytes.fromhex(nonce_hex)
    except ValueError:
        raise InputError(f"--nonce {nonce_hex!r}: not an even number of hex digits") from None


def _parse_selection(text: str | None) -> PcrSelection | None:
    if text is None:
        return None
    try:
        return PcrSelection.from_text(text)
    except EvidenceError as error:
        raise InputError(f"--pcr-selection: {error.message}") from None


def _qualified_name(ek_path: Path | None, ak: PublicArea | AkPublicKey) -> bytes | None:
    if ek_path is None or not isinstance(ak, PublicArea):
        return None
    ek = _parse_or_fail(parse_tpm2b_public, _read(ek_path, "--ek-public"), "--ek-public", ek_path)
    return ak_qualified_name(ek, ak)


def _report(
    result: QuoteResult, ak: PublicArea | AkPublicKey, ak_format: str, sig_alg: str,
    hash_alg: str,
) -> dict[str, Any]:
    return {
        "valid": result.valid,
        "findings": [finding.to_json() for finding in result.findings],
        "ak": {
            "format": ak_format,
            "name": ak.name.hex() if isinstance(ak, PublicArea) else None,
            "algorithm": str(ak.signing_algorithm) if isinstance(ak, PublicArea) else None,
        },
        "signature": {"sig_alg": sig_alg.lower(), "hash_alg": hash_alg.lower()},
        "attest": _attest_json(result.attest) if result.attest is not None else None,
        "pcr_values": {
            bank.name.lower(): {str(index): value.hex() for index, value in values.items()}
            for bank, values in result.pcr_values.items()
        },
    }


def _attest_json(attest: Attest) -> dict[str, Any]:
    return {
        "magic": f"0x{attest.magic:08x}",
        "type": attest.type.name,
        "qualified_signer": attest.qualified_signer.hex(),
        "extra_data": attest.extra_data.hex(),
        "clock": attest.clock_info.clock,
        "reset_count": attest.clock_info.reset_count,
        "restart_count": attest.clock_info.restart_count,
        "safe": attest.clock_info.safe,
        "firmware_version": f"0x{attest.firmware_version:016x}",
        "pcr_selection": str(attest.pcr_selection),
        "pcr_digest": attest.pcr_digest.hex(),
    }


def _summary(report: dict[str, Any]) -> str:
    lines = [f"quote: {'valid' if report['valid'] else 'INVALID'}"]
    ak = report["ak"]
    lines.append(f"AK: {ak['format']}, {ak['algorithm'] or 'algorithm unknown'}, "
                 f"name {ak['name'] or 'unknown'}")
    signature = report["signature"]
    lines.append(f"signature: {signature['sig_alg']}-{signature['hash_alg']}")
    attest = report["attest"]
    if attest is not None:
        lines += [
            f"type: {attest['type']}, magic {attest['magic']}",
            f"extraData (nonce): {attest['extra_data'] or '(empty)'}",
            f"clock: {attest['clock']} ms, resetCount {attest['reset_count']}, "
            f"restartCount {attest['restart_count']}, safe {attest['safe']}",
            f"PCR selection: {attest['pcr_selection']}, pcrDigest {attest['pcr_digest']}",
        ]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    lines.append("findings:" if report["findings"] else "findings: none")
    lines += [
        f"  {finding['severity'].upper()} {finding['code']}: {finding['message']}"
        for finding in report["findings"]
    ]
    return "\n".join(lines)
