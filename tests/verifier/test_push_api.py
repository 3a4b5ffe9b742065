"""Push mode (verifier.push_api) with software-TPM devices from verifier.fleet_sim, on SQLite and
PostgreSQL: the round trip, single-use and expiring challenges, evidence not signed by the
enrolled AK, mode checks, the schedule and its expiry, and a verifier restart.

The push service and the verifier API read a FakeClock that the tests advance. The swtpm
end-to-end tests with the device's push client are in tests/device/test_push.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction
from edgetrust.settings import Settings
from tests.verifier.conftest import FakeClock, make_poller, register, store_runtime_policy
from verifier.fleet_sim import SimulatedDevice, make_files
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.notify import WebhookService
from verifier.outbox_models import PushChallenge, WebhookDelivery
from verifier.push_api import PUSH_MODE_NEXT_POLL_AT, PushService

INTERVAL = 20.0
GRACE = 5.0
CHALLENGE_SECONDS = 30.0


@dataclass
class PushEnv:
    app: Flask
    client: FlaskClient
    sessions: sessionmaker[Session]
    clock: FakeClock


def build_app(engine: Engine, tmp_path: Path, clock: FakeClock) -> Flask:
    settings = Settings(data_dir=tmp_path, api_auth=False,
                        database_url=engine.url.render_as_string(hide_password=False),
                        verifier_push_grace_seconds=GRACE,
                        verifier_push_challenge_seconds=CHALLENGE_SECONDS)
    app = create_app(settings, engine=engine)
    extras = app.extensions["edgetrust"].extras
    extras["push"].clock = clock
    extras["verifier"].clock = clock
    return app


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def env(migrated_engine: Engine, tmp_path: Path, clock: FakeClock) -> PushEnv:
    app = build_app(migrated_engine, tmp_path, clock)
    return PushEnv(app, app.test_client(), make_session_factory(migrated_engine), clock)


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(6)


@pytest.fixture
def device(files: dict[str, bytes]) -> SimulatedDevice:
    return SimulatedDevice("push-car", files=dict(files), entries_per_quote=1)


def add_pushing_device(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes], *,
                       push: bool = True) -> None:
    """Register the device, add it to the verifier with a runtime policy, then enable push mode."""
    store_runtime_policy(env.sessions, files)
    register(env.sessions, device)
    added = env.client.post(f"/v1/devices/{device.device_id}",
                            json={"runtime_policy": "fleet", "poll_interval": INTERVAL})
    assert added.status_code == 201, added.get_json()
    if push:
        enabled = env.client.post(f"/v1/push/{device.device_id}")
        assert enabled.status_code == 201, enabled.get_json()


def challenge(env: PushEnv, device_id: str) -> dict[str, Any]:
    response = env.client.post(f"/v1/push/{device_id}/challenge")
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def quote_for(device: SimulatedDevice, issued: dict[str, Any]) -> dict[str, Any]:
    """Respond to a challenge as the device's push client does: the Keylime quote response fields."""
    status, body = device.answer_quote({"nonce": issued["nonce"], "mask": issued["mask"],
                                        "ima_ml_entry": str(issued["ima_ml_entry"])})
    assert status == 200
    results: dict[str, Any] = body["results"]
    return {"challenge_id": issued["challenge_id"], **results}


def post_evidence(env: PushEnv, device_id: str, evidence: dict[str, Any]) -> Any:
    return env.client.post(f"/v1/push/{device_id}/evidence", json=evidence)


