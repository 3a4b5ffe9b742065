"""device.enroll against the real edgetrust registrar on 127.0.0.1 and a real swtpm: RSA, ECC
P-384 and ECC P-256 devices, restarts, identity takeover, retries and malformed responses."""

from __future__ import annotations

import base64
import json
import logging
import random
import secrets
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify

from device.enroll import (
    JITTER,
    AgentConfig,
    Backoff,
    RegistrarClient,
    check_config,
    compute_auth_tag,
    enroll_device,
)
from device.errors import (
    AgentSettingsError,
    DeviceError,
    EnrollmentError,
    RegistrarRejectedError,
    RegistrarUnavailableError,
)
from device.identity import IDENTITY_FILE_NAME
from registrar.services import expected_auth_tag
from tests.device.conftest import TpmUnderTest, running_registrar, serving_on_port

pytestmark = pytest.mark.swtpm


def agent_config(state_dir: Path, registrar_url: str, *, ek_type: str = "rsa",
                 ak_type: str = "ecc", configured_uuid: str = "") -> AgentConfig:
    return AgentConfig(
        configured_uuid=configured_uuid,
        state_dir=state_dir,
        registrar_url=registrar_url,
        ek_type=ek_type,
        ak_type=ak_type,
        contact_host="127.0.0.1",
        contact_port=9002,
        retry_initial=0.05,
        retry_max=0.2,
    )


def enroll(tpm_under_test: TpmUnderTest, config: AgentConfig,
           stop: threading.Event | None = None) -> Any:
    with tpm_under_test.connect() as tpm:
        enrollment = enroll_device(tpm, config, stop or threading.Event())
        assert tpm.transient_handles() == []
        assert tpm.session_handles() == []
        return enrollment


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


# --- End to end -----------------------------------------------------------------------------


@pytest.mark.parametrize(("ek_type", "ak_type"), [("rsa", "ecc"), ("rsa", "rsa"), ("ecc", "ecc")])
def test_provisioned_device_enrolls(provisioned_swtpm: TpmUnderTest, tmp_path: Path, ek_type: str,
                                    ak_type: str) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        enrollment = enroll(provisioned_swtpm,
                            agent_config(tmp_path / "agent", registrar.url, ek_type=ek_type,
                                         ak_type=ak_type))

        response = registrar.device(enrollment.agent_id)
        assert response.status_code == 200
        results = response.json()["results"]
        assert results["aik_tpm"] == b64(enrollment.identity.ak.public)
        assert results["ek_tpm"] == b64(enrollment.ek.public)
        assert results["ekcert"] == b64(enrollment.ek.certificate)
        assert results["ip"] == "127.0.0.1"
        assert results["port"] == 9002
        assert results["mtls_cert"] == "disabled"
        assert results["regcount"] == 1
        assert registrar.device_ids() == [enrollment.agent_id]


def test_ecc_p256_device_enrolls(p256_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert p256_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [p256_swtpm.ca_bundle]) as registrar:
        enrollment = enroll(p256_swtpm, agent_config(tmp_path / "agent", registrar.url,
                                                     ek_type="ecc", ak_type="rsa"))

        assert enrollment.ek.profile.template == "EK-ECC256"
        response = registrar.device(enrollment.agent_id)
        assert response.status_code == 200
        assert response.json()["results"]["ekcert"] == b64(p256_swtpm.ecc_certificate)


