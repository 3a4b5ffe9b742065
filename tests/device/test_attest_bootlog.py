"""The UEFI event log on the device: where it is read from, and its replay into swtpm's PCRs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.attest import AttestationTpm
from device.bootlog_sim import (
    EventLogReplayError,
    ReplayOutcome,
    event_log_path,
    replay_event_log_into_tpm,
)
from device.errors import AgentSettingsError
from device.tpm import DeviceTpm
from evidence.eventlog import parse_event_log, verify_event_log
from evidence.findings import Severity
from evidence.tpm import PcrBank, PcrSelection, TpmAlg
from tests.device.conftest import TpmUnderTest
from tests.support.eventlog import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_IPL,
    EV_POST_CODE,
    EV_S_CRTM_VERSION,
    EventLogBuilder,
)

BOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)


def boot_log() -> EventLogBuilder:
    """A firmware, shim and GRUB boot of our own making, without a StartupLocality event."""
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0")
    builder.add(0, EV_POST_CODE, b"POST CODE")
    builder.separator(range(8))
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"shimx64.efi image")
    builder.image_load(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"grubx64.efi image")
    builder.grub_string("kernel_cmdline", "/vmlinuz root=/dev/mmcblk0p2 ro")
    builder.add(9, EV_IPL, b"/boot/vmlinuz\0", measured=b"kernel image")
    builder.add(14, EV_IPL, b"MokList\0", measured=b"mok list")
    return builder


@pytest.fixture
def tpm(blank_swtpm: TpmUnderTest) -> Iterator[AttestationTpm]:
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        yield AttestationTpm.for_device(device)


def read_boot_pcrs(tpm: AttestationTpm) -> dict[TpmAlg, dict[int, bytes]]:
    selection = PcrSelection(tuple(PcrBank(bank, BOOT_PCRS) for bank in (TpmAlg.SHA1, TpmAlg.SHA256)))
    return tpm.read_pcrs(selection)


def test_replay_gives_log_pcrs(tpm: AttestationTpm) -> None:
    builder = boot_log()

    outcome = replay_event_log_into_tpm(tpm, builder.build())

    assert outcome is ReplayOutcome.REPLAYED
    values = read_boot_pcrs(tpm)
    expected = builder.expected_pcrs()
    for bank, name in ((TpmAlg.SHA1, "sha1"), (TpmAlg.SHA256, "sha256")):
        for pcr, value in expected[name].items():
            assert values[bank][pcr] == value, f"{name} PCR {pcr}"


def test_replayed_log_verifies_with_evidence(tpm: AttestationTpm) -> None:
    raw = boot_log().build()
    replay_event_log_into_tpm(tpm, raw)

    quoted = read_boot_pcrs(tpm)
    findings = verify_event_log(parse_event_log(raw), quoted)

    assert [finding.code for finding in findings if finding.severity >= Severity.WARNING] == []


def test_replay_runs_once_per_reset(tpm: AttestationTpm) -> None:
    raw = boot_log().build()
    replay_event_log_into_tpm(tpm, raw)
    before = read_boot_pcrs(tpm)

    outcome = replay_event_log_into_tpm(tpm, raw)

    assert outcome is ReplayOutcome.ALREADY_REPLAYED
    assert read_boot_pcrs(tpm) == before


def test_replay_after_swtpm_restart(blank_swtpm: TpmUnderTest) -> None:
    raw = boot_log().build()
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        replay_event_log_into_tpm(AttestationTpm.for_device(device), raw)

    blank_swtpm.swtpm.restart()

    with DeviceTpm.connect(blank_swtpm.swtpm.tcti) as device:
        outcome = replay_event_log_into_tpm(AttestationTpm.for_device(device), raw)
    assert outcome is ReplayOutcome.REPLAYED


def test_replay_rejects_startup_locality(tpm: AttestationTpm) -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.startup_locality(3)
    builder.add(0, EV_S_CRTM_VERSION, b"\0\0")

    with pytest.raises(EventLogReplayError) as raised:
        replay_event_log_into_tpm(tpm, builder.build())

    assert raised.value.code == "event-log-locality-unsupported"
    assert "locality 3" in raised.value.message


def test_replay_rejects_extended_pcrs(tpm: AttestationTpm) -> None:
    tpm.extend_pcr(4, {TpmAlg.SHA256: bytes(32)})

    with pytest.raises(EventLogReplayError) as raised:
        replay_event_log_into_tpm(tpm, boot_log().build())

    assert raised.value.code == "event-log-replay-failed"


def test_replay_rejects_garbage(tpm: AttestationTpm) -> None:
    with pytest.raises(EventLogReplayError) as raised:
        replay_event_log_into_tpm(tpm, b"not an event log")

    assert raised.value.code == "event-log-invalid"


def test_replay_skips_pcr12_events(tpm: AttestationTpm) -> None:
    builder = boot_log()
    builder.systemd_boot_command_line("root=/dev/sda2")

    replay_event_log_into_tpm(tpm, builder.build())

    pcr12 = tpm.read_pcrs(PcrSelection((PcrBank(TpmAlg.SHA256, (12,)),)))
    assert pcr12[TpmAlg.SHA256][12] == bytes(32)


def test_sha1_format_log_replays(tpm: AttestationTpm) -> None:
    builder = EventLogBuilder(banks=("sha1",), crypto_agile=False)
    builder.add(0, EV_S_CRTM_VERSION, b"1.0\0")
    builder.separator(range(8))

    replay_event_log_into_tpm(tpm, builder.build())

    values = tpm.read_pcrs(PcrSelection((PcrBank(TpmAlg.SHA1, tuple(range(8))),)))
    for pcr, value in builder.expected_pcrs()["sha1"].items():
        assert values[TpmAlg.SHA1][pcr] == value


def test_event_log_path_prefers_securityfs(tmp_path: Path) -> None:
    securityfs = tmp_path / "binary_bios_measurements"
    configured = tmp_path / "configured.bin"
    configured.write_bytes(b"log")

    assert event_log_path(configured, securityfs=securityfs) == configured
    securityfs.write_bytes(b"")
    assert event_log_path(configured, securityfs=securityfs) == securityfs
    assert event_log_path(None, securityfs=tmp_path / "absent") is None


def test_event_log_path_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AgentSettingsError) as raised:
        event_log_path(tmp_path / "missing.bin", securityfs=tmp_path / "absent")

    assert "agent_event_log" in raised.value.message
