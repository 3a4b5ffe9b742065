"""``edgetrust agent`` with ``agent_push`` as a subprocess: it enrolls with the registrar, backs off
while the device is not in push mode, then pushes evidence that the verifier trusts, all against
the edgetrust app served on 127.0.0.1 with SQLite."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction, upgrade
from edgetrust.settings import Settings
from tests.device.conftest import TpmUnderTest, serving_on_port
from tests.device.test_agent_command import AgentProcess, agent_environment, stored_uuid
from verifier import policy_store
from verifier.fleet_sim import runtime_policy_document

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

WAIT_SECONDS = 60.0


def build_app(directory: Path, ca_bundle: Path) -> Any:
    ca_dir = directory / "ek-ca"
    ca_dir.mkdir(parents=True)
    for pem_file in ca_bundle.glob("*.pem"):
        shutil.copy(pem_file, ca_dir / pem_file.name)
    settings = Settings(data_dir=directory / "server", database_url=f"sqlite:///{directory / 'server.db'}",
                        ek_ca_dir=ca_dir, api_auth=False, verifier_push_grace_seconds=2.0)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    return create_app(settings, engine=engine), engine


def test_agent_pushes_when_push_setting_on(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    car = tmp_path / "car"
    car.mkdir()
    (car / "manage.py").write_text("print('drive')\n")
    app, engine = build_app(tmp_path / "verifier", provisioned_swtpm.ca_bundle)
    policy = runtime_policy_document({str((car / "manage.py").resolve()):
                                      hashlib.sha256((car / "manage.py").read_bytes()).digest()})
    with transaction(make_session_factory(engine)) as session:
        policy_store.put_policy(session, "car", "runtime", policy)

    with serving_on_port(app) as url:
        agent = AgentProcess(agent_environment(
            tmp_path, provisioned_swtpm, url, agent_push="true", agent_ima_measure_paths=str(car),
            agent_ima_remeasure_interval="0.2", agent_retry_max="0.5"))
        try:
            agent.wait_for("enrolled and pushing evidence")
            uuid = stored_uuid(tmp_path)
            rejected = agent.wait_for(r"WARNING .*push round failed \[push-rejected\].*"
                                      r"verifier-device-not-found")[0]

            added = requests.post(f"{url}/v1/devices/{uuid}", timeout=10,
                                  json={"runtime_policy": "car", "poll_interval": 1.0})
            enabled = requests.post(f"{url}/v1/push/{uuid}", timeout=10)
            deadline = time.monotonic() + WAIT_SECONDS
            while time.monotonic() < deadline:
                verdict = requests.get(f"{url}/v1/devices/{uuid}/verdict", timeout=10).json()
                if verdict["status"] == "trusted":
                    break
                time.sleep(0.2)
        finally:
            agent.kill()
    engine.dispose()

    assert added.status_code == 201, added.text
    assert enabled.status_code == 201, enabled.text
    assert verdict["status"] == "trusted", agent.log
    assert f"[device={uuid}]" in rejected
    assert "serving the agent API" not in agent.log
