"""The agent API over mutual TLS: the agent's self-signed server certificate, client
certificates from the verifier's CA, and Keylime's verifier code connecting with both."""

from __future__ import annotations

import datetime as dt
import socket
import stat
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID

from device.errors import AgentSettingsError
from device.tls import AgentTlsError, load_or_create_tls_identity, server_ssl_context
from tests.device.agent_support import (
    API,
    KeylimeVerifier,
    agent_stack,
    make_client_ca,
    runtime_policy,
)
from tests.device.conftest import TpmUnderTest

AGENT_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"


def test_certificate_made_once(tmp_path: Path) -> None:
    first = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    second = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")

    assert first.certificate == second.certificate
    assert first.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    common_name = first.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == AGENT_ID
    names = first.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(address) for address in names.value.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1"]
    assert stat.S_IMODE(first.key_file.stat().st_mode) == 0o600


def test_certificate_renewed_for_new_host(tmp_path: Path) -> None:
    first = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    second = load_or_create_tls_identity(tmp_path, AGENT_ID, "car-17.fleet.example")

    names = second.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert second.certificate != first.certificate
    assert names.value.get_values_for_type(x509.DNSName) == ["car-17.fleet.example"]


def test_certificate_renewed_before_expiry(tmp_path: Path) -> None:
    first = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    later = first.certificate.not_valid_after_utc - dt.timedelta(days=10)

    second = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1", now=later)

    assert second.certificate.not_valid_after_utc > first.certificate.not_valid_after_utc


def test_corrupt_certificate_rejected(tmp_path: Path) -> None:
    identity = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    identity.certificate_file.write_text("garbage")

    with pytest.raises(AgentTlsError) as raised:
        load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    assert raised.value.code == "agent-tls-invalid"


def test_client_ca_setting_required(tmp_path: Path) -> None:
    identity = load_or_create_tls_identity(tmp_path, AGENT_ID, "127.0.0.1")
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello")

    for value in (None, tmp_path / "missing.pem", not_pem):
        with pytest.raises(AgentSettingsError) as raised:
            server_ssl_context(identity, value)
        assert "agent_client_ca" in raised.value.message


@pytest.mark.swtpm
def test_mtls_client_certificate_required(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    stranger = make_client_ca(tmp_path / "other-ca", name="someone else's CA")
    identity = load_or_create_tls_identity(tmp_path / "state", AGENT_ID, "127.0.0.1")
    context = server_ssl_context(identity, client.ca_file)
    agent_cert = str(identity.certificate_file)
    client_pair = (str(client.client_certificate), str(client.client_key))
    stranger_pair = (str(stranger.client_certificate), str(stranger.client_key))

    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False, ssl_context=context) as stack:
        url = f"{stack.url}/version"
        accepted = requests.get(url, verify=agent_cert, cert=client_pair, timeout=30)
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=agent_cert, timeout=30)
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=agent_cert, cert=stranger_pair, timeout=30)
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url.replace("https:", "http:"), timeout=30)

    assert stack.url.startswith("https://")
    assert accepted.status_code == 200


@pytest.mark.swtpm
def test_silent_client_blocks_nobody(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    identity = load_or_create_tls_identity(tmp_path / "state", AGENT_ID, "127.0.0.1")
    context = server_ssl_context(identity, client.ca_file)

    with agent_stack(blank_swtpm.tcti, tmp_path / "state", ima=False, ssl_context=context) as stack:
        # Connects but never starts the TLS handshake.
        silent = socket.create_connection(("127.0.0.1", stack.server.port))
        try:
            response = requests.get(f"{stack.url}{API}/keys/pubkey",
                                    verify=str(identity.certificate_file),
                                    cert=(str(client.client_certificate), str(client.client_key)),
                                    timeout=10)
        finally:
            silent.close()

    assert response.status_code == 200


@pytest.mark.swtpm
@pytest.mark.slow
def test_keylime_verifier_over_mtls(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    client = make_client_ca(tmp_path / "verifier-ca")
    identity = load_or_create_tls_identity(tmp_path / "state", AGENT_ID, "127.0.0.1")
    context = server_ssl_context(identity, client.ca_file)
    car = tmp_path / "car"
    car.mkdir()
    (car / "manage.py").write_text("print('drive')\n")

    with agent_stack(blank_swtpm.tcti, tmp_path / "state", measure=[car],
                     ssl_context=context) as stack:
        verifier = KeylimeVerifier(
            agent_url=stack.url, ak_tpm=stack.keys.ak.public, mask="0x400",
            runtime_policy=runtime_policy(stack), verify=str(identity.certificate_file),
            cert=(str(client.client_certificate), str(client.client_key)))
        try:
            result = verifier.poll()
        finally:
            verifier.close()

    assert result["status"] == 200
    assert result["events"] == []
