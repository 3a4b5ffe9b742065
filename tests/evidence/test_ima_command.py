"""``edgetrust evidence ima``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgetrust.cli import main
from tests.support.ima import ImaListBuilder, fake_boot_pcrs

REAL_SHA1 = "82231c67a69da98dc5b3aa10f6343d33109225fc"
REAL_SHA256 = "c4a065637fc6a7c55f2811dd06cb45dd037133be2b3dc5c3e6fbe6bf061db724"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["evidence", "ima", *args])
    return result.exit_code, result.output


def _real_list(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "ima" / "rust-keylime-agent.ascii")


def test_command_json_real_list(fixtures_dir: Path) -> None:
    code, output = _run(_real_list(fixtures_dir), "--bank", "sha1", "--bank", "sha256", "--json")

    data = json.loads(output)
    assert code == 0
    assert data["entries"] == 826
    assert data["pcrs"] == {"sha1": {"10": REAL_SHA1}, "sha256": {"10": REAL_SHA256}}
    assert data["findings"] == []
    assert len(data["measurements"]) == 826
    assert data["measurements"][1] == {
        "index": 1,
        "pcr": 10,
        "template": "ima-ng",
        "path": "/init",
        "digest": "sha1:19f13b42c2745066347e76454788c0fe083643f3",
    }


def test_command_summary_real_list(fixtures_dir: Path) -> None:
    code, output = _run(_real_list(fixtures_dir))

    assert code == 0
    assert "Entries: 826 (ima-ng 826)" in output
    assert f"  sha256: {REAL_SHA256}" in output
    assert "Findings: none" in output


def test_command_reads_binary_form(tmp_path: Path) -> None:
    built = ImaListBuilder()
    built.boot_aggregate(fake_boot_pcrs())
    built.ima_sig("/usr/bin/env", b"env", signature=b"\x03\x02")
    built.ima("/sbin/init", b"init")
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(built.binary())

    code, output = _run(str(path), "--bank", "sha384", "--json")

    data = json.loads(output)
    assert code == 0
    assert data["form"] == "binary"
    assert data["pcrs"] == {"sha384": {"10": built.pcr10("sha384").hex()}}
    assert [item["template"] for item in data["measurements"]] == ["ima-ng", "ima-sig", "ima"]


def test_command_expected_pcr10_match_and_mismatch(fixtures_dir: Path) -> None:
    matched, _ = _run(_real_list(fixtures_dir), "--expected-pcr10", REAL_SHA256)
    mismatched, output = _run(_real_list(fixtures_dir), "--expected-pcr10", "00" * 32)

    assert matched == 0
    assert mismatched == 1
    assert "error: ima-pcr-mismatch:" in output


def test_command_expected_pcr10_needs_one_bank(fixtures_dir: Path) -> None:
    code, output = _run(
        _real_list(fixtures_dir), "--bank", "sha1", "--bank", "sha256", "--expected-pcr10", "00"
    )

    assert code == 2
    assert "needs exactly one --bank" in output


def test_command_template_hash_mismatch_exits_1(tmp_path: Path) -> None:
    built = ImaListBuilder()
    built.ima_ng("/usr/bin/a", b"a")
    built.replace_entry(0, template_hash=b"\x01" * 20)
    path = tmp_path / "list"
    path.write_bytes(built.ascii_bytes())

    code, output = _run(str(path))

    assert code == 1
    assert "error: ima-template-hash-mismatch:" in output


def test_command_malformed_list_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text("10 " + "ab" * 20 + " ima-ng sha256:00 /a\n")

    code, output = _run(str(path))

    assert code == 1
    assert output.count("\n") == 1
    assert output.startswith(f"Error: {path}: line 1: sha256 file digest has 1 bytes")
    assert "[ima-digest-invalid]" in output


def test_command_unknown_algorithm_fixture_is_rejected(fixtures_dir: Path) -> None:
    code, output = _run(str(fixtures_dir / "ima" / "keylime-ima-log-unknown"))

    assert code == 1
    assert "[ima-digest-algorithm-unknown]" in output


def test_command_missing_file_is_one_line_error(tmp_path: Path) -> None:
    code, output = _run(str(tmp_path / "absent"))

    assert code == 1
    assert (
        output
        == f"Error: cannot read IMA measurement list {tmp_path / 'absent'}: No such file or directory\n"
    )


def test_command_directory_is_one_line_error(tmp_path: Path) -> None:
    code, output = _run(str(tmp_path))

    assert code == 1
    assert output.count("\n") == 1
    assert output.startswith(f"Error: cannot read IMA measurement list {tmp_path}")


def test_command_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")

    code, output = _run(str(path))

    assert code == 1
    assert output == f"Error: {path}: IMA measurement list is empty\n"
