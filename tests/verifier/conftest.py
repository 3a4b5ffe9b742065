"""Helpers shared by the verifier tests: simulated devices, policies and one-call attestation."""

from __future__ import annotations

import base64
import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import make_session_factory, transaction
from policies.runtime import PolicyCache, load_runtime_policy
from registrar.models import RegisteredDevice
from verifier import policy_store
from verifier.agent_client import AgentClient
from verifier.api import AddDeviceRequest, VerifierService
from verifier.engine import (
    Challenge,
    EngineOptions,
    Enrollment,
    Evidence,
    Loaded,
    PolicySet,
    VerificationResult,
    pcr_mask,
    requested_pcrs,
    verify,
)
from verifier.fleet_sim import SimulatedDevice, make_files, runtime_policy_document
from verifier.poller import Poller, PollerOptions
from verifier.state import DeviceState
from verifier.verdicts import AppliedPolicy

START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
POLL_INTERVAL = 10.0
_NONCE_ALPHABET = string.ascii_letters + string.digits


def new_nonce() -> str:
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(20))


def runtime_policies(files: dict[str, bytes], name: str = "fleet", version: int = 1) -> PolicySet:
    policy = load_runtime_policy(json.dumps(runtime_policy_document(files)), cache=PolicyCache())
    applied = AppliedPolicy("runtime", name, version, policy.content_hash)
    return PolicySet(runtime=Loaded(applied, policy))


def enrollment_of(device: SimulatedDevice) -> Enrollment:
    return Enrollment(device.device_id, device.tpm.ak_public, device.tpm.qualified_name)


@dataclass
class Attester:
    """Attests one simulated device repeatedly, carrying the state as the poller would."""

    device: SimulatedDevice
    policies: PolicySet
    state: DeviceState | None = None
    now: datetime = START
    enrollment: Enrollment | None = None
    options: EngineOptions = EngineOptions()

    def request(self, nonce: str | None = None) -> tuple[Challenge, dict[str, Any]]:
        """Ask the device for a quote as the poller does; return the challenge and results."""
        next_index = self.state.ima.next_index if self.state else 0
        pcrs = requested_pcrs(self.policies)
        nonce = nonce or new_nonce()
        status, body = self.device.answer_quote(
            {"nonce": nonce, "mask": pcr_mask(pcrs), "partial": "1", "ima_ml_entry": str(next_index)}
        )
        assert status == 200, body
        challenge = Challenge(nonce.encode("ascii"), pcrs | {16}, next_index, self.now)
        return challenge, body["results"]

    def verify(
        self, challenge: Challenge, results: dict[str, Any], *, keep_state: bool = False
    ) -> VerificationResult:
        evidence = Evidence(
            quote=results["quote"],
            hash_alg=results["hash_alg"],
            ima_measurement_list=results.get("ima_measurement_list"),
            ima_start_index=results.get("ima_measurement_list_entry", 0),
            mb_measurement_list=(
                base64.b64decode(results["mb_measurement_list"]) if "mb_measurement_list" in results else None
            ),
        )
        result = verify(
            evidence,
            self.enrollment or enrollment_of(self.device),
            self.policies,
            self.state,
            challenge=challenge,
            now=self.now,
            poll_interval=POLL_INTERVAL,
            options=self.options,
        )
        if not keep_state:
            self.state = result.next_state
        self.now += timedelta(seconds=POLL_INTERVAL)
        return result

    def attest(self) -> VerificationResult:
        challenge, results = self.request()
        return self.verify(challenge, results)


def error_codes(result: VerificationResult) -> list[str]:
    return [finding.code for finding in result.findings if finding.severity >= 30]


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(12)


@pytest.fixture
def device(files: dict[str, bytes]) -> SimulatedDevice:
    return SimulatedDevice("device-1", files=dict(files), entries_per_quote=2)


@pytest.fixture
def attester(device: SimulatedDevice, files: dict[str, bytes]) -> Attester:
    return Attester(device, runtime_policies(files))


# --- Database and poller helpers ----------------------------------------------------------------


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def sessions(migrated_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(migrated_engine)


def register(
    sessions: sessionmaker[Session],
    device: SimulatedDevice,
    *,
    mtls_cert: str | None = None,
    active: bool = True,
) -> None:
    """Store ``device`` in the registrar as enrolled (its AK proven), without the HTTP exchange."""
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        session.add(
            RegisteredDevice(
                device_id=device.device_id,
                ek_tpm=device.tpm.ek_tpm,
                ekcert=None,
                aik_tpm=device.tpm.ak_tpm,
                ip="127.0.0.1",
                port=device.port or 9002,
                mtls_cert=mtls_cert or "disabled",
                regcount=1,
                active=active,
                failed_activations=0,
                created_at=now,
                registered_at=now,
                activated_at=now if active else None,
            )
        )


def store_runtime_policy(
    sessions: sessionmaker[Session], files: dict[str, bytes], name: str = "fleet"
) -> None:
    with transaction(sessions) as session:
        policy_store.put_policy(session, name, "runtime", runtime_policy_document(files))


def add_to_verifier(
    service: VerifierService,
    device: SimulatedDevice,
    *,
    poll_interval: float = POLL_INTERVAL,
    runtime_policy: str | None = "fleet",
) -> None:
    service.add_device(
        AddDeviceRequest(
            device.device_id,
            ip="127.0.0.1",
            port=device.port,
            poll_interval=poll_interval,
            runtime_policy=runtime_policy,
        )
    )


def make_poller(
    sessions: sessionmaker[Session],
    clock: Callable[[], datetime],
    *,
    poller_id: str = "poller-1",
    client: AgentClient | None = None,
    threads: int = 4,
    lease_seconds: float = 30.0,
) -> Poller:
    options = PollerOptions(
        poller_id=poller_id,
        threads=threads,
        batch_size=8,
        lease_seconds=lease_seconds,
        agent_timeout=2.0,
        backoff_max=8 * POLL_INTERVAL,
        idle_wait=0.05,
    )
    return Poller(
        sessions, client or AgentClient(mtls=False, identity=None, timeout=2.0), options, clock=clock
    )