def test_device_without_ek_certificate_enrolls(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with running_registrar(tmp_path / "registrar", [],
                           require_ek_certificate=False) as registrar:
        enrollment = enroll(blank_swtpm, agent_config(tmp_path / "agent", registrar.url))

        response = registrar.device(enrollment.agent_id)
        assert response.status_code == 200
        assert response.json()["results"]["ekcert"] is None


def test_missing_ek_certificate_rejected_once(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with running_registrar(tmp_path / "registrar", []) as registrar:
        with pytest.raises(RegistrarRejectedError) as raised:
            enroll(blank_swtpm, agent_config(tmp_path / "agent", registrar.url))

    assert raised.value.status == 403
    assert raised.value.registrar_code == "ek-certificate-missing"
    assert "ek-certificate-missing" in raised.value.message
    assert raised.value.device_id is not None
    assert "retrying" not in caplog.text


def test_restart_reregisters_same_identity(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        config = agent_config(tmp_path / "agent", registrar.url)
        first = enroll(provisioned_swtpm, config)

        provisioned_swtpm.swtpm.restart()
        second = enroll(provisioned_swtpm, config)

        assert second.agent_id == first.agent_id
        assert second.ak_name == first.ak_name
        response = registrar.device(first.agent_id)
        assert response.status_code == 200
        assert response.json()["results"]["regcount"] == 2


def test_new_ak_for_same_uuid_rejected(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        first = enroll(provisioned_swtpm, agent_config(tmp_path / "agent", registrar.url))
        (tmp_path / "agent" / IDENTITY_FILE_NAME).unlink()

        with pytest.raises(RegistrarRejectedError) as raised:
            enroll(provisioned_swtpm, agent_config(tmp_path / "agent", registrar.url,
                                                   configured_uuid=first.agent_id))

        assert raised.value.status == 403
        assert raised.value.registrar_code == "identity-mismatch"
        assert raised.value.device_id == first.agent_id
        still_registered = registrar.device(first.agent_id).json()["results"]
        assert still_registered["aik_tpm"] == b64(first.identity.ak.public)


# --- Retries ----------------------------------------------------------------------------------


def failing_first(count: int, status: str) -> Callable[[Any], Any]:
    """Return WSGI middleware that fails the first ``count`` requests with ``status``."""
    def middleware(wsgi_app: Any) -> Any:
        remaining = [count]

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if remaining[0] > 0:
                remaining[0] -= 1
                body = json.dumps({"code": int(status.split()[0]), "status": "overloaded",
                                   "results": {"error": {"code": "database-unavailable",
                                                         "message": "try later"}}}).encode()
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            return wsgi_app(environ, start_response)
        return app
    return middleware


def test_5xx_retried_then_enrolls(provisioned_swtpm: TpmUnderTest, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    caplog.set_level(logging.INFO)
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle],
                           middleware=failing_first(2, "503 Service Unavailable")) as registrar:
        enrollment = enroll(provisioned_swtpm, agent_config(tmp_path / "agent", registrar.url))

        assert registrar.device(enrollment.agent_id).status_code == 200

    retries = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.message]
    assert len(retries) == 2
    assert f"registrar at {registrar.url} unreachable: GET /version returned HTTP 503" in retries[0].message
    assert "database-unavailable: try later" in retries[0].message
    assert getattr(retries[0], "device_id", None) == enrollment.agent_id


def test_unreachable_registrar_retries_until_stopped(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    stop = threading.Event()
    timer = threading.Timer(0.6, stop.set)
    timer.start()

    try:
        result = enroll(blank_swtpm, agent_config(tmp_path / "agent", url), stop)
    finally:
        timer.cancel()

    assert result is None
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) >= 3
    assert f"registrar at {url} unreachable: GET /version failed: connection refused; " \
           "retrying in" in retries[0].message
    assert "(attempt 1 failed)" in retries[0].message


def test_read_timeout_is_unavailable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = RegistrarClient(url, timeout=(2.0, 0.3))

        with pytest.raises(RegistrarUnavailableError) as raised:
            client.negotiate_api_version()

    assert "GET /version timed out after 0.3 s waiting for the response" in raised.value.reason


def test_backoff_doubles_with_jitter() -> None:
    delays = Backoff(1.0, 10.0).delays(random.Random(7))

    observed = [next(delays) for _ in range(7)]

    bases = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    low, high = JITTER
    for delay, base in zip(observed, bases, strict=True):
        assert base * low <= delay <= min(base * high, 10.0)
    assert len(set(observed)) > 1


@pytest.mark.parametrize(
    ("initial", "maximum", "setting"),
    [(0.0, 1.0, "agent_retry_initial"), (-1.0, 1.0, "agent_retry_initial"),
     (2.0, 1.0, "agent_retry_max")],
)
def test_backoff_rejects_bad_settings(initial: float, maximum: float, setting: str) -> None:
    with pytest.raises(AgentSettingsError, match=setting):
        Backoff(initial, maximum)


# --- Protocol details -------------------------------------------------------------------------


def test_auth_tag_matches_registrar() -> None:
    secret = secrets.token_urlsafe(24).encode()

    assert compute_auth_tag(secret, "car-7").encode() == expected_auth_tag(secret, "car-7")


def fake_registrar(routes: dict[str, Callable[..., Any]]) -> Flask:
    app = Flask("fake-registrar")
    for rule, view in routes.items():
        app.add_url_rule(rule, rule, view, methods=["GET", "POST", "PUT"])
    return app


def test_registrar_without_version_route_gets_2_1() -> None:
    with serving_on_port(fake_registrar({})) as url:
        assert RegistrarClient(url).negotiate_api_version() == "2.1"


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ({"current_version": "2.3", "supported_versions": ["2.1", "2.3"]}, "2.3"),
        ({"current_version": "3.0", "supported_versions": ["2.1", "2.2", "3.0"]}, "2.2"),
    ],
)
def test_api_version_negotiated(offered: dict[str, Any], chosen: str) -> None:
    app = fake_registrar({"/version": lambda: jsonify({"code": 200, "status": "Success",
                                                       "results": offered})})
    with serving_on_port(app) as url:
        assert RegistrarClient(url).negotiate_api_version() == chosen


