"""Push mode end to end: the agent's evidence service on swtpm with the IMA simulator pushes to the
edgetrust app served on 127.0.0.1, on SQLite and PostgreSQL.

The device side runs as ``edgetrust agent`` runs it after enrollment: ``AgentService`` with a
push URL. The registrar row is written directly, with the AK and EK made on swtpm. The push
interval is short and the tests run on the real clock, so a missed deadline is a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from device.agent_service import AgentService, AgentServiceConfig, check_service_config
from device.errors import AgentSettingsError
from device.ima_sim import MeasurementListFile
from device.push import PushClient, PushError, collect_evidence
from device.tpm import DeviceTpm
from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction
from edgetrust.settings import Settings
from registrar.models import RegisteredDevice
from tests.device.agent_support import AgentKeys, AgentStack, agent_stack, create_keys
from tests.device.conftest import TpmUnderTest
from tests.support.server import ServerThread, serving
from verifier import policy_store
from verifier.fleet_sim import runtime_policy_document

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

PUSH_INTERVAL = 3.0
GRACE = 2.0
CHALLENGE_SECONDS = 2.0
WAIT_SECONDS = 30.0


# --- the verifier ---------------------------------------------------------------------------------


@contextmanager
def verifier_server(engine: Engine, data_dir: Path) -> Iterator[ServerThread]:
    settings = Settings(data_dir=data_dir, api_auth=False,
                        database_url=engine.url.render_as_string(hide_password=False),
                        verifier_push_grace_seconds=GRACE,
                        verifier_push_challenge_seconds=CHALLENGE_SECONDS)
    with serving(create_app(settings, engine=engine)) as server:
        yield server


@dataclass
class Car:
    """A DonkeyCar directory whose files the IMA simulator measures."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Car:
        directory.mkdir()
        (directory / "manage.py").write_text("print('drive')\n")
        (directory / "config.py").write_text("THROTTLE = 0.3\n")
        return cls(directory)

    def policy(self) -> dict[str, Any]:
        files = {str(path.resolve()): hashlib.sha256(path.read_bytes()).digest()
                 for path in sorted(self.directory.iterdir())}
        return runtime_policy_document(files)


def enroll_in_verifier(engine: Engine, server: ServerThread, agent_id: str, keys: AgentKeys,
                       car: Car) -> None:
    """Store the registrar row as enrollment would and the car's policy, then add the device to
    the verifier in push mode."""
    sessions = make_session_factory(engine)
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        session.add(RegisteredDevice(
            device_id=agent_id, ek_tpm=keys.ek.public, ekcert=None, aik_tpm=keys.ak.public,
            ip="10.0.0.99", port=9002, mtls_cert="disabled", regcount=1, active=True,
            failed_activations=0, created_at=now, registered_at=now, activated_at=now,
        ))
        policy_store.put_policy(session, "car", "runtime", car.policy())
    added = requests.post(f"{server.url}/v1/devices/{agent_id}", timeout=10,
                          json={"runtime_policy": "car", "poll_interval": PUSH_INTERVAL})
    assert added.status_code == 201, added.text
    enabled = requests.post(f"{server.url}/v1/push/{agent_id}", timeout=10)
    assert enabled.status_code == 201, enabled.text


