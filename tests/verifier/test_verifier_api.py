"""Tests for the verifier admin API (verifier.api) over real HTTP on 127.0.0.1, on SQLite and
PostgreSQL: adding devices, validation errors naming the field, pause, resume, removal,
verdicts with their expiry, and attestation listings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import make_session_factory, transaction
from edgetrust.settings import Settings
from registrar.models import RegisteredDevice
from tests.support.server import ServerThread, serving
from tests.verifier.conftest import POLL_INTERVAL, FakeClock, make_poller, register, store_runtime_policy
from verifier import policy_store
from verifier.api import VerifierService
from verifier.fleet_sim import Fleet, SimulatedDevice, make_files
from verifier.tokens import Scope, create_token


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(6)


@pytest.fixture
def device(files: dict[str, bytes]) -> SimulatedDevice:
    return SimulatedDevice("api-device", files=dict(files), entries_per_quote=1)


@pytest.fixture
def fleet(device: SimulatedDevice) -> Iterator[Fleet]:
    with Fleet([device]) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(
    tmp_path: Path, database_url: str, migrated_engine: Engine, clock: FakeClock
) -> Iterator[ServerThread]:
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    app = create_app(settings, engine=migrated_engine)
    service = app.extensions["edgetrust"].extras["verifier"]
    assert isinstance(service, VerifierService)
    service.clock = clock
    with serving(app) as running:
        yield running


@pytest.fixture
def stored(
    sessions: sessionmaker[Session], fleet: Fleet, device: SimulatedDevice, files: dict[str, bytes]
) -> None:
    store_runtime_policy(sessions, files)
    register(sessions, device)


def new_token(engine: Engine, scope: Scope) -> str:
    with transaction(make_session_factory(engine)) as session:
        _, token = create_token(session, f"test-{uuid.uuid4().hex[:8]}", scope, now=datetime.now(UTC))
    return token


@pytest.fixture
def http(migrated_engine: Engine) -> Iterator[requests.Session]:
    """An HTTP client with an admin API token."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {new_token(migrated_engine, Scope.ADMIN)}"
        yield session


@dataclass
class Api:
    """The verifier API of a running server, called with an admin token."""

    url: str
    http: requests.Session

    def add(self, device_id: str, body: Any) -> requests.Response:
        return self.http.post(f"{self.url}/v1/devices/{device_id}", json=body, timeout=10)

    def get(self, path: str) -> requests.Response:
        return self.http.get(f"{self.url}{path}", timeout=10)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(f"{self.url}{path}", timeout=10, **kwargs)

    def delete(self, path: str) -> requests.Response:
        return self.http.delete(f"{self.url}{path}", timeout=10)


@pytest.fixture
def api(server: ServerThread, http: requests.Session) -> Api:
    return Api(server.url, http)


