"""AgentService, the evidence side that ``edgetrust agent`` starts after enrollment: which IMA
list it serves, re-measuring on an interval, and its settings checks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from device.agent_service import AgentService, AgentServiceConfig, check_service_config
from device.errors import AgentSettingsError
from device.tpm import DeviceTpm
from evidence.ima import parse_ascii_list
from tests.device.agent_support import API, create_keys
from tests.device.conftest import TpmUnderTest

pytestmark = pytest.mark.swtpm

KERNEL_LINE = ("10 0000000000000000000000000000000000000000 ima-ng "
               "sha256:0000000000000000000000000000000000000000000000000000000000000000 "
               "boot_aggregate\n")


def base_config(tmp_path: Path, **changes: Any) -> AgentServiceConfig:
    config = AgentServiceConfig(
        state_dir=tmp_path / "state", host="127.0.0.1", port=0, enable_mtls=False,
        client_ca=None, ima_kernel_list=tmp_path / "no-kernel-list", ima_measure_paths=(),
        ima_remeasure_interval=0.0, event_log=None, event_log_replay=False)
    return dataclasses.replace(config, **changes)


@contextmanager
def running_service(tpm: TpmUnderTest, config: AgentServiceConfig) -> Iterator[AgentService]:
    with DeviceTpm.connect(tpm.tcti) as device:
        keys = create_keys(device)
        service = AgentService(device, "service-test", keys.ek, keys.ak, config)
        service.start()
        try:
            yield service
        finally:
            service.stop()
            service.stop()


def integrity(service: AgentService, nonce: str = "abc") -> dict[str, Any]:
    response = requests.get(f"{service.url}{API}/quotes/integrity", timeout=30,
                            params={"nonce": nonce, "mask": "0x400", "partial": "1"})
    assert response.status_code == 200, response.text
    results: dict[str, Any] = response.json()["results"]
    return results


def test_kernel_list_preferred_over_simulator(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    kernel_list = tmp_path / "ascii_runtime_measurements"
    kernel_list.write_text(KERNEL_LINE)
    car = tmp_path / "car"
    car.mkdir()
    (car / "manage.py").write_text("print('drive')\n")
    config = base_config(tmp_path, ima_kernel_list=kernel_list, ima_measure_paths=(car,))

    with running_service(blank_swtpm, config) as service:
        results = integrity(service)

    assert results["ima_measurement_list"] == KERNEL_LINE
    assert not config.simulated_ima_list.exists()


def test_no_ima_list_without_source(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with running_service(blank_swtpm, base_config(tmp_path)) as service:
        results = integrity(service)

    assert "ima_measurement_list" not in results
    assert "ima_measurement_list_entry" not in results


def test_remeasure_interval_adds_entries(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    car = tmp_path / "car"
    car.mkdir()
    (car / "manage.py").write_text("print('drive')\n")
    config = base_config(tmp_path, ima_measure_paths=(car,), ima_remeasure_interval=0.1)

    with running_service(blank_swtpm, config) as service:
        (car / "model.tflite").write_bytes(b"weights")
        deadline = time.monotonic() + 20
        while True:
            entries = parse_ascii_list(integrity(service)["ima_measurement_list"])
            if len(entries) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    assert [entry.path for entry in entries][-1] == str(car / "model.tflite")


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"enable_mtls": True}, "agent_client_ca"),
        ({"enable_mtls": True, "client_ca": Path("/nonexistent/ca.pem")}, "agent_client_ca"),
        ({"ima_remeasure_interval": -1.0}, "agent_ima_remeasure_interval"),
        ({"event_log_replay": True}, "agent_event_log_replay"),
    ],
)
def test_service_settings_checked(tmp_path: Path, changes: dict[str, Any], setting: str) -> None:
    with pytest.raises(AgentSettingsError) as raised:
        check_service_config(base_config(tmp_path, **changes))

    assert raised.value.code == "invalid-settings"
    assert setting in raised.value.message