def push(env: PushEnv, device: SimulatedDevice) -> dict[str, Any]:
    response = post_evidence(env, device.device_id, quote_for(device, challenge(env, device.device_id)))
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def verdict(env: PushEnv, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = env.client.get(f"/v1/devices/{device_id}/verdict").get_json()
    return body


def device_row(sessions: sessionmaker[Session], device_id: str) -> VerifierDevice:
    with sessions() as session:
        return session.scalars(select(VerifierDevice).where(VerifierDevice.device_id == device_id)).one()


def attestation_count(sessions: sessionmaker[Session], device_id: str) -> int:
    with sessions() as session:
        return len(session.scalars(select(Attestation.id).where(Attestation.device_id == device_id)).all())


def error_of(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = response.get_json()["error"]
    return error


# --- the round trip -----------------------------------------------------------------------------


def test_push_good_evidence_trusted(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)

    issued = challenge(env, device.device_id)
    response = post_evidence(env, device.device_id, quote_for(device, issued))

    assert response.status_code == 200
    body = response.get_json()
    assert body["verdict"]["status"] == "trusted"
    assert body["next_challenge_in"] == INTERVAL
    assert issued["ima_ml_entry"] == 0
    assert issued["pcrs"] == list(range(11)) + [16]
    assert verdict(env, device.device_id)["status"] == "trusted"
    row = device_row(env.sessions, device.device_id)
    assert row.verdict_id == body["verdict"]["verdict_id"]
    assert row.state is not None
    assert row.state["ima"]["next_index"] == len(device.ima_lines)
    with env.sessions() as session:
        attestation = session.scalars(select(Attestation)).one()
        changes = session.scalars(select(VerdictRecord.status)).all()
    assert attestation.poller == "push"
    assert attestation.nonce == issued["nonce"]
    assert attestation.status == "trusted"
    assert changes == ["trusted"]


def test_push_trusted_verdict_expiry(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)

    body = push(env, device)

    expires_at = datetime.fromisoformat(body["verdict"]["expires_at"])
    assert expires_at == env.clock() + timedelta(seconds=INTERVAL + GRACE)


def test_next_challenge_continues_ima_list(env: PushEnv, device: SimulatedDevice,
                                           files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    entries = len(device.ima_lines)
    env.clock.advance(INTERVAL)

    issued = challenge(env, device.device_id)
    response = post_evidence(env, device.device_id, quote_for(device, issued))

    assert issued["ima_ml_entry"] == entries
    assert response.get_json()["verdict"]["status"] == "trusted"


def test_push_changed_file_untrusted(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    device.measure("/usr/bin/tool0", b"\x01" * 32)
    env.clock.advance(INTERVAL)

    body = push(env, device)

    assert body["verdict"]["status"] == "untrusted"
    assert [reason["code"] for reason in body["verdict"]["reasons"]] == ["ima-digest-not-allowed"]
    assert verdict(env, device.device_id)["status"] == "untrusted"
    assert attestation_count(env.sessions, device.device_id) == 2


def test_push_after_reboot_restarts_list(env: PushEnv, device: SimulatedDevice,
                                         files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    device.reboot()
    env.clock.advance(INTERVAL)

    stale_offset = push(env, device)
    issued = challenge(env, device.device_id)
    from_zero = post_evidence(env, device.device_id, quote_for(device, issued)).get_json()

    assert stale_offset["verdict"]["status"] == "unknown"
    assert stale_offset["verdict"]["reasons"][0]["code"] == "ima-list-restart-needed"
    assert stale_offset["next_challenge_in"] == 0
    assert issued["ima_ml_entry"] == 0
    assert from_zero["verdict"]["status"] == "trusted"


def test_missed_deadline_reads_unknown(env: PushEnv, device: SimulatedDevice,
                                       files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)

    env.clock.advance(INTERVAL + GRACE - 1)
    before = verdict(env, device.device_id)
    env.clock.advance(1)
    after = verdict(env, device.device_id)

    assert before["status"] == "trusted"
    assert after["status"] == "unknown"
    assert [reason["code"] for reason in after["reasons"]] == ["verdict-expired"]


def test_push_queues_webhook_event(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    WebhookService(env.sessions, clock=env.clock).add("http://127.0.0.1:9/hook", "receiver-secret-0123456789")
    add_pushing_device(env, device, files)

    first = push(env, device)
    env.clock.advance(INTERVAL)
    push(env, device)

    with env.sessions() as session:
        events = [row.payload for row in session.scalars(select(WebhookDelivery))]
    assert len(events) == 1
    assert events[0]["verdict_id"] == first["verdict"]["verdict_id"]
    assert (events[0]["old_status"], events[0]["new_status"]) == ("unknown", "trusted")


# --- challenges ---------------------------------------------------------------------------------


def test_challenge_reuse_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    issued = challenge(env, device.device_id)
    evidence = quote_for(device, issued)
    post_evidence(env, device.device_id, evidence)
    stored = device_row(env.sessions, device.device_id).verdict_id

    again = post_evidence(env, device.device_id, evidence)

    assert again.status_code == 409
    assert error_of(again)["code"] == "push-challenge-used"
    assert error_of(again)["field"] == "challenge_id"
    assert device_row(env.sessions, device.device_id).verdict_id == stored
    assert attestation_count(env.sessions, device.device_id) == 1


def test_expired_challenge_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    issued = challenge(env, device.device_id)
    env.clock.advance(CHALLENGE_SECONDS)

    response = post_evidence(env, device.device_id, quote_for(device, issued))

    assert response.status_code == 410
    assert error_of(response)["code"] == "push-challenge-expired"
    assert attestation_count(env.sessions, device.device_id) == 0


def test_challenge_of_other_device_rejected(env: PushEnv, device: SimulatedDevice,
                                            files: dict[str, bytes]) -> None:
    other = SimulatedDevice("other-car", files=dict(files))
    add_pushing_device(env, device, files)
    register(env.sessions, other)
    env.client.post("/v1/devices/other-car", json={"runtime_policy": "fleet"})
    env.client.post("/v1/push/other-car")
    issued = challenge(env, "other-car")

    response = post_evidence(env, device.device_id, quote_for(device, issued))

    assert response.status_code == 404
    assert error_of(response)["code"] == "push-challenge-not-found"


def test_open_challenges_are_capped(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    first = challenge(env, device.device_id)
    for _ in range(8):
        challenge(env, device.device_id)

    response = post_evidence(env, device.device_id, quote_for(device, first))

    assert response.status_code == 404
    with env.sessions() as session:
        assert len(session.scalars(select(PushChallenge.id)).all()) == 8


# --- authentication -----------------------------------------------------------------------------


def test_foreign_key_evidence_rejected(env: PushEnv, device: SimulatedDevice,
                                       files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    stored = device_row(env.sessions, device.device_id).verdict_id
    impostor = SimulatedDevice(device.device_id, files=dict(files))
    issued = challenge(env, device.device_id)

    forged = post_evidence(env, device.device_id, quote_for(impostor, issued))
    genuine = post_evidence(env, device.device_id, quote_for(device, issued))

    assert forged.status_code == 403
    assert error_of(forged)["code"] == "push-evidence-not-authenticated"
    assert "ak-changed" in error_of(forged)["message"]
    assert genuine.status_code == 200
    assert device_row(env.sessions, device.device_id).verdict_id != stored
    assert attestation_count(env.sessions, device.device_id) == 2


def test_replayed_quote_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    old = quote_for(device, challenge(env, device.device_id))
    post_evidence(env, device.device_id, old)
    issued = challenge(env, device.device_id)

    response = post_evidence(env, device.device_id, {**old, "challenge_id": issued["challenge_id"]})

    assert response.status_code == 403
    assert "quote-nonce-mismatch" in error_of(response)["message"]
    assert attestation_count(env.sessions, device.device_id) == 1


def test_garbage_quote_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    issued = challenge(env, device.device_id)

    response = post_evidence(env, device.device_id, {**quote_for(device, issued), "quote": "rAAAA:BBBB:CCCC"})

    assert response.status_code == 403
    assert "quote-malformed" in error_of(response)["message"]
    assert verdict(env, device.device_id)["reasons"][0]["code"] == "not-attested-yet"


# --- mode checks and request validation ---------------------------------------------------------


def test_pull_mode_device_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files, push=False)

    response = env.client.post(f"/v1/push/{device.device_id}/challenge")

    assert response.status_code == 409
    assert error_of(response)["code"] == "device-not-in-push-mode"


def test_device_not_in_verifier_rejected(env: PushEnv) -> None:
    response = env.client.post("/v1/push/unknown-car/challenge")

    assert response.status_code == 404
    assert error_of(response)["code"] == "verifier-device-not-found"


def test_paused_device_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    issued = challenge(env, device.device_id)
    env.client.post(f"/v1/devices/{device.device_id}/pause")

    new_challenge = env.client.post(f"/v1/push/{device.device_id}/challenge")
    evidence = post_evidence(env, device.device_id, quote_for(device, issued))

    assert new_challenge.status_code == 409
    assert error_of(new_challenge)["code"] == "device-paused"
    assert evidence.status_code == 409


def test_ima_offset_mismatch_rejected(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    issued = challenge(env, device.device_id)
    evidence = quote_for(device, issued)

    response = post_evidence(env, device.device_id, {**evidence, "ima_measurement_list_entry": 1})

    assert response.status_code == 400
    assert error_of(response)["code"] == "push-ima-offset-mismatch"
    assert error_of(response)["field"] == "ima_measurement_list_entry"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"challenge_id": "not-a-uuid"}, "challenge_id"),
        ({"challenge_id": None}, "challenge_id"),
        ({"quote": None}, "quote"),
        ({"hash_alg": 256}, "hash_alg"),
        ({"sign_alg": "dsa"}, "sign_alg"),
        ({"ima_measurement_list_entry": -1}, "ima_measurement_list_entry"),
        ({"mb_measurement_list": "not base64!"}, "mb_measurement_list"),
    ],
)
def test_evidence_validation_names_field(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes],
                                         change: dict[str, Any], field: str) -> None:
    add_pushing_device(env, device, files)
    evidence = {**quote_for(device, challenge(env, device.device_id)), **change}
    evidence = {key: value for key, value in evidence.items() if value is not None}

    response = post_evidence(env, device.device_id, evidence)

    assert response.status_code == 400
    assert error_of(response)["field"] == field


# --- admin routes and the poller ----------------------------------------------------------------


def test_push_mode_routes(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    push(env, device)

    again = env.client.post(f"/v1/push/{device.device_id}")
    status = env.client.get(f"/v1/push/{device.device_id}").get_json()
    disabled = env.client.delete(f"/v1/push/{device.device_id}")
    pull = env.client.get(f"/v1/push/{device.device_id}")

    assert again.status_code == 200
    assert status["mode"] == "push"
    assert status["push_interval"] == INTERVAL
    assert status["last_evidence_at"] == env.clock().isoformat()
    assert status["next_evidence_due_at"] == (env.clock() + timedelta(seconds=INTERVAL)).isoformat()
    assert status["late_after"] == (env.clock() + timedelta(seconds=INTERVAL + GRACE)).isoformat()
    assert status["verdict"]["status"] == "trusted"
    assert disabled.status_code == 204
    assert pull.status_code == 409
    assert device_row(env.sessions, device.device_id).next_poll_at is not None


def test_poller_skips_push_devices(env: PushEnv, device: SimulatedDevice, files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)

    claimed = make_poller(env.sessions, env.clock).run_once()

    assert claimed == 0
    assert device_row(env.sessions, device.device_id).next_poll_at.year == PUSH_MODE_NEXT_POLL_AT.year


def test_enable_discards_poll_in_flight(env: PushEnv, device: SimulatedDevice,
                                        files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files, push=False)
    with transaction(env.sessions) as session:
        session.execute(update(VerifierDevice).values(lease_id="11111111-1111-1111-1111-111111111111"))

    env.client.post(f"/v1/push/{device.device_id}")

    assert device_row(env.sessions, device.device_id).lease_id is None


# --- restart ------------------------------------------------------------------------------------


@pytest.fixture
def engines(database_url: str, migrated_engine: Engine) -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def test_restart_recomputes_deadline(env: PushEnv, database_url: str, engines: list[Engine],
                                     device: SimulatedDevice, files: dict[str, bytes],
                                     tmp_path: Path) -> None:
    add_pushing_device(env, device, files)
    push(env, device)
    pending = challenge(env, device.device_id)
    env.clock.advance(INTERVAL)

    engines.append(make_engine(database_url))
    restarted = build_app(engines[0], tmp_path / "restarted", env.clock).test_client()
    before = restarted.get(f"/v1/devices/{device.device_id}/verdict").get_json()
    env.clock.advance(GRACE)
    after = restarted.get(f"/v1/devices/{device.device_id}/verdict").get_json()
    accepted = restarted.post(f"/v1/push/{device.device_id}/evidence", json=quote_for(device, pending))

    assert before["status"] == "trusted"
    assert after["status"] == "unknown"
    assert [reason["code"] for reason in after["reasons"]] == ["verdict-expired"]
    assert accepted.status_code == 200, accepted.get_json()
    assert accepted.get_json()["verdict"]["status"] == "trusted"


def test_service_rejects_unknown_challenge(env: PushEnv, device: SimulatedDevice,
                                           files: dict[str, bytes]) -> None:
    add_pushing_device(env, device, files)
    service = env.app.extensions["edgetrust"].extras["push"]
    assert isinstance(service, PushService)
    evidence = quote_for(device, challenge(env, device.device_id))

    response = post_evidence(env, device.device_id,
                             {**evidence, "challenge_id": "00000000-0000-4000-8000-000000000000"})

    assert response.status_code == 404
    assert error_of(response)["code"] == "push-challenge-not-found"


def test_device_routes_need_no_token(migrated_engine: Engine, tmp_path: Path, clock: FakeClock,
                                     device: SimulatedDevice, files: dict[str, bytes]) -> None:
    app = build_app(migrated_engine, tmp_path, clock)
    add_pushing_device(PushEnv(app, app.test_client(), make_session_factory(migrated_engine), clock),
                       device, files)
    settings = Settings(data_dir=tmp_path / "guarded",
                        database_url=migrated_engine.url.render_as_string(hide_password=False))
    guarded = create_app(settings, engine=migrated_engine).test_client()

    issued = guarded.post(f"/v1/push/{device.device_id}/challenge")
    pushed = guarded.post(f"/v1/push/{device.device_id}/evidence", json=quote_for(device, issued.get_json()))
    admin = guarded.get(f"/v1/push/{device.device_id}")

    assert issued.status_code == 201
    assert pushed.status_code == 200
    assert pushed.get_json()["verdict"]["status"] == "trusted"
    assert admin.status_code == 401
