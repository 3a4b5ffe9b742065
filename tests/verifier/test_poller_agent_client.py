"""Tests for verifier.agent_client: mutual TLS with the agent's registered certificate pinned,
and the parsing of Keylime quote responses. The agents are verifier.fleet_sim endpoints on
127.0.0.1 serving TLS with a self-signed certificate each, as Keylime agents do."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.verifier.conftest import (
    FakeClock,
    add_to_verifier,
    make_poller,
    register,
    store_runtime_policy,
)
from verifier.agent_client import AgentClient, AgentContact, ClientIdentity, parse_quote_response
from verifier.api import VerifierService
from verifier.errors import AgentError, AgentResponseInvalid, AgentUnreachable
from verifier.fleet_sim import (
    Fleet,
    SimulatedDevice,
    TlsIdentity,
    issue_identity,
    make_files,
    self_signed_identity,
)


@pytest.fixture(scope="module")
def client_ca() -> TlsIdentity:
    return self_signed_identity("test verifier CA", ca=True)


@pytest.fixture(scope="module")
def device() -> SimulatedDevice:
    return SimulatedDevice("tls-device", files=make_files(4))


@pytest.fixture(scope="module")
def tls_fleet(
    tmp_path_factory: pytest.TempPathFactory, device: SimulatedDevice, client_ca: TlsIdentity
) -> Iterator[Fleet]:
    with Fleet([device], tls_dir=tmp_path_factory.mktemp("tls"), client_ca_pem=client_ca.cert_pem) as fleet:
        yield fleet


def identity_files(directory: Path, identity: TlsIdentity) -> ClientIdentity:
    cert, key = directory / "client.pem", directory / "client.key"
    cert.write_bytes(identity.cert_pem)
    key.write_bytes(identity.key_pem)
    return ClientIdentity(cert, key)


@pytest.fixture
def trusted_identity(tmp_path: Path, client_ca: TlsIdentity) -> ClientIdentity:
    return identity_files(tmp_path, issue_identity("verifier", client_ca))


def contact(device: SimulatedDevice, cert: str | None) -> AgentContact:
    return AgentContact(device.device_id, "127.0.0.1", device.port, cert)


def request(client: AgentClient, target: AgentContact, ima_ml_entry: int = 0) -> object:
    return client.request_quote(target, nonce="abcdefghij0123456789", mask="0x400", ima_ml_entry=ima_ml_entry)


# --- mutual TLS -------------------------------------------------------------------------------


def test_client_accepts_registered_certificate(
    tls_fleet: Fleet, device: SimulatedDevice, trusted_identity: ClientIdentity
) -> None:
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)

    evidence = client.request_quote(
        contact(device, tls_fleet.mtls_certs[device.device_id]),
        nonce="abcdefghij0123456789",
        mask="0x400",
        ima_ml_entry=0,
    )

    assert evidence.quote.startswith("r")
    assert evidence.hash_alg == "sha256"
    assert evidence.ima_start_index == 0
    assert device.last_request["nonce"] == "abcdefghij0123456789"
    client.close()


def test_client_trusts_only_pinned_certificate(
    tls_fleet: Fleet, device: SimulatedDevice, trusted_identity: ClientIdentity
) -> None:
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)
    target = contact(device, tls_fleet.mtls_certs[device.device_id])
    request(client, target)

    session = client._session(target)
    adapter = session.get_adapter(f"https://127.0.0.1:{device.port}/")
    store = adapter._context.cert_store_stats()  # type: ignore[attr-defined]

    # The default CA bundle of requests would add a hundred or more certificates.
    assert store["x509"] == 1
    client.close()


def test_client_rejects_other_server_certificate(
    tls_fleet: Fleet, device: SimulatedDevice, trusted_identity: ClientIdentity
) -> None:
    other = self_signed_identity(device.device_id).cert_pem.decode("ascii")
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)

    with pytest.raises(AgentUnreachable, match="TLS handshake") as raised:
        request(client, contact(device, other))

    assert raised.value.code == "agent-unreachable"


def test_agent_rejects_untrusted_client(tmp_path: Path, tls_fleet: Fleet, device: SimulatedDevice) -> None:
    stranger = identity_files(tmp_path, self_signed_identity("not the verifier"))
    client = AgentClient(mtls=True, identity=stranger, timeout=5.0)

    with pytest.raises(AgentUnreachable) as raised:
        request(client, contact(device, tls_fleet.mtls_certs[device.device_id]))

    assert raised.value.code == "agent-unreachable"


def test_client_needs_registered_certificate(
    trusted_identity: ClientIdentity, device: SimulatedDevice
) -> None:
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)

    with pytest.raises(AgentError) as raised:
        request(client, contact(device, "disabled"))

    assert raised.value.code == "agent-mtls-certificate-missing"


def test_client_rejects_unusable_certificate(
    trusted_identity: ClientIdentity, device: SimulatedDevice
) -> None:
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)

    with pytest.raises(AgentError) as raised:
        request(client, contact(device, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))

    assert raised.value.code == "agent-mtls-certificate-invalid"


def test_mtls_client_needs_identity() -> None:
    with pytest.raises(ValueError, match="client certificate"):
        AgentClient(mtls=True, identity=None, timeout=1.0)


def test_poller_attests_over_mtls(
    sessions: sessionmaker[Session],
    tls_fleet: Fleet,
    device: SimulatedDevice,
    trusted_identity: ClientIdentity,
) -> None:
    store_runtime_policy(sessions, device.files)
    register(sessions, device, mtls_cert=tls_fleet.mtls_certs[device.device_id])
    clock = FakeClock()
    add_to_verifier(VerifierService(sessions, default_poll_interval=10.0, clock=clock), device)
    device.requests.clear()
    client = AgentClient(mtls=True, identity=trusted_identity, timeout=5.0)

    poller = make_poller(sessions, clock, client=client)
    poller.run_once()

    assert poller.stats["attestations_trusted"] == 1
    assert len(device.requests) == 1


# --- plain HTTP failures ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_client_reports_closed_port() -> None:
    client = AgentClient(mtls=False, identity=None, timeout=2.0)

    with pytest.raises(AgentUnreachable, match="cannot reach"):
        request(client, AgentContact("gone", "127.0.0.1", free_port(), None))


def test_client_reports_timeout() -> None:
    slow = SimulatedDevice("slow", files=make_files(2), answer_delay=3.0)
    client = AgentClient(mtls=False, identity=None, timeout=0.5)

    with Fleet([slow]), pytest.raises(AgentUnreachable, match="did not respond within 0.5 s"):
        request(client, contact(slow, None))


def test_client_reports_reset_connection() -> None:
    down = SimulatedDevice("down", files=make_files(2), reachable=False)
    client = AgentClient(mtls=False, identity=None, timeout=2.0)

    with Fleet([down]), pytest.raises(AgentUnreachable):
        request(client, contact(down, None))


# --- response parsing ----------------------------------------------------------------------------


def body(results: object, code: int = 200) -> bytes:
    return json.dumps({"code": code, "status": "Success", "results": results}).encode()


@pytest.mark.parametrize(
    ("status", "raw", "message"),
    [
        (500, body({}, 500), "HTTP 500"),
        (200, b"<html>", "not JSON"),
        (200, b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (200, b"[]", "JSON list"),
        (200, body([]), "no 'results' object"),
        (200, body({"hash_alg": "sha256"}), "'quote' is missing"),
        (200, body({"quote": "r", "hash_alg": 5}), "'hash_alg' is missing or not a string"),
        (200, body({"quote": "r", "hash_alg": "sha256", "ima_measurement_list_entry": -1}), "non-negative"),
        (200, body({"quote": "r", "hash_alg": "sha256", "ima_measurement_list": 3}), "not a string"),
        (200, body({"quote": "r", "hash_alg": "sha256", "mb_measurement_list": "%%"}), "not base64"),
    ],
)
def test_response_parser_rejects_malformed(status: int, raw: bytes, message: str) -> None:
    with pytest.raises(AgentResponseInvalid, match=message) as raised:
        parse_quote_response(status, raw)

    assert raised.value.code == "agent-response-invalid"


def test_response_parser_reads_all_fields() -> None:
    results = {
        "quote": "rAAA",
        "hash_alg": "sha384",
        "enc_alg": "rsa",
        "sign_alg": "rsassa",
        "ima_measurement_list": "10 x ima-ng y z\n",
        "ima_measurement_list_entry": 7,
        "mb_measurement_list": "AAEC",
        "boottime": 1700000000,
    }

    evidence = parse_quote_response(200, body(results))

    assert evidence.quote == "rAAA"
    assert evidence.hash_alg == "sha384"
    assert evidence.ima_measurement_list == "10 x ima-ng y z\n"
    assert evidence.ima_start_index == 7
    assert evidence.mb_measurement_list == b"\x00\x01\x02"
    assert evidence.boottime == 1700000000


def test_client_rejects_oversized_response(monkeypatch: pytest.MonkeyPatch) -> None:
    big = SimulatedDevice("big", files=make_files(20))
    client = AgentClient(mtls=False, identity=None, timeout=5.0)
    monkeypatch.setattr("verifier.agent_client.MAX_RESPONSE_BYTES", 1000)

    with Fleet([big]), pytest.raises(AgentResponseInvalid, match="more than 1000 bytes") as raised:
        request(client, contact(big, None))

    assert raised.value.code == "agent-response-invalid"
