"""Tests for ``edgetrust poll``: a real poller process against simulated agents on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from tests.verifier.conftest import add_to_verifier, register, store_runtime_policy
from verifier.api import VerifierService
from verifier.fleet_sim import Fleet, SimulatedDevice, make_files
from verifier.models import VerifierDevice

EDGETRUST = [str(Path(sys.executable).parent / "edgetrust")]


def environment(tmp_path: Path, database_url: str, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGETRUST_")}
    env.update({"EDGETRUST_DATA_DIR": str(tmp_path), "EDGETRUST_DATABASE_URL": database_url, **settings})
    return env


def verdict_status(sessions: sessionmaker[Session], device_id: str) -> str:
    with sessions() as session:
        device = session.query(VerifierDevice).filter_by(device_id=device_id).one()
        return device.verdict_status


def test_poll_command_attests_until_terminated(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    files = make_files(5)
    device = SimulatedDevice("polled-device", files=files)
    with Fleet([device]):
        store_runtime_policy(sessions, files)
        register(sessions, device)
        add_to_verifier(VerifierService(sessions, default_poll_interval=1.0), device, poll_interval=1.0)
        env = environment(tmp_path, database_url, EDGETRUST_VERIFIER_AGENT_MTLS="false")
        process = subprocess.Popen(
            [*EDGETRUST, "poll", "--threads", "2"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while verdict_status(sessions, device.device_id) != "trusted" and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)

    assert verdict_status(sessions, device.device_id) == "trusted"
    assert process.returncode == 0
    assert "over plain HTTP" in stderr
    assert "stopped" in stderr


def test_poll_command_needs_client_certificate(
    tmp_path: Path, database_url: str, migrated_engine: object
) -> None:
    result = subprocess.run(
        [*EDGETRUST, "poll"],
        env=environment(tmp_path, database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "verifier_tls_cert and verifier_tls_key are not set" in result.stderr


def test_poll_command_rejects_short_lease(tmp_path: Path, database_url: str, migrated_engine: object) -> None:
    env = environment(
        tmp_path, database_url, EDGETRUST_VERIFIER_AGENT_MTLS="false", EDGETRUST_VERIFIER_LEASE_SECONDS="20"
    )

    result = subprocess.run(
        [*EDGETRUST, "poll"], env=env, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 1
    assert "verifier_lease_seconds is 20.0, expected at least 50.0" in result.stderr
