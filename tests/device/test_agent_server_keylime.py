"""The agent API against Keylime 7.14.3's own verifier code, run in Keylime's virtual
environment: ``tpm_util.checkquote`` and ``process_quote_response`` (quote signature, nonce,
PCR 16 bound to the payload key, IMA list replayed to PCR 10 and checked against a runtime
policy, incremental IMA entries) and ``mba.bootlog_parse`` for the UEFI event log."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from device.attest import AgentQuoter, AttestationTpm
from device.bootlog_sim import replay_event_log_into_tpm
from device.tpm import DeviceTpm
from tests.device.agent_support import KeylimeVerifier, agent_stack, require_keylime, runtime_policy
from tests.device.conftest import TpmUnderTest
from tests.support.eventlog import EV_POST_CODE, EV_S_CRTM_VERSION, EventLogBuilder

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _keylime() -> None:
    require_keylime()


def car_files(directory: Path) -> Path:
    """Write a small stand-in for the DonkeyCar app: manage.py, config.py, a parts package."""
    (directory / "parts").mkdir(parents=True)
    (directory / "manage.py").write_text("import donkeycar as dk\nprint('drive')\n")
    (directory / "config.py").write_text("DRIVE_LOOP_HZ = 20\n")
    (directory / "parts" / "__init__.py").write_text("")
    (directory / "parts" / "pilot.py").write_text("class Pilot:\n    pass\n")
    return directory


@pytest.mark.parametrize("ak_type", ["ecc", "rsa"])
def test_keylime_verifier_accepts_quotes(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                         ak_type: str) -> None:
    car = car_files(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car], ak_type=ak_type) as stack:
        verifier = KeylimeVerifier(agent_url=stack.url, ak_tpm=stack.keys.ak.public,
                                   mask="0x10400", runtime_policy=runtime_policy(stack))
        try:
            first = verifier.poll()
            second = verifier.poll()
        finally:
            verifier.close()

    assert first["status"] == 200
    assert first["events"] == []
    assert first["partial"] == "0"
    assert first["entry"] == 0
    assert first["lines"] == 5
    assert first["next_entry"] == 5
    assert second["events"] == []
    assert second["partial"] == "1"
    assert second["requested_entry"] == 5
    assert second["entry"] == 5
    assert second["lines"] == 0


class WrongPcr16Quoter(AgentQuoter):
    """Extends PCR 16 with the digest of another key than the one it sends."""

    def _bind_payload_key(self) -> None:
        other = hashlib.new(self.hash_alg, b"not the payload key").digest()
        self.tpm.reset_pcr(16)
        self.tpm.extend_pcr(16, {self.hash_bank: other})


def test_keylime_rejects_unbound_payload_key(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    car = car_files(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car],
                     quoter_class=WrongPcr16Quoter) as stack:
        verifier = KeylimeVerifier(agent_url=stack.url, ak_tpm=stack.keys.ak.public,
                                   mask="0x400", runtime_policy=runtime_policy(stack))
        try:
            result = verifier.poll()
        finally:
            verifier.close()

    assert "pcr_validation.invalid_pcr_16" in result["events"]


def test_keylime_incremental_ima_after_change(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    car = car_files(tmp_path / "car")
    config = car / "config.py"
    new_content = b"DRIVE_LOOP_HZ = 40\n"
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:
        assert stack.simulator is not None
        policy = runtime_policy(stack, {config: [new_content]})
        verifier = KeylimeVerifier(agent_url=stack.url, ak_tpm=stack.keys.ak.public,
                                   mask="0x400", runtime_policy=policy)
        try:
            first = verifier.poll()
            config.write_bytes(new_content)
            added = stack.simulator.measure()
            second = verifier.poll()
        finally:
            verifier.close()

    assert first["events"] == []
    assert added == 1
    assert second["events"] == []
    assert second["requested_entry"] == 5
    assert second["entry"] == 5
    assert second["lines"] == 1
    assert second["next_entry"] == 6


def test_keylime_rejects_digest_not_in_policy(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    car = car_files(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car]) as stack:
        assert stack.simulator is not None
        policy = runtime_policy(stack)
        verifier = KeylimeVerifier(agent_url=stack.url, ak_tpm=stack.keys.ak.public,
                                   mask="0x400", runtime_policy=policy)
        try:
            first = verifier.poll()
            (car / "manage.py").write_text("import os\nos.system('tampered')\n")
            stack.simulator.measure()
            second = verifier.poll()
        finally:
            verifier.close()

    assert first["events"] == []
    assert "ima.validation.ima-ng.runtime_policy_hash" in second["events"]


def test_keylime_parses_event_log_to_quoted_pcrs(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0")
    builder.add(0, EV_POST_CODE, b"POST CODE")
    builder.separator(range(8))
    raw_log = builder.build()
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        replay_event_log_into_tpm(AttestationTpm.for_device(device), raw_log)

    car = car_files(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car],
                     event_log=raw_log) as stack:
        verifier = KeylimeVerifier(agent_url=stack.url, ak_tpm=stack.keys.ak.public,
                                   mask="0x104ff", runtime_policy=runtime_policy(stack))
        try:
            result = verifier.poll()
        finally:
            verifier.close()

    assert result["events"] == []
    assert result["mb_compared"] == list(range(8))
    assert result["mb_mismatch"] == []