def verdict(server: ServerThread, agent_id: str) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{server.url}/v1/devices/{agent_id}/verdict", timeout=10).json()
    return body


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_for_status(server: ServerThread, agent_id: str, status: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(verdict(server, agent_id))
        return seen["status"] == status

    wait_for(reached, f"verdict {status}; last seen {seen}")
    return seen


# --- the device ---------------------------------------------------------------------------------


def service_config(state_dir: Path, car: Car, push_url: str) -> AgentServiceConfig:
    return AgentServiceConfig(
        state_dir=state_dir, host="127.0.0.1", port=0, enable_mtls=True, client_ca=None,
        ima_kernel_list=state_dir / "no-kernel-list", ima_measure_paths=(car.directory,),
        ima_remeasure_interval=0.2, event_log=None, event_log_replay=False,
        push_url=push_url, retry_initial=0.2, retry_max=1.0)


@contextmanager
def pushing_agent(device: DeviceTpm, agent_id: str, keys: AgentKeys,
                  config: AgentServiceConfig) -> Iterator[AgentService]:
    service = AgentService(device, agent_id, keys.ek, keys.ak, config)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    from edgetrust.db import upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


# --- tests --------------------------------------------------------------------------------------


def test_push_agent_trusted_untrusted_unknown(blank_swtpm: TpmUnderTest, engine: Engine,
                                              database_url: str, tmp_path: Path) -> None:
    agent_id = str(uuid.uuid4())
    car = Car.create(tmp_path / "car")
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        keys = create_keys(device)
        with verifier_server(engine, tmp_path / "server") as server:
            enroll_in_verifier(engine, server, agent_id, keys, car)
            config = service_config(tmp_path / "agent", car, server.url)

            # Good evidence: trusted.
            with pushing_agent(device, agent_id, keys, config):
                trusted = wait_for_status(server, agent_id, "trusted")
            last_push = requests.get(f"{server.url}/v1/push/{agent_id}", timeout=10).json()

        # The agent stopped pushing and the verifier restarts: the deadline comes from the
        # stored times alone.
        restarted_engine = make_engine(database_url)
        try:
            with verifier_server(restarted_engine, tmp_path / "restarted") as restarted:
                before_deadline = verdict(restarted, agent_id)
                expired = wait_for_status(restarted, agent_id, "unknown")
                reached_at = datetime.now(UTC)

                # Pushing again: trusted; then a file changes and IMA measures it again.
                config = dataclasses.replace(config, push_url=restarted.url)
                with pushing_agent(device, agent_id, keys, config):
                    wait_for_status(restarted, agent_id, "trusted")
                    (car.directory / "config.py").write_text("THROTTLE = 1.0\n")
                    untrusted = wait_for_status(restarted, agent_id, "untrusted")
        finally:
            restarted_engine.dispose()

    assert trusted["reasons"] == []
    assert before_deadline["status"] == "trusted"
    assert [reason["code"] for reason in expired["reasons"]] == ["verdict-expired"]
    assert reached_at >= datetime.fromisoformat(last_push["late_after"])
    assert [reason["code"] for reason in untrusted["reasons"]] == ["ima-digest-not-allowed"]


def test_push_challenge_single_use_on_swtpm(blank_swtpm: TpmUnderTest, engine: Engine,
                                            tmp_path: Path) -> None:
    agent_id = str(uuid.uuid4())
    car = Car.create(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "agent", measure=[car.directory]) as stack, \
            verifier_server(engine, tmp_path / "server") as server:
        enroll_in_verifier(engine, server, agent_id, stack.keys, car)
        client = PushClient(server.url, agent_id)

        challenge = client.challenge()
        evidence = collect_evidence(stack.quoter, challenge, _ima_list(stack), None, None)
        receipt = client.send(challenge, evidence)
        with pytest.raises(PushError) as reused:
            client.send(challenge, evidence)

        late = client.challenge()
        late_evidence = collect_evidence(stack.quoter, late, _ima_list(stack), None, None)
        time.sleep(CHALLENGE_SECONDS + 0.2)
        with pytest.raises(PushError) as expired:
            client.send(late, late_evidence)
        client.close()

    assert receipt.status == "trusted"
    assert receipt.next_challenge_in == PUSH_INTERVAL
    assert reused.value.code == "push-rejected"
    assert reused.value.verifier_code == "push-challenge-used"
    assert expired.value.verifier_code == "push-challenge-expired"


def test_push_rejected_in_pull_mode(blank_swtpm: TpmUnderTest, engine: Engine, tmp_path: Path) -> None:
    agent_id = str(uuid.uuid4())
    car = Car.create(tmp_path / "car")
    with agent_stack(blank_swtpm.tcti, tmp_path / "agent", measure=[car.directory]) as stack, \
            verifier_server(engine, tmp_path / "server") as server:
        enroll_in_verifier(engine, server, agent_id, stack.keys, car)
        requests.delete(f"{server.url}/v1/push/{agent_id}", timeout=10)
        client = PushClient(server.url, agent_id)

        with pytest.raises(PushError) as pull_mode:
            client.challenge()
        with pytest.raises(PushError) as unknown_device:
            PushClient(server.url, "not-added").challenge()
        client.close()

    assert pull_mode.value.verifier_code == "device-not-in-push-mode"
    assert unknown_device.value.verifier_code == "verifier-device-not-found"


def test_push_client_unreachable_verifier() -> None:
    client = PushClient("http://127.0.0.1:9", "car")

    with pytest.raises(PushError) as raised:
        client.challenge()

    assert raised.value.code == "push-verifier-unavailable"


def test_push_loop_backs_off_until_push_mode(blank_swtpm: TpmUnderTest, engine: Engine,
                                             tmp_path: Path) -> None:
    agent_id = str(uuid.uuid4())
    car = Car.create(tmp_path / "car")
    with DeviceTpm.connect(blank_swtpm.tcti) as device:
        keys = create_keys(device)
        with verifier_server(engine, tmp_path / "server") as server:
            enroll_in_verifier(engine, server, agent_id, keys, car)
            requests.delete(f"{server.url}/v1/push/{agent_id}", timeout=10)
            config = service_config(tmp_path / "agent", car, server.url)

            with pushing_agent(device, agent_id, keys, config):
                time.sleep(1.0)  # rejected rounds, retried with backoff
                before = verdict(server, agent_id)
                requests.post(f"{server.url}/v1/push/{agent_id}", timeout=10)
                after = wait_for_status(server, agent_id, "trusted")

    assert before["status"] == "unknown"
    assert after["status"] == "trusted"


def _ima_list(stack: AgentStack) -> MeasurementListFile:
    assert stack.simulator is not None
    return MeasurementListFile(stack.simulator.list_path)


def test_push_mode_needs_no_client_ca(tmp_path: Path) -> None:
    config = service_config(tmp_path, Car(tmp_path), "http://127.0.0.1:8890")

    check_service_config(config)
    with pytest.raises(AgentSettingsError) as pull_mode:
        check_service_config(dataclasses.replace(config, push_url=""))

    assert "agent_client_ca" in pull_mode.value.message
