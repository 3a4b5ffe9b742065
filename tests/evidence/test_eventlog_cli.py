"""``edgetrust evidence eventlog`` on the captured event logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgetrust.cli import main
from evidence.eventlog import parse_event_log, read_event_log, replay_event_log


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["evidence", "eventlog", *args])
    return result.exit_code, result.output


def test_cli_json_prints_pcrs_and_events(fixtures_dir: Path) -> None:
    path = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements"

    exit_code, output = _run(str(path), "--json")
    document = json.loads(output)

    assert exit_code == 0
    replayed = replay_event_log(parse_event_log(read_event_log(path)))
    assert document["pcrs"] == {
        bank: {str(pcr): value.hex() for pcr, value in values.items()}
        for bank, values in replayed.items()
    }
    assert list(document["pcrs"]) == ["sha1", "sha256"]
    assert list(document["pcrs"]["sha256"]) == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
                                                "14"]
    assert len(document["events"]) == 121
    first = document["events"][3]
    assert first["index"] == 3
    assert first["pcr"] == 0
    assert first["type"] == "EV_S_CRTM_VERSION"
    assert set(first["digests"]) == {"sha1", "sha256"}
    assert first["digests"]["sha1"] == first["digests"]["sha1"].lower()
    assert first["decoded"] == {"kind": "text", "text": "N40ET41W ", "encoding": "utf-16-le"}


def test_cli_json_raw_data_for_undecoded_events(fixtures_dir: Path) -> None:
    path = fixtures_dir / "eventlog" / "rust-keylime-uefi_log.bin"

    exit_code, output = _run(str(path), "--json")
    events = json.loads(output)["events"]

    assert exit_code == 0
    unknown = events[42]
    assert unknown["type"] == "EV_UNKNOWN_0x00008401"
    assert unknown["data"] == "01"
    assert "decoded" not in unknown


def test_cli_summary(fixtures_dir: Path) -> None:
    path = fixtures_dir / "eventlog" / "tpm2-tools-event-arch-linux.bin"

    exit_code, output = _run(str(path))

    assert exit_code == 0
    assert "Format: crypto-agile (Spec ID Event03)" in output
    assert "Events: 25" in output
    assert "Banks: sha1, sha256" in output
    assert "warning: eventlog-digest-data-mismatch: event 24" in output
    assert "     0: a0487b0d95387d4a30560edf5f041307bf4a1dcc" in output


def test_cli_summary_sha1_log(fixtures_dir: Path) -> None:
    exit_code, output = _run(str(fixtures_dir / "eventlog" / "go-attestation-short_no_action_eventlog"))

    assert exit_code == 0
    assert "Format: SHA-1 (no Spec ID event)" in output
    assert "StartupLocality: 3" in output
    assert "     0: 0000000000000000000000000000000000000003" in output


def test_cli_bogus_log_fails_with_one_line(fixtures_dir: Path) -> None:
    exit_code, output = _run(str(fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-bogus"))

    assert exit_code == 1
    assert output.count("\n") == 1
    assert "malformed event log: event 0 at byte offset 0" in output
    assert "[eventlog-malformed]" in output


def test_cli_empty_log_fails(fixtures_dir: Path) -> None:
    exit_code, output = _run(str(fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-empty"))

    assert exit_code == 1
    assert "no event log" in output
    assert "[eventlog-empty]" in output


def test_cli_unreadable_file_fails(tmp_path: Path) -> None:
    exit_code, output = _run(str(tmp_path / "missing"))

    assert exit_code == 1
    assert output.startswith("Error: cannot read event log")
    assert output.count("\n") == 1


def test_cli_process_exit_status(fixtures_dir: Path) -> None:
    path = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-bogus"

    result = subprocess.run(
        [sys.executable, "-c", "from edgetrust.cli import main; main()", "evidence", "eventlog",
         str(path)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