def error_of(response: requests.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert isinstance(error, dict)
    return error


def add_body(device: SimulatedDevice, **fields: Any) -> dict[str, Any]:
    return {
        "cloudagent_ip": "127.0.0.1",
        "cloudagent_port": device.port,
        "runtime_policy": "fleet",
        "poll_interval": POLL_INTERVAL,
        **fields,
    }


# --- adding ---------------------------------------------------------------------------------


def test_api_adds_registered_device(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.add(device.device_id, add_body(device))

    assert response.status_code == 201
    body = response.json()
    assert body["device_id"] == device.device_id
    assert body["cloudagent_ip"] == "127.0.0.1"
    assert body["cloudagent_port"] == device.port
    assert body["runtime_policy"] == "fleet"
    assert body["mb_policy"] is None
    assert body["poll_interval"] == POLL_INTERVAL
    assert body["paused"] is False
    assert body["verdict"]["status"] == "unknown"
    assert body["verdict"]["reasons"][0]["code"] == "not-attested-yet"
    assert body["state"]["ima_next_entry"] is None

    shown = api.get(f"/v1/devices/{device.device_id}")

    assert shown.status_code == 200
    assert shown.json()["device_id"] == device.device_id


def test_api_defaults_contact_to_registrar(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.add(device.device_id, {})

    assert response.status_code == 201
    assert response.json()["cloudagent_port"] == device.port
    assert response.json()["poll_interval"] == 10.0
    assert response.json()["runtime_policy"] is None


def test_api_rejects_unregistered_device(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.add("never-registered", add_body(device))

    assert response.status_code == 404
    assert error_of(response)["code"] == "device-not-found"


def test_api_rejects_inactive_device(
    api: Api, sessions: sessionmaker[Session], stored: None, device: SimulatedDevice
) -> None:
    with transaction(sessions) as session:
        session.execute(update(RegisteredDevice).values(active=False))

    response = api.add(device.device_id, add_body(device))

    assert response.status_code == 409
    assert error_of(response)["code"] == "device-not-active"


def test_api_rejects_second_add(api: Api, stored: None, device: SimulatedDevice) -> None:
    api.add(device.device_id, add_body(device))

    response = api.add(device.device_id, add_body(device))

    assert response.status_code == 409
    assert error_of(response)["code"] == "device-already-added"


def test_api_rejects_unknown_policy(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.add(device.device_id, add_body(device, pcr_policy="missing"))

    assert response.status_code == 404
    assert error_of(response)["code"] == "policy-not-found"
    assert error_of(response)["field"] == "pcr_policy"


def test_api_rejects_policy_of_other_kind(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.add(device.device_id, add_body(device, mb_policy="fleet"))

    assert response.status_code == 400
    assert error_of(response)["field"] == "mb_policy"
    assert "runtime policy" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cloudagent_port": "x"}, "cloudagent_port"),
        ({"cloudagent_port": 70000}, "cloudagent_port"),
        ({"cloudagent_ip": "not a host!"}, "cloudagent_ip"),
        ({"cloudagent_ip": 7}, "cloudagent_ip"),
        ({"poll_interval": -1}, "poll_interval"),
        ({"poll_interval": "fast"}, "poll_interval"),
        ({"poll_interval": True}, "poll_interval"),
        ({"runtime_policy": "bad name!"}, "runtime_policy"),
        ({"runtime_policy": 3}, "runtime_policy"),
    ],
)
def test_api_validation_names_field(
    api: Api, stored: None, device: SimulatedDevice, fields: dict[str, Any], field: str
) -> None:
    response = api.add(device.device_id, add_body(device, **fields))

    assert response.status_code == 400
    assert error_of(response)["field"] == field


def test_api_rejects_body_not_json(api: Api, stored: None, device: SimulatedDevice) -> None:
    response = api.post(f"/v1/devices/{device.device_id}", data=b"{")

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-json"


def test_api_rejects_invalid_device_id(api: Api) -> None:
    response = api.add("bad id", {})

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-device-id"
    assert error_of(response)["field"] == "device_id"


def test_api_needs_contact_address(
    api: Api, sessions: sessionmaker[Session], stored: None, device: SimulatedDevice
) -> None:
    with transaction(sessions) as session:
        session.execute(update(RegisteredDevice).values(ip=None))

    response = api.add(device.device_id, {"cloudagent_port": device.port})

    assert response.status_code == 400
    assert error_of(response)["code"] == "missing-field"
    assert error_of(response)["field"] == "cloudagent_ip"


# --- pause, resume, remove ----------------------------------------------------------------------


def test_api_pauses_and_resumes(api: Api, stored: None, device: SimulatedDevice) -> None:
    api.add(device.device_id, add_body(device))

    paused = api.post(f"/v1/devices/{device.device_id}/pause")
    resumed = api.post(f"/v1/devices/{device.device_id}/resume")

    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    assert paused.json()["next_attestation_at"] is None
    assert resumed.status_code == 200
    assert resumed.json()["paused"] is False
    assert resumed.json()["next_attestation_at"] is not None


def test_api_removes_device(api: Api, stored: None, device: SimulatedDevice) -> None:
    api.add(device.device_id, add_body(device))

    removed = api.delete(f"/v1/devices/{device.device_id}")
    shown = api.get(f"/v1/devices/{device.device_id}")
    again = api.delete(f"/v1/devices/{device.device_id}")

    assert removed.status_code == 204
    assert shown.status_code == 404
    assert error_of(shown)["code"] == "verifier-device-not-found"
    assert again.status_code == 404


def test_registrar_delete_removes_verifier_device(
    api: Api, sessions: sessionmaker[Session], stored: None, device: SimulatedDevice
) -> None:
    api.add(device.device_id, add_body(device))

    with transaction(sessions) as session:
        session.execute(delete(RegisteredDevice).where(RegisteredDevice.device_id == device.device_id))

    assert api.get(f"/v1/devices/{device.device_id}").status_code == 404


def test_policy_in_use_cannot_be_deleted(
    api: Api, sessions: sessionmaker[Session], stored: None, device: SimulatedDevice
) -> None:
    api.add(device.device_id, add_body(device))

    with pytest.raises(policy_store.PolicyInUse) as raised, transaction(sessions) as session:
        policy_store.delete(session, "fleet")

    assert raised.value.device_ids == (device.device_id,)


# --- verdicts and attestations --------------------------------------------------------------------


def test_api_verdict_trusted_then_expires(
    api: Api,
    sessions: sessionmaker[Session],
    stored: None,
    device: SimulatedDevice,
    clock: FakeClock,
) -> None:
    api.add(device.device_id, add_body(device))
    make_poller(sessions, clock).run_once()

    fresh = api.get(f"/v1/devices/{device.device_id}/verdict").json()
    clock.advance(3 * POLL_INTERVAL - 1)
    still = api.get(f"/v1/devices/{device.device_id}/verdict").json()
    clock.advance(1)
    expired = api.get(f"/v1/devices/{device.device_id}/verdict").json()

    assert fresh["status"] == "trusted"
    assert fresh["policies"][0]["name"] == "fleet"
    assert fresh["policies"][0]["version"] == 1
    assert fresh["expires_at"] is not None
    assert still["status"] == "trusted"
    assert expired["status"] == "unknown"
    assert expired["reasons"][0]["code"] == "verdict-expired"
    assert expired["verdict_id"] == fresh["verdict_id"]


def test_api_lists_attestations_with_findings(
    api: Api,
    sessions: sessionmaker[Session],
    stored: None,
    device: SimulatedDevice,
    clock: FakeClock,
) -> None:
    api.add(device.device_id, add_body(device))
    poller = make_poller(sessions, clock)
    poller.run_once()
    device.measure("/usr/bin/unexpected", b"\x01" * 32)
    clock.advance(POLL_INTERVAL)
    poller.run_once()

    listed = api.get(f"/v1/devices/{device.device_id}/attestations?limit=1")
    everything = api.get(f"/v1/devices/{device.device_id}/attestations")
    shown = api.get(f"/v1/devices/{device.device_id}").json()

    assert listed.status_code == 200
    newest = listed.json()["attestations"]
    assert len(newest) == 1
    assert newest[0]["status"] == "untrusted"
    assert [f["code"] for f in newest[0]["findings"]] == ["ima-path-not-in-policy"]
    assert newest[0]["findings"][0]["context"]["path"] == "/usr/bin/unexpected"
    assert newest[0]["nonce"] == device.last_request["nonce"]
    assert newest[0]["evidence"]["hash_alg"] == "sha256"
    assert [a["status"] for a in everything.json()["attestations"]] == ["untrusted", "trusted"]
    assert shown["verdict"]["status"] == "untrusted"
    assert shown["state"]["boot_session"] == 0
    assert shown["state"]["pcr_bank"] == "sha256"
    assert shown["state"]["ima_next_entry"] > 0


@pytest.mark.parametrize("limit", ["0", "1001", "many"])
def test_api_rejects_bad_limit(api: Api, stored: None, device: SimulatedDevice, limit: str) -> None:
    api.add(device.device_id, add_body(device))

    response = api.get(f"/v1/devices/{device.device_id}/attestations?limit={limit}")

    assert response.status_code == 400
    assert error_of(response)["field"] == "limit"


def test_api_unknown_device_verdict_not_found(api: Api) -> None:
    response = api.get("/v1/devices/nobody/verdict")

    assert response.status_code == 404
    assert error_of(response)["code"] == "verifier-device-not-found"


def test_api_trusted_expiry_uses_device_interval(
    api: Api,
    sessions: sessionmaker[Session],
    stored: None,
    device: SimulatedDevice,
    clock: FakeClock,
) -> None:
    api.add(device.device_id, add_body(device, poll_interval=2.0))
    make_poller(sessions, clock).run_once()

    verdict = api.get(f"/v1/devices/{device.device_id}/verdict").json()

    assert verdict["status"] == "trusted"
    expires = clock.now + timedelta(seconds=6)
    assert verdict["expires_at"] == expires.isoformat()


def test_api_needs_admin_token(
    api: Api, migrated_engine: Engine, stored: None, device: SimulatedDevice
) -> None:
    reader = {"Authorization": f"Bearer {new_token(migrated_engine, Scope.READ)}"}
    url = f"{api.url}/v1/devices/{device.device_id}"

    anonymous = requests.post(url, json={}, timeout=10)
    read_only = requests.post(url, json={}, headers=reader, timeout=10)
    api.add(device.device_id, add_body(device))
    verdict = requests.get(f"{url}/verdict", headers=reader, timeout=10)

    assert anonymous.status_code == 401
    assert read_only.status_code == 403
    assert verdict.status_code == 200
