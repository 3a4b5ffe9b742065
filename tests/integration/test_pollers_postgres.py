"""Several ``edgetrust poll`` processes on one PostgreSQL database, as a fleet runs them.

``edgetrust serve`` runs no poller on PostgreSQL, so two ``edgetrust poll`` workers share the
devices. A few devices are real: ``edgetrust agent`` on swtpm. The others are software devices
from ``verifier.fleet_sim``, served from this process. They are stored in the registrar
without the enrollment exchange, because their AKs live in no TPM. Every agent is reached
over mutual TLS.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from device.emulator import missing_tools
from edgetrust.db import make_engine, make_session_factory
from tests.integration.fleet import ApiClient, Fleet, parse_time, wait_until
from tests.support.database import POSTGRES_ENV, fresh_database, postgres_admin_url
from tests.verifier.conftest import register
from verifier import fleet_sim

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.swtpm]

REAL_DEVICES: Final = 2
SOFTWARE_DEVICES: Final = 40
POLL_INTERVAL: Final = 1.0
# Seconds the pollers run together, and the third one after the second stopped.
SHARED_SECONDS: Final = 8.0
AFTER_RESTART_SECONDS: Final = 6.0
DEADLINE: Final = 90.0
CAR_FILES: Final = {
    "manage.py": b"from donkeycar import vehicle\nvehicle.drive()\n",
    "config.py": b"DRIVE_LOOP_HZ = 20\n",
}


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    if postgres_admin_url() is None:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    with fresh_database("postgresql", tmp_path) as url:
        yield url


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str) -> Iterator[Fleet]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian packages swtpm and swtpm-tools)")
    pytest.importorskip("tpm2_pytss")
    with Fleet(tmp_path / "fleet", database_url=postgres_url) as fleet:
        yield fleet
        fleet.print_logs(sys.stdout)


def add_software_devices(fleet: Fleet, tls_dir: Path) -> fleet_sim.Fleet:
    """Serve SOFTWARE_DEVICES fleet_sim devices over mutual TLS and return the running
    fleet_sim. The devices are stored in the registrar and added to the verifier with their
    runtime policy."""
    files = fleet_sim.make_files(20)
    devices = [fleet_sim.SimulatedDevice(f"software-{number}", files=files, entries_per_quote=1)
               for number in range(1, SOFTWARE_DEVICES + 1)]
    tls_dir.mkdir()
    served = fleet_sim.Fleet(devices, tls_dir=tls_dir,
                             client_ca_pem=fleet.pki.ca_certificate.read_bytes())
    served.start()

    engine = make_engine(fleet.database_url)
    try:
        sessions = make_session_factory(engine)
        for device in devices:
            register(sessions, device, mtls_cert=served.mtls_certs[device.device_id])
    finally:
        engine.dispose()
    api = fleet.client()
    api.upload_policy("software", "runtime", fleet_sim.runtime_policy_document(files))
    for device in devices:
        api.add_device(device.device_id, runtime_policy="software", poll_interval=POLL_INTERVAL)
    return served


def overlaps(attestations: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Return the ids of attestations of one device whose start-to-finish times overlap."""
    ordered = sorted(attestations, key=lambda item: parse_time(item["started_at"]))
    return [(earlier["id"], later["id"]) for earlier, later in zip(ordered, ordered[1:], strict=False)
            if parse_time(later["started_at"]) < parse_time(earlier["finished_at"])]


def all_trusted(api: ApiClient, device_ids: list[str]) -> bool:
    return all(api.status(device_id) == "trusted" for device_id in device_ids)


def test_pollers_share_devices_without_overlap(fleet: Fleet, tmp_path: Path) -> None:
    fleet.upgrade_database()
    fleet.start_server()
    api = fleet.client()
    real = [fleet.provision_device(f"car-{number}", CAR_FILES, group="cars")
            for number in range(1, REAL_DEVICES + 1)]
    for device in real:
        device.start_agent()
    fleet.upload_runtime_policy("cars")
    for device in real:
        device.wait_serving()
        api.add_device(device.device_id, runtime_policy="cars", poll_interval=POLL_INTERVAL)
    served = add_software_devices(fleet, tmp_path / "software-tls")
    device_ids = [device.device_id for device in real] + list(served.devices)

    try:
        first = fleet.start_poller("poll-a")
        second = fleet.start_poller("poll-b")
        wait_until(lambda: all_trusted(api, device_ids), DEADLINE, "every device to be trusted")
        time.sleep(SHARED_SECONDS)

        # A poller stopped with SIGTERM finishes what it claimed and leaves no lease behind.
        second_status = second.stop()
        held_by_second = [device_id for device_id in device_ids
                          if api.device(device_id)["poller"] == "poll-b"]
        restarted_at = time.monotonic()
        third = fleet.start_poller("poll-c")
        wait_until(lambda: time.monotonic() - restarted_at > AFTER_RESTART_SECONDS and
                   all_trusted(api, device_ids), DEADLINE, "every device to stay trusted")
        first_status = first.stop()
        third_status = third.stop()
    finally:
        served.stop()
    history = {device_id: api.attestations(device_id, limit=1000) for device_id in device_ids}

    per_poller = Counter(item["poller"] for items in history.values() for item in items)
    devices_per_poller = {poller: sum(1 for items in history.values()
                                      if any(item["poller"] == poller for item in items))
                          for poller in per_poller}
    assert second_status == 0
    assert first_status == 0
    assert third_status == 0
    assert held_by_second == []
    assert set(per_poller) == {"poll-a", "poll-b", "poll-c"}
    assert min(devices_per_poller.values()) >= 5
    assert {device_id: overlaps(items) for device_id, items in history.items()
            if overlaps(items)} == {}

    # The new poller continues each device's IMA list where the others left it.
    resumed = {device_id: next(item for item in reversed(items) if item["poller"] == "poll-c")
               for device_id, items in history.items() if any(i["poller"] == "poll-c" for i in items)}
    for device_id, attestation in resumed.items():
        previous = next(item for item in history[device_id] if item["id"] < attestation["id"])
        assert attestation["status"] == "trusted"
        assert attestation["ima_start_entry"] == previous["ima_next_entry"]
        assert attestation["ima_start_entry"] > 0
        assert attestation["evidence"]["restarted_from_entry_zero"] is False

    # Only the first quote request to each device requested its IMA list from entry 0.
    requested = {device_id: [int(query["ima_ml_entry"]) for query in device.requests]
                 for device_id, device in served.devices.items()}
    requested.update({device.device_id: device.requested_ima_entries() for device in real})
    for device_id, entries in requested.items():
        assert entries[0] == 0, device_id
        assert min(entries[1:]) > 0, device_id
