"""The IMA simulator against swtpm, and reading lists by entry.

The list replays to the TPM's PCR 10 in every bank and changed files add entries. Agent
restarts continue the list, TPM resets start a new one, and readers never get half a line."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.attest import AttestationTpm, single_bank_selection
from device.ima_sim import (
    ImaSimulator,
    ImaSimulatorError,
    MeasurementListFile,
    entry_line,
    ima_ng_entry,
    iter_measured_files,
)
from device.tpm import DeviceTpm
from evidence.ima import (
    check_boot_aggregate,
    check_template_hashes,
    parse_ascii_list,
    read_ascii_list,
    replay_pcr10,
)
from evidence.tpm import PcrBank, PcrSelection, TpmAlg
from tests.device.conftest import TpmUnderTest

BANK_NAMES = {TpmAlg.SHA1: "sha1", TpmAlg.SHA256: "sha256", TpmAlg.SHA384: "sha384",
              TpmAlg.SHA512: "sha512"}


@pytest.fixture
def tpm(blank_swtpm: TpmUnderTest) -> Iterator[AttestationTpm]:
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        yield AttestationTpm.for_device(device)


@pytest.fixture
def car(tmp_path: Path) -> Path:
    directory = tmp_path / "mycar"
    (directory / "models").mkdir(parents=True)
    (directory / "manage.py").write_text("print('drive')\n")
    (directory / "config.py").write_text("DRIVE_LOOP_HZ = 20\n")
    (directory / "models" / "pilot.h5").write_bytes(os.urandom(100_000))
    return directory


def list_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ima" / "ascii_runtime_measurements"


def pcr10(tpm: AttestationTpm) -> dict[str, bytes]:
    selection = PcrSelection(tuple(PcrBank(bank, (10,)) for bank in tpm.allocated_banks()))
    return {BANK_NAMES[bank]: values[10] for bank, values in tpm.read_pcrs(selection).items()}


def assert_list_matches_pcr10(tpm: AttestationTpm, path: Path) -> None:
    entries = read_ascii_list(path)
    values = pcr10(tpm)
    assert set(values) == {"sha1", "sha256", "sha384", "sha512"}
    for bank, value in values.items():
        assert replay_pcr10(entries, bank) == value, f"PCR 10 in the {bank} bank"


def test_list_replays_to_pcr10_every_bank(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    simulator = ImaSimulator(tpm, list_path(tmp_path), [car])

    simulator.start()

    entries = read_ascii_list(list_path(tmp_path))
    assert [entry.path for entry in entries] == [
        "boot_aggregate", str(car / "config.py"), str(car / "manage.py"),
        str(car / "models" / "pilot.h5")]
    assert all(entry.template == "ima-ng" for entry in entries)
    assert entries.template_hash_algorithm == "sha1"
    assert check_template_hashes(entries.entries, "sha1") == []
    assert_list_matches_pcr10(tpm, list_path(tmp_path))


def test_file_digests_are_sha256(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    ImaSimulator(tpm, list_path(tmp_path), [car]).start()

    entries = {entry.path: entry for entry in read_ascii_list(list_path(tmp_path))}
    manage = entries[str(car / "manage.py")]
    assert manage.digest_algorithm == "sha256"
    assert manage.digest == hashlib.sha256(b"print('drive')\n").digest()


def test_boot_aggregate_from_tpm_pcrs(tpm: AttestationTpm, tmp_path: Path) -> None:
    tpm.extend_pcr(0, {TpmAlg.SHA256: hashlib.sha256(b"firmware").digest()})
    tpm.extend_pcr(9, {TpmAlg.SHA256: hashlib.sha256(b"kernel").digest()})

    ImaSimulator(tpm, list_path(tmp_path), []).start()

    entries = read_ascii_list(list_path(tmp_path))
    boot_pcrs = tpm.read_pcrs(single_bank_selection(TpmAlg.SHA256, range(10)))[TpmAlg.SHA256]
    assert entries[0].digest_algorithm == "sha256"
    assert check_boot_aggregate(entries[0], {"sha256": boot_pcrs}) == []


def test_changed_file_adds_entry(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    simulator = ImaSimulator(tpm, list_path(tmp_path), [car])
    simulator.start()

    (car / "config.py").write_text("DRIVE_LOOP_HZ = 40\n")
    added = simulator.measure()

    entries = read_ascii_list(list_path(tmp_path))
    assert added == 1
    assert len(entries) == 5
    assert entries[4].path == str(car / "config.py")
    assert entries[4].digest == hashlib.sha256(b"DRIVE_LOOP_HZ = 40\n").digest()
    assert_list_matches_pcr10(tpm, list_path(tmp_path))


def test_unchanged_files_add_nothing(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    simulator = ImaSimulator(tpm, list_path(tmp_path), [car])
    simulator.start()

    assert simulator.measure() == 0
    os.utime(car / "manage.py", ns=(1, 1))  # new mtime, same content
    assert simulator.measure() == 0
    assert simulator.entry_count == 4


def test_content_changed_back_adds_nothing(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    """The kernel keeps one entry per template hash, so old content measured again adds none."""
    simulator = ImaSimulator(tpm, list_path(tmp_path), [car])
    simulator.start()
    config = car / "config.py"
    original = config.read_bytes()

    config.write_text("DRIVE_LOOP_HZ = 40\n")
    first = simulator.measure()
    config.write_bytes(original)
    second = simulator.measure()

    assert first == 1
    assert second == 0


def test_agent_restart_continues_list(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        ImaSimulator(AttestationTpm.for_device(device), list_path(tmp_path), [car]).start()
    before = list_path(tmp_path).read_bytes()

    (car / "manage.py").write_text("print('drive faster')\n")
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        tpm = AttestationTpm.for_device(device)
        simulator = ImaSimulator(tpm, list_path(tmp_path), [car])
        simulator.start()
        after = list_path(tmp_path).read_bytes()
        assert_list_matches_pcr10(tpm, list_path(tmp_path))

    assert after.startswith(before)
    assert simulator.entry_count == 5
    assert read_ascii_list(list_path(tmp_path))[4].path == str(car / "manage.py")


def test_tpm_reset_starts_new_list(blank_swtpm: TpmUnderTest, car: Path, tmp_path: Path) -> None:
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        ImaSimulator(AttestationTpm.for_device(device), list_path(tmp_path), [car]).start()
    old_list = list_path(tmp_path).read_bytes()

    blank_swtpm.swtpm.restart()
    with DeviceTpm.connect(blank_swtpm.swtpm.tcti) as device:
        tpm = AttestationTpm.for_device(device)
        tpm.extend_pcr(0, {TpmAlg.SHA256: hashlib.sha256(b"new boot").digest()})
        ImaSimulator(tpm, list_path(tmp_path), [car]).start()
        assert_list_matches_pcr10(tpm, list_path(tmp_path))

    entries = read_ascii_list(list_path(tmp_path))
    assert len(entries) == 4
    assert entries[0].path == "boot_aggregate"
    assert entries[0].digest != parse_ascii_list(old_list)[0].digest
    previous = list_path(tmp_path).with_name("ascii_runtime_measurements.previous")
    assert previous.read_bytes() == old_list


def test_interrupted_measurement_completed(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    ImaSimulator(tpm, list_path(tmp_path), [car]).start()
    # The agent stopped after writing a line and before extending PCR 10.
    name = str(car / "late.py").encode()
    late = ima_ng_entry(4, "sha256", hashlib.sha256(b"late").digest(), name)
    with list_path(tmp_path).open("ab") as stream:
        stream.write(entry_line(late))

    simulator = ImaSimulator(tpm, list_path(tmp_path), [car])
    simulator.start()

    assert simulator.entry_count == 5
    assert_list_matches_pcr10(tpm, list_path(tmp_path))


def test_half_line_removed_on_start(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    ImaSimulator(tpm, list_path(tmp_path), [car]).start()
    complete = list_path(tmp_path).read_bytes()
    with list_path(tmp_path).open("ab") as stream:
        stream.write(b"10 0123456789abcdef ima-ng sha256:")

    ImaSimulator(tpm, list_path(tmp_path), [car]).start()

    assert list_path(tmp_path).read_bytes() == complete


def test_foreign_pcr10_extend_rejected(tpm: AttestationTpm, car: Path, tmp_path: Path) -> None:
    ImaSimulator(tpm, list_path(tmp_path), [car]).start()
    tpm.extend_pcr(10, {bank: bytes(size) for bank, size in
                        ((TpmAlg.SHA1, 20), (TpmAlg.SHA256, 32), (TpmAlg.SHA384, 48),
                         (TpmAlg.SHA512, 64))})

    with pytest.raises(ImaSimulatorError) as raised:
        ImaSimulator(tpm, list_path(tmp_path), [car]).start()

    assert raised.value.code == "ima-simulator-inconsistent"
    assert "Restart the TPM" in raised.value.message


def test_missing_list_with_used_pcr10_rejected(tpm: AttestationTpm, tmp_path: Path) -> None:
    tpm.extend_pcr(10, {TpmAlg.SHA256: bytes(32)})

    with pytest.raises(ImaSimulatorError):
        ImaSimulator(tpm, list_path(tmp_path), []).start()


def test_symlinks_measured_once_by_target(car: Path, tmp_path: Path) -> None:
    (car / "link.py").symlink_to(car / "manage.py")
    (tmp_path / "outside").mkdir()
    (car / "models" / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)

    files = list(iter_measured_files([car, car / "manage.py", tmp_path / "missing"]))

    assert files == [car / "config.py", car / "manage.py", car / "models" / "pilot.h5"]


def test_name_with_space_replays(tpm: AttestationTpm, tmp_path: Path) -> None:
    odd = tmp_path / "odd dir"
    odd.mkdir()
    (odd / "fahrzeug ü.py").write_text("x = 1\n")

    ImaSimulator(tpm, list_path(tmp_path), [odd]).start()

    entries = read_ascii_list(list_path(tmp_path))
    assert entries[1].path == str(odd / "fahrzeug ü.py")
    assert_list_matches_pcr10(tpm, list_path(tmp_path))


# --- Reading by entry -------------------------------------------------------------------------


def write_lines(path: Path, count: int, start: int = 0) -> None:
    with path.open("a") as stream:
        for index in range(start, start + count):
            stream.write(f"line {index}\n")


def test_read_from_entries(tmp_path: Path) -> None:
    path = tmp_path / "list"
    write_lines(path, 5)
    reader = MeasurementListFile(path)

    whole = reader.read_from(0)
    tail = reader.read_from(3)
    end = reader.read_from(5)
    beyond = reader.read_from(6)

    assert (whole.start_index, whole.entry_count) == (0, 5)
    assert whole.text.splitlines() == [f"line {index}" for index in range(5)]
    assert (tail.start_index, tail.text) == (3, "line 3\nline 4\n")
    assert (end.start_index, end.text, end.entry_count) == (5, "", 5)
    assert beyond.start_index == 0
    assert beyond.text == whole.text


def test_read_from_growing_list(tmp_path: Path) -> None:
    path = tmp_path / "list"
    write_lines(path, 3)
    reader = MeasurementListFile(path)
    reader.read_from(0)

    write_lines(path, 2, start=3)
    grown = reader.read_from(3)

    assert grown.text == "line 3\nline 4\n"
    assert grown.entry_count == 5


def test_read_never_yields_half_line(tmp_path: Path) -> None:
    path = tmp_path / "list"
    write_lines(path, 2)
    with path.open("a") as stream:
        stream.write("line 2 still being wri")
    reader = MeasurementListFile(path)

    during = reader.read_from(0)
    with path.open("a") as stream:
        stream.write("tten\n")
    after = reader.read_from(2)

    assert during.text == "line 0\nline 1\n"
    assert during.entry_count == 2
    assert after.text == "line 2 still being written\n"


def test_read_after_list_replaced(tmp_path: Path) -> None:
    path = tmp_path / "list"
    write_lines(path, 5)
    reader = MeasurementListFile(path)
    reader.read_from(5)

    replacement = tmp_path / "new"
    write_lines(replacement, 2, start=100)
    os.replace(replacement, path)
    fresh = reader.read_from(5)

    assert fresh.start_index == 0
    assert fresh.text == "line 100\nline 101\n"