def test_incompatible_api_version_rejected() -> None:
    offered = {"current_version": "3.0", "supported_versions": ["3.0"]}
    app = fake_registrar({"/version": lambda: jsonify({"code": 200, "status": "Success",
                                                       "results": offered})})
    with serving_on_port(app) as url, pytest.raises(EnrollmentError) as raised:
        RegistrarClient(url).negotiate_api_version()

    assert raised.value.code == "registrar-api-incompatible"


@pytest.mark.parametrize(
    ("results", "problem"),
    [
        ({}, "returned no 'blob' string"),
        ({"blob": "%%%"}, "'blob' that is not base64"),
        ({"blob": base64.b64encode(b"not a credential file").decode()}, "not a tpm2-tools"),
    ],
)
def test_malformed_blob_rejected(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                 results: dict[str, Any], problem: str) -> None:
    app = fake_registrar({
        "/version": lambda: jsonify({"code": 200, "status": "Success",
                                     "results": {"current_version": "2.1"}}),
        "/v2.1/agents/<agent_id>": lambda agent_id: jsonify({"code": 200, "status": "Success",
                                                             "results": results}),
    })
    with serving_on_port(app) as url, pytest.raises(EnrollmentError) as raised:
        enroll(blank_swtpm, agent_config(tmp_path / "agent", url))

    assert raised.value.code == "registrar-response-invalid"
    assert problem in raised.value.message


def test_response_without_envelope_rejected() -> None:
    app = fake_registrar({"/version": lambda: "plain text"})
    with serving_on_port(app) as url, pytest.raises(EnrollmentError) as raised:
        RegistrarClient(url).negotiate_api_version()

    assert raised.value.code == "registrar-response-invalid"
    assert "not JSON" in raised.value.message


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"registrar_url": "ftp://registrar"}, "agent_registrar_url"),
        ({"registrar_url": "registrar:8890"}, "agent_registrar_url"),
        ({"ek_type": "dsa"}, "agent_ek_type"),
        ({"ak_type": "ecc384"}, "agent_ak_type"),
        ({"contact_port": 0}, "agent_contact_port"),
        ({"contact_host": ""}, "agent_contact_host"),
        ({"retry_initial": 0.0}, "agent_retry_initial"),
        ({"configured_uuid": "../x"}, "agent_uuid"),
    ],
)
def test_invalid_settings_rejected(tmp_path: Path, change: dict[str, Any], setting: str) -> None:
    fields = {**agent_config(tmp_path, "http://127.0.0.1:8890").__dict__, **change}

    with pytest.raises(DeviceError, match=setting) as raised:
        check_config(AgentConfig(**fields))

    assert raised.value.code in ("invalid-settings", "agent-uuid-invalid")


@pytest.fixture
def combined_bundle(tmp_path: Path, provisioned_swtpm: TpmUnderTest,
                    p256_swtpm: TpmUnderTest) -> Iterator[Path]:
    """One CA directory for both the swtpm_localca and the P-256 test CA."""
    directory = tmp_path / "combined"
    directory.mkdir()
    for bundle in (provisioned_swtpm.ca_bundle, p256_swtpm.ca_bundle):
        assert bundle is not None
        for pem_file in bundle.glob("*.pem"):
            shutil.copy(pem_file, directory / f"{bundle.name}-{pem_file.name}")
    yield directory


def test_two_devices_share_registrar(provisioned_swtpm: TpmUnderTest, p256_swtpm: TpmUnderTest,
                                     combined_bundle: Path, tmp_path: Path) -> None:
    with running_registrar(tmp_path / "registrar", [combined_bundle]) as registrar:
        rsa_device = enroll(provisioned_swtpm, agent_config(tmp_path / "rsa", registrar.url))
        ecc_device = enroll(p256_swtpm, agent_config(tmp_path / "ecc", registrar.url,
                                                      ek_type="ecc"))

        assert sorted(registrar.device_ids()) == sorted([rsa_device.agent_id,
                                                         ecc_device.agent_id])
