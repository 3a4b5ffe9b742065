"""``edgetrust agent`` as a subprocess serving the agent API after enrollment: mutual TLS with the
certificate it registered, the IMA simulator and the event log replay, Keylime's verifier code
polling it, restarts and start-up errors."""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from evidence.eventlog import parse_event_log, verify_event_log
from evidence.findings import Severity
from evidence.ima import parse_ascii_list, replay_pcr10
from evidence.quote import verify_quote
from evidence.tpm import TpmAlg, ak_qualified_name, parse_keylime_quote, parse_tpm2b_public
from policies.generate import policy_from_measurement_list
from tests.device.agent_support import API, ClientCa, KeylimeVerifier, make_client_ca
from tests.device.conftest import RegistrarUnderTest, TpmUnderTest, running_registrar
from tests.device.test_agent_command import AgentProcess, agent_environment, closed_port, stored_uuid
from tests.support.eventlog import EV_POST_CODE, EV_S_CRTM_VERSION, EventLogBuilder

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

SERVING = "waiting for SIGTERM or SIGINT"


@pytest.fixture
def car(tmp_path: Path) -> Path:
    directory = tmp_path / "mycar"
    directory.mkdir()
    (directory / "manage.py").write_text("print('drive')\n")
    (directory / "config.py").write_text("DRIVE_LOOP_HZ = 20\n")
    return directory


