"""The poller against edgetrust's own device agent: swtpm quotes, the agent API over mutual
TLS on 127.0.0.1, and the simulated IMA list of files that the test changes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import transaction
from registrar.models import RegisteredDevice
from tests.support.swtpm import SwtpmProcess, require_swtpm
from tests.verifier.conftest import FakeClock, make_poller
from verifier import policy_store
from verifier.agent_client import AgentClient, ClientIdentity
from verifier.api import AddDeviceRequest, VerifierService
from verifier.models import Attestation, VerifierDevice

pytest.importorskip("tpm2_pytss")

from device.tls import load_or_create_tls_identity, server_ssl_context  # noqa: E402 - needs tpm2_pytss
from tests.device.agent_support import AgentStack, agent_stack, make_client_ca, runtime_policy  # noqa: E402

pytestmark = pytest.mark.swtpm

DEVICE_ID = "swtpm-car"


@dataclass
class Enrolled:
    stack: AgentStack
    car: Path
    client: AgentClient


@pytest.fixture
def enrolled(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Enrolled]:
    require_swtpm()
    car = tmp_path / "car"
    car.mkdir()
    (car / "manage.py").write_text("print('drive')\n")
    client_ca = make_client_ca(tmp_path / "verifier-ca")
    identity = load_or_create_tls_identity(tmp_path / "state", DEVICE_ID, "127.0.0.1")
    context = server_ssl_context(identity, client_ca.ca_file)

    with (
        SwtpmProcess(tmp_path / "tpm") as tpm,
        agent_stack(tpm.tcti, tmp_path / "state", measure=[car], ssl_context=context) as stack,
    ):
        now = datetime.now(UTC)
        with transaction(sessions) as session:
            policy_store.put_policy(session, "car", "runtime", runtime_policy(stack))
            session.add(
                RegisteredDevice(
                    device_id=DEVICE_ID,
                    ek_tpm=stack.keys.ek.public,
                    ekcert=None,
                    aik_tpm=stack.keys.ak.public,
                    ip="127.0.0.1",
                    port=stack.server.port,
                    mtls_cert=identity.certificate_file.read_text(),
                    regcount=1,
                    active=True,
                    failed_activations=0,
                    created_at=now,
                    registered_at=now,
                    activated_at=now,
                )
            )
        client = AgentClient(
            mtls=True,
            identity=ClientIdentity(client_ca.client_certificate, client_ca.client_key),
            timeout=30.0,
        )
        yield Enrolled(stack, car, client)
        client.close()


def latest(sessions: sessionmaker[Session]) -> Attestation:
    with sessions() as session:
        return session.scalars(select(Attestation).order_by(Attestation.id.desc()).limit(1)).one()


def test_poller_attests_swtpm_agent(sessions: sessionmaker[Session], enrolled: Enrolled) -> None:
    clock = FakeClock()
    service = VerifierService(sessions, default_poll_interval=10.0, clock=clock)
    service.add_device(AddDeviceRequest(DEVICE_ID, runtime_policy="car"))
    poller = make_poller(sessions, clock, client=enrolled.client)

    poller.run_once()
    first = latest(sessions)
    (enrolled.car / "manage.py").write_text("print('drive faster')\n")
    assert enrolled.stack.simulator is not None
    enrolled.stack.simulator.measure()
    clock.advance(10.0)
    poller.run_once()
    second = latest(sessions)

    assert first.status == "trusted", first.findings
    assert first.ima_start_index == 0
    assert [f["code"] for f in first.findings if f["severity"] == "error"] == []
    assert second.status == "untrusted"
    assert second.ima_start_index == first.ima_next_index
    assert [f["code"] for f in second.findings] == ["ima-digest-not-allowed"]
    assert second.findings[0]["context"]["path"] == str((enrolled.car / "manage.py").resolve())
    with sessions() as session:
        device = session.scalars(select(VerifierDevice)).one()
    assert device.verdict_status == "untrusted"
