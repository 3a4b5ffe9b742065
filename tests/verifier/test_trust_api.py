"""Trust API: batch verdicts by device id and by node, signed verdicts and the JWKS.

The helpers here write verdicts the way the poller stores them: the device row and, when the
status or reason codes change, a verdict-change row. The stream tests import them.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction, upgrade
from edgetrust.settings import Settings, SettingsError
from registrar.models import RegisteredDevice
from verifier import jws
from verifier.models import VerdictRecord, VerifierDevice
from verifier.nodes import set_node
from verifier.tokens import Scope, create_token

# --- helpers shared with the stream tests -------------------------------------------------------


def add_device(sessions: sessionmaker[Session], device_id: str) -> None:
    """Store a registered, active device that the verifier attests and has not attested yet."""
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        session.add(RegisteredDevice(
            device_id=device_id, ek_tpm=None, ekcert=None, aik_tpm=b"ak", ip="127.0.0.1", port=9002,
            mtls_cert="disabled", regcount=1, active=True, failed_activations=0, created_at=now,
            registered_at=now, activated_at=now,
        ))
        session.flush()
        session.add(VerifierDevice(
            device_id=device_id, ip="127.0.0.1", port=9002, poll_interval=10.0, paused=False,
            next_poll_at=now + timedelta(days=1), consecutive_failures=0, state=None, verdict_id=None,
            verdict_status="unknown",
            verdict_reasons=[{"code": "not-attested-yet", "message": "not attested yet"}],
            verdict_policies=[], created_at=now, updated_at=now,
        ))


def set_verdict(sessions: sessionmaker[Session], device_id: str, status: str, *,
                expires_in: float | None = None, codes: tuple[str, ...] = (),
                record: bool = True) -> str:
    """Store a verdict as the poller does; ``record`` False stores no change row (same status)."""
    now = datetime.now(UTC)
    verdict_id = str(uuid.uuid4())
    reasons = [{"code": code, "message": f"finding {code}"} for code in codes]
    policies = [{"kind": "runtime", "name": "fleet", "version": 1, "content_hash": "ab" * 32}]
    expires_at = now + timedelta(seconds=expires_in) if expires_in is not None else None
    with transaction(sessions) as session:
        session.execute(update(VerifierDevice).where(VerifierDevice.device_id == device_id).values(
            verdict_id=verdict_id, verdict_status=status, verdict_reasons=reasons,
            verdict_policies=policies, verdict_issued_at=now, verdict_attested_at=now,
            verdict_expires_at=expires_at, updated_at=now,
        ))
        if record:
            session.add(VerdictRecord(
                verdict_id=verdict_id, device_id=device_id, status=status, reasons=reasons,
                policies=policies, issued_at=now, attested_at=now, expires_at=expires_at,
                attestation_id=None,
            ))
    return verdict_id


def map_node(sessions: sessionmaker[Session], node: str, device_id: str) -> None:
    with transaction(sessions) as session:
        set_node(session, node, device_id)


@dataclass
class TrustEnv:
    app: Flask
    client: FlaskClient
    sessions: sessionmaker[Session]
    settings: Settings
    read_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.read_token}"}


def make_trust_env(engine: Engine, tmp_path: Path, **settings: Any) -> TrustEnv:
    config = Settings(data_dir=tmp_path, database_url=engine.url.render_as_string(hide_password=False),
                      **settings)
    app = create_app(config, engine=engine)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        _, token = create_token(session, f"reader-{uuid.uuid4().hex[:8]}", Scope.READ, now=datetime.now(UTC))
    return TrustEnv(app, app.test_client(), sessions, config, token)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def env(engine: Engine, tmp_path: Path) -> TrustEnv:
    return make_trust_env(engine, tmp_path)


def b64url_json(segment: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return value


# --- batch --------------------------------------------------------------------------------------


def test_batch_by_device_ids(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    add_device(env.sessions, "car-2")
    verdict_id = set_verdict(env.sessions, "car-1", "trusted", expires_in=60)
    set_verdict(env.sessions, "car-2", "untrusted", codes=("ima-digest-not-allowed",))

    response = env.client.post("/v1/verdicts:batch", headers=env.headers,
                               json={"device_ids": ["car-2", "car-1", "car-9", "car-1"]})

    assert response.status_code == 200
    verdicts = response.get_json()["verdicts"]
    assert [v["device_id"] for v in verdicts] == ["car-2", "car-1", "car-9"]
    assert [v["status"] for v in verdicts] == ["untrusted", "trusted", "unknown"]
    assert verdicts[1]["verdict_id"] == verdict_id
    assert verdicts[1]["expires_at"] is not None
    assert verdicts[0]["reasons"][0]["code"] == "ima-digest-not-allowed"
    assert verdicts[2]["reasons"][0]["code"] == "device-not-found"


def test_batch_matches_single_verdict(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)

    single = env.client.get("/v1/devices/car-1/verdict", headers=env.headers).get_json()
    batch = env.client.post("/v1/verdicts:batch", headers=env.headers,
                            json={"device_ids": ["car-1"]}).get_json()["verdicts"][0]

    assert batch == single


def test_batch_expired_trust_reads_unknown(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=-1)

    verdict = env.client.post("/v1/verdicts:batch", headers=env.headers,
                              json={"device_ids": ["car-1"]}).get_json()["verdicts"][0]

    assert verdict["status"] == "unknown"
    assert verdict["reasons"][0]["code"] == "verdict-expired"


def test_batch_by_nodes(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    add_device(env.sessions, "car-2")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)
    map_node(env.sessions, "node-a", "car-1")
    map_node(env.sessions, "node-b", "car-2")

    response = env.client.post("/v1/verdicts:batch", headers=env.headers,
                               json={"nodes": ["node-a", "node-b", "node-z"]})

    assert response.status_code == 200
    verdicts = response.get_json()["verdicts"]
    assert [v["node"] for v in verdicts] == ["node-a", "node-b", "node-z"]
    assert [v["device_id"] for v in verdicts] == ["car-1", "car-2", None]
    assert [v["status"] for v in verdicts] == ["trusted", "unknown", "unknown"]
    assert verdicts[1]["reasons"][0]["code"] == "not-attested-yet"
    assert verdicts[2]["reasons"][0]["code"] == "node-not-mapped"


def test_batch_node_of_device_not_in_verifier(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    map_node(env.sessions, "node-a", "car-1")
    with transaction(env.sessions) as session:
        session.execute(delete(VerifierDevice))

    verdict = env.client.post("/v1/verdicts:batch", headers=env.headers,
                              json={"nodes": ["node-a"]}).get_json()["verdicts"][0]

    assert verdict["status"] == "unknown"
    assert verdict["device_id"] == "car-1"
    assert verdict["reasons"][0]["code"] == "device-not-found"


@pytest.mark.parametrize("body", [
    {},
    {"device_ids": ["a"], "nodes": ["b"]},
    {"device_ids": "car-1"},
    {"device_ids": [1]},
    {"device_ids": ["bad id!"]},
    {"nodes": ["Not_A_Node"]},
])
def test_batch_rejects_malformed_body(env: TrustEnv, body: dict[str, Any]) -> None:
    response = env.client.post("/v1/verdicts:batch", headers=env.headers, json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] in ("invalid-field", "invalid-device-id")


def test_batch_rejects_too_many_items(engine: Engine, tmp_path: Path) -> None:
    env = make_trust_env(engine, tmp_path, trust_batch_max_items=2)

    response = env.client.post("/v1/verdicts:batch", headers=env.headers,
                               json={"device_ids": ["a", "b", "c"]})

    assert response.status_code == 400
    assert "trust_batch_max_items" in response.get_json()["error"]["message"]


# --- signed verdicts ----------------------------------------------------------------------------


def test_verdict_as_jws(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    verdict_id = set_verdict(env.sessions, "car-1", "trusted", expires_in=60)

    by_query = env.client.get("/v1/devices/car-1/verdict?format=jws", headers=env.headers)
    by_accept = env.client.get("/v1/devices/car-1/verdict",
                               headers={**env.headers, "Accept": "application/jose"})
    plain = env.client.get("/v1/devices/car-1/verdict", headers=env.headers).get_json()

    assert by_query.status_code == 200
    assert by_query.mimetype == "application/jose"
    assert by_accept.mimetype == "application/jose"
    header_b64, payload_b64, _ = by_query.get_data(as_text=True).split(".")
    header = b64url_json(header_b64)
    claims = b64url_json(payload_b64)
    kid = env.client.get("/v1/keys", headers=env.headers).get_json()["keys"][0]["kid"]
    assert header == {"alg": "ES256", "kid": kid, "typ": "JWT"}
    assert claims["sub"] == "car-1"
    assert claims["iss"] == "edgetrust"
    assert claims["status"] == "trusted"
    assert claims["verdict_id"] == verdict_id
    assert claims["exp"] == int(datetime.fromisoformat(plain["expires_at"]).timestamp())
    assert claims["policies"] == plain["policies"]
    assert claims["reasons"] == plain["reasons"]


def test_untrusted_jws_has_no_expiry(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "untrusted", codes=("quote-signature-invalid",))

    token = env.client.get("/v1/devices/car-1/verdict?format=jws", headers=env.headers).get_data(as_text=True)
    claims = b64url_json(token.split(".")[1])

    assert claims["status"] == "untrusted"
    assert "exp" not in claims
    assert claims["reasons"][0]["code"] == "quote-signature-invalid"


def test_jws_of_missing_device_is_an_error(env: TrustEnv) -> None:
    response = env.client.get("/v1/devices/car-9/verdict?format=jws", headers=env.headers)

    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "verifier-device-not-found"


def test_jwks_verifies_served_jws(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)

    token = env.client.get("/v1/devices/car-1/verdict?format=jws", headers=env.headers).get_data(as_text=True)
    jwk = env.client.get("/v1/keys", headers=env.headers).get_json()["keys"][0]
    public_key = _public_key(jwk)

    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    assert jwk["alg"] == "ES256"
    assert jws.verify_compact(token, public_key)["sub"] == "car-1"


def test_signing_key_kept_and_reused(engine: Engine, tmp_path: Path) -> None:
    first = make_trust_env(engine, tmp_path)
    kid = first.client.get("/v1/keys", headers=first.headers).get_json()["keys"][0]["kid"]
    key_file = tmp_path / "jws-signing-key.pem"

    second = make_trust_env(engine, tmp_path)
    kid_again = second.client.get("/v1/keys", headers=second.headers).get_json()["keys"][0]["kid"]

    assert key_file.stat().st_mode & 0o777 == 0o600
    assert kid_again == kid


def test_signing_key_from_setting(engine: Engine, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "given.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    env = make_trust_env(engine, tmp_path / "data", jws_signing_key=key_file)
    jwk = env.client.get("/v1/keys", headers=env.headers).get_json()["keys"][0]

    assert jwk == jws.public_jwk(key.public_key())
    assert not (tmp_path / "data" / "jws-signing-key.pem").exists()


def test_signing_key_rejects_other_curve(engine: Engine, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_file = tmp_path / "p384.pem"
    key_file.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    with pytest.raises(SettingsError, match="is not an ECDSA P-256 key"):
        make_trust_env(engine, tmp_path, jws_signing_key=key_file)


def test_serve_reports_unusable_signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main
    from edgetrust.commands import server

    def run_gunicorn(*_arguments: Any, **_options: Any) -> None:
        raise AssertionError("serve started the server despite an unusable signing key")

    monkeypatch.setattr(server, "run_gunicorn", run_gunicorn)
    key_file = tmp_path / "verdicts.pem"
    key_file.write_text("not a key")
    environment = {"EDGETRUST_DATA_DIR": str(tmp_path), "EDGETRUST_DATABASE_URL": None,
                   "EDGETRUST_CONFIG": None, "EDGETRUST_JWS_SIGNING_KEY": str(key_file)}

    result = CliRunner().invoke(main, ["serve"], env=environment)

    assert result.exit_code == 1, result.output
    last_line = result.output.strip().splitlines()[-1]
    assert last_line.startswith(f"Error: cannot load the verdict signing key {key_file}: ")
    assert last_line.endswith("(setting jws_signing_key)")
    assert "Traceback" not in result.output


def _public_key(jwk: dict[str, str]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    x = int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "="), "big")
    y = int.from_bytes(base64.urlsafe_b64decode(jwk["y"] + "="), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