@pytest.fixture
def registrar(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> Iterator[RegistrarUnderTest]:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as running:
        yield running


def boot_log(path: Path) -> Path:
    builder = EventLogBuilder(banks=("sha1", "sha256"))
    builder.add(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0")
    builder.add(0, EV_POST_CODE, b"POST CODE")
    builder.separator(range(8))
    path.write_bytes(builder.build())
    return path


def serving_environment(tmp_path: Path, tpm: TpmUnderTest, registrar: RegistrarUnderTest,
                        client: ClientCa, car: Path, port: int) -> dict[str, str]:
    return agent_environment(
        tmp_path, tpm, registrar.url,
        agent_enable_mtls="true",
        agent_client_ca=str(client.ca_file),
        agent_contact_port=str(port),
        agent_ima_kernel_list=str(tmp_path / "no-kernel-ima"),
        agent_ima_measure_paths=str(car),
        agent_ima_remeasure_interval="0.2",
        agent_event_log=str(boot_log(tmp_path / "boot.bin")),
        agent_event_log_replay="true",
    )


@contextmanager
def running_agent(environment: dict[str, str]) -> Iterator[AgentProcess]:
    agent = AgentProcess(environment)
    try:
        agent.wait_for(SERVING)
        yield agent
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait()
        assert status == 0, agent.log


class MtlsClient:
    """Requests to the agent with the verifier's client certificate, trusting only the
    certificate that the agent registered."""

    def __init__(self, registrar: RegistrarUnderTest, uuid: str, client: ClientCa, tmp_path: Path):
        results = registrar.device(uuid).json()["results"]
        self.registered = results
        self.agent_cert = tmp_path / "registered-agent-cert.pem"
        self.agent_cert.write_text(results["mtls_cert"])
        self.cert = (str(client.client_certificate), str(client.client_key))
        self.url = f"https://{results['ip']}:{results['port']}"

    def integrity(self, nonce: str, mask: str = "0x400") -> dict[str, Any]:
        response = requests.get(f"{self.url}{API}/quotes/integrity",
                                params={"nonce": nonce, "mask": mask, "partial": "0"},
                                verify=str(self.agent_cert), cert=self.cert, timeout=30)
        assert response.status_code == 200, response.text
        results: dict[str, Any] = response.json()["results"]
        return results

    def quoted_pcrs(self, results: dict[str, Any], nonce: str) -> dict[int, bytes]:
        quote = parse_keylime_quote(results["quote"])
        ak = parse_tpm2b_public(base64.b64decode(self.registered["aik_tpm"]))
        ek = parse_tpm2b_public(base64.b64decode(self.registered["ek_tpm"]))
        check = verify_quote(ak, quote.attest_bytes, quote.signature_bytes, nonce=nonce.encode(),
                             pcr_selection=quote.attest.pcr_selection,
                             pcr_values=quote.pcr_file.values,
                             ak_qualified_name=ak_qualified_name(ek, ak))
        assert check.codes == []
        return dict(quote.pcr_file.values[TpmAlg.SHA256])


def wait_for_entries(client: MtlsClient, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        results = client.integrity("waiting")
        if len(parse_ascii_list(results["ima_measurement_list"])) >= count:
            return results
        assert time.monotonic() < deadline, "the IMA simulator did not add the entry"
        time.sleep(0.2)


def test_agent_serves_mtls_api_after_enrollment(provisioned_swtpm: TpmUnderTest,
                                                registrar: RegistrarUnderTest, car: Path,
                                                tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    environment = serving_environment(tmp_path, provisioned_swtpm, registrar, client, car,
                                      closed_port())
    with running_agent(environment) as agent:
        mtls = MtlsClient(registrar, stored_uuid(tmp_path), client, tmp_path)
        first = mtls.integrity("first", mask="0x104ff")
        first_pcrs = mtls.quoted_pcrs(first, "first")

        (car / "config.py").write_text("DRIVE_LOOP_HZ = 40\n")
        changed = wait_for_entries(mtls, 4)
        changed_pcrs = mtls.quoted_pcrs(changed, "waiting")

        without_cert = requests.Session()
        with pytest.raises(requests.exceptions.RequestException):
            without_cert.get(f"{mtls.url}/version", verify=str(mtls.agent_cert), timeout=30)

    assert mtls.registered["mtls_cert"].startswith("-----BEGIN CERTIFICATE-----")
    entries = parse_ascii_list(first["ima_measurement_list"])
    assert [entry.path for entry in entries] == [
        "boot_aggregate", str(car / "config.py"), str(car / "manage.py")]
    assert replay_pcr10(entries, "sha256") == first_pcrs[10]
    raw_log = base64.b64decode(first["mb_measurement_list"])
    findings = verify_event_log(parse_event_log(raw_log), {"sha256": first_pcrs},
                                pcr_indexes=frozenset(range(8)))
    assert [finding.code for finding in findings if finding.severity >= Severity.WARNING] == []
    changed_entries = parse_ascii_list(changed["ima_measurement_list"])
    assert changed_entries[3].path == str(car / "config.py")
    assert replay_pcr10(changed_entries, "sha256") == changed_pcrs[10]
    assert ": replayed" in agent.wait_for("UEFI event log .*: replayed")[0]
    assert "agent stopping on SIGTERM" in agent.log


def test_agent_restart_keeps_list_and_certificate(provisioned_swtpm: TpmUnderTest,
                                                  registrar: RegistrarUnderTest, car: Path,
                                                  tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    environment = serving_environment(tmp_path, provisioned_swtpm, registrar, client, car,
                                      closed_port())
    with running_agent(environment):
        first = MtlsClient(registrar, stored_uuid(tmp_path), client, tmp_path)
        before = first.integrity("before")

    (car / "manage.py").write_text("print('drive faster')\n")
    with running_agent(environment) as agent:
        second = MtlsClient(registrar, stored_uuid(tmp_path), client, tmp_path)
        after = second.integrity("after")
        pcrs = second.quoted_pcrs(after, "after")

    assert second.registered["mtls_cert"] == first.registered["mtls_cert"]
    assert second.registered["regcount"] == 2
    assert after["ima_measurement_list"].startswith(before["ima_measurement_list"])
    entries = parse_ascii_list(after["ima_measurement_list"])
    assert len(entries) == 4
    assert replay_pcr10(entries, "sha256") == pcrs[10]
    assert "already-replayed" in agent.log


def test_keylime_verifier_polls_agent_command(provisioned_swtpm: TpmUnderTest,
                                              registrar: RegistrarUnderTest, car: Path,
                                              tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    environment = serving_environment(tmp_path, provisioned_swtpm, registrar, client, car,
                                      closed_port())
    with running_agent(environment):
        mtls = MtlsClient(registrar, stored_uuid(tmp_path), client, tmp_path)
        entries = parse_ascii_list(mtls.integrity("policy")["ima_measurement_list"])
        policy = policy_from_measurement_list(entries).document
        verifier = KeylimeVerifier(agent_url=mtls.url,
                                   ak_tpm=base64.b64decode(mtls.registered["aik_tpm"]),
                                   mask="0x104ff", runtime_policy=policy,
                                   verify=str(mtls.agent_cert), cert=mtls.cert)
        try:
            first = verifier.poll()
            second = verifier.poll()
        finally:
            verifier.close()

    assert first["events"] == []
    assert first["mb_compared"] == list(range(8))
    assert first["mb_mismatch"] == []
    assert second["events"] == []
    assert second["entry"] == 3


def test_agent_plain_http_logs_warning(provisioned_swtpm: TpmUnderTest,
                                       registrar: RegistrarUnderTest, tmp_path: Path) -> None:
    port = closed_port()
    environment = agent_environment(tmp_path, provisioned_swtpm, registrar.url,
                                    agent_enable_mtls="false", agent_contact_port=str(port))
    with running_agent(environment) as agent:
        response = requests.get(f"http://127.0.0.1:{port}/version", timeout=30)
        registered = registrar.device(stored_uuid(tmp_path)).json()["results"]

    assert response.status_code == 200
    assert registered["mtls_cert"] == "disabled"
    assert agent.wait_for(r"WARNING .*agent_enable_mtls is false: serving the agent API over "
                          r"plain HTTP")


def test_agent_without_client_ca_exits(provisioned_swtpm: TpmUnderTest,
                                       registrar: RegistrarUnderTest, tmp_path: Path) -> None:
    environment = agent_environment(tmp_path, provisioned_swtpm, registrar.url,
                                    agent_enable_mtls="true")

    agent = AgentProcess(environment)

    assert agent.wait() == 1
    assert "[invalid-settings]: setting agent_client_ca is empty" in agent.log


def test_agent_port_in_use_exits(provisioned_swtpm: TpmUnderTest, registrar: RegistrarUnderTest,
                                 tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        environment = agent_environment(tmp_path, provisioned_swtpm, registrar.url,
                                        agent_contact_port=str(port))
        agent = AgentProcess(environment)
        status = agent.wait()

    assert status == 1
    assert f"[agent-api-listen-failed]: the agent API cannot listen on 127.0.0.1:{port}" in agent.log
