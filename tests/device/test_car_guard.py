"""The DonkeyCar car app run by ``edgetrust guard``, stopped cleanly when the device turns untrusted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.car import init_car_dir
from tests.device.test_car import drive_log, needs_donkeycar
from tests.device.test_guard import GuardFactory
from tests.device.test_guard_server import FakeTrustServer, verdict, wait_for


@pytest.fixture
def trust_server() -> Iterator[FakeTrustServer]:
    server = FakeTrustServer().start()
    yield server
    server.stop()


@needs_donkeycar
def test_car_under_guard_shuts_down_cleanly(trust_server: FakeTrustServer, tmp_path: Path) -> None:
    car_dir = tmp_path / "car"
    init_car_dir(car_dir)
    car = [sys.executable, "-m", "edgetrust", "car", "--car-dir", str(car_dir), "--rate-hz", "50",
           "--report-every", "5"]
    trust_server.set_verdict(verdict("trusted"))
    guards = GuardFactory(tmp_path, trust_server.url)
    try:
        guard = guards.start(workload=car, grace_period=20.0, restart=True)
        guard.wait_for_log("loop 10:")
        untrusted = verdict("untrusted", codes=("ima-digest-not-allowed",))

        trust_server.set_verdict(untrusted)

        guard.wait_for_log(f"verdict untrusted (reasons: ima-digest-not-allowed; verdict_id "
                           f"{untrusted['verdict_id']})")
        guard.wait_for_log("(SIGTERM); parts shut down: camera, pilot, drive log")
        guard.wait_for_log("stopped with status 0")
        assert "killed it with SIGKILL" not in guard.log()
        records = drive_log(car_dir)
        assert records[-1]["event"] == "shutdown"

        trust_server.set_verdict(verdict("trusted"))

        wait_for(lambda: guard.log().count("driving at 50 Hz") == 2, "the car to start again")
        assert guard.terminate() == 0
        assert guard.log().count("(SIGTERM); parts shut down") == 2
        events = [record["event"] for record in drive_log(car_dir) if "event" in record]
        assert events == ["start", "shutdown", "start", "shutdown"]
    finally:
        guards.cleanup()
