"""Tests for ``edgetrust evidence quote`` with files written by tpm2-tools."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgetrust.cli import main
from tests.support.swtpm import SwtpmProcess, require_tpm2_tools

pytestmark = pytest.mark.swtpm

SELECTION = "sha256:0,1,2,3,10,16"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """EK, AK (TPM2B_PUBLIC and PEM) and a quote made with tpm2-tools on swtpm."""
    require_tpm2_tools()
    work = tmp_path_factory.mktemp("cli-quote")
    with SwtpmProcess(work / "tpm") as tpm:
        tpm.run_tool("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub", cwd=work)
        tpm.run_tool(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
            "-s", "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv", cwd=work,
        )
        tpm.run_tool("tpm2_readpublic", "-c", "ak.ctx", "-f", "pem", "-o", "ak.pem", cwd=work)
        tpm.run_tool("tpm2_pcrextend", f"10:sha256={hashlib.sha256(b'x').hexdigest()}", cwd=work)
        nonce = os.urandom(20).hex()
        (work / "nonce.hex").write_text(nonce)
        tpm.run_tool(
            "tpm2_quote", "-c", "ak.ctx", "-l", SELECTION, "-q", nonce, "-m", "quote.msg",
            "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256", cwd=work,
        )
    (work / "ak.tpmt").write_bytes((work / "ak.pub").read_bytes()[2:])
    yield work


def run(files: Path, *options: str, ak: str = "ak.pub") -> Result:
    arguments = [
        "evidence", "quote",
        "--ak-public", str(files / ak),
        "--attest", str(files / "quote.msg"),
        "--signature", str(files / "quote.sig"),
        *options,
    ]
    return CliRunner().invoke(main, arguments)


def full_options(files: Path) -> list[str]:
    return [
        "--nonce", (files / "nonce.hex").read_text(),
        "--pcr-file", str(files / "quote.pcrs"),
        "--pcr-selection", SELECTION,
        "--ek-public", str(files / "ek.pub"),
    ]


def test_cli_quote_valid_json(files: Path) -> None:
    result = run(files, *full_options(files), "--json")

    report = json.loads(result.output)
    assert result.exit_code == 0, result.output
    assert report["valid"] is True
    assert report["findings"] == []
    assert report["ak"]["format"] == "tpm2b_public"
    assert report["ak"]["name"] == (files / "ak.name").read_bytes().hex()
    assert report["signature"] == {"sig_alg": "ecdsa", "hash_alg": "sha256"}
    assert report["attest"]["type"] == "ATTEST_QUOTE"
    assert report["attest"]["extra_data"] == (files / "nonce.hex").read_text()
    assert report["attest"]["pcr_selection"] == SELECTION
    assert set(report["pcr_values"]["sha256"]) == {"0", "1", "2", "3", "10", "16"}


def test_cli_quote_readable_summary(files: Path) -> None:
    result = run(files, *full_options(files))

    assert result.exit_code == 0, result.output
    assert result.output.startswith("quote: valid\n")
    assert f"PCR selection: {SELECTION}" in result.output
    assert "findings: none" in result.output


def test_cli_quote_wrong_nonce_fails(files: Path) -> None:
    options = full_options(files)
    options[1] = "00" * 20

    result = run(files, *options, "--json")

    report = json.loads(result.output)
    assert result.exit_code == 1
    assert report["valid"] is False
    assert [finding["code"] for finding in report["findings"]] == ["quote-nonce-mismatch"]


def test_cli_quote_selection_mismatch_in_summary(files: Path) -> None:
    options = full_options(files)
    options[5] = "sha256:10"

    result = run(files, *options)

    assert result.exit_code == 1
    assert result.output.startswith("quote: INVALID\n")
    assert "ERROR quote-pcr-selection-mismatch" in result.output


def test_cli_quote_bare_tpmt_public(files: Path) -> None:
    result = run(files, *full_options(files), "--json", ak="ak.tpmt")

    report = json.loads(result.output)
    assert result.exit_code == 0, result.output
    assert report["ak"]["format"] == "tpmt_public"
    assert report["findings"] == []


def test_cli_quote_pem_skips_name_checks(files: Path) -> None:
    result = run(files, *full_options(files), "--json", ak="ak.pem")

    report = json.loads(result.output)
    assert result.exit_code == 0, result.output
    assert report["ak"] == {"format": "pem", "name": None, "algorithm": None}
    assert [finding["code"] for finding in report["findings"]] == [
        "quote-qualified-signer-not-checked"
    ]
    assert "skipped" in report["notes"][0]


def test_cli_quote_without_optional_inputs_warns(files: Path) -> None:
    result = run(files, "--json")

    report = json.loads(result.output)
    assert result.exit_code == 0
    assert [finding["severity"] for finding in report["findings"]] == ["warning"] * 4


@pytest.mark.parametrize(
    ("replace", "content", "message"),
    [
        ("ak.pub", b"\x00\x01garbage", "--ak-public"),
        ("ak.pub", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "PEM"),
        ("quote.sig", b"\x00\x14\x00", "--signature"),
        ("quote.msg", b"\xff\x54\x43\x47\x80\x18", "--attest"),
        ("quote.pcrs", b"\x01\x00\x00\x00", "--pcr-file"),
    ],
)
def test_cli_quote_rejects_unreadable_input(
    files: Path, tmp_path: Path, replace: str, content: bytes, message: str
) -> None:
    work = tmp_path / "files"
    shutil.copytree(files, work, ignore=shutil.ignore_patterns("tpm"))
    (work / replace).write_bytes(content)

    result = run(work, *full_options(work))

    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1
    assert message in error_lines[0]


def test_cli_quote_rejects_bad_nonce_hex(files: Path) -> None:
    result = run(files, "--nonce", "xyz")

    assert result.exit_code == 2
    assert "--nonce 'xyz': not an even number of hex digits" in result.output


def test_cli_quote_rejects_bad_selection(files: Path) -> None:
    result = run(files, "--pcr-selection", "md5:1")

    assert result.exit_code == 2
    assert "--pcr-selection" in result.output


def test_cli_quote_console_script(files: Path) -> None:
    script = Path(sys.executable).with_name("edgetrust")
    if not script.exists():
        pytest.skip("the edgetrust console script is not installed in this environment")

    completed = subprocess.run(
        [str(script), "evidence", "quote", "--ak-public", "ak.pub", "--attest", "quote.msg",
         "--signature", "quote.sig", "--nonce", "00", "--json"],
        cwd=files, capture_output=True, text=True, timeout=60, check=False,
    )

    assert completed.returncode == 1
    assert json.loads(completed.stdout)["valid"] is False
