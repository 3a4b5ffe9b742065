"""API tokens and their scopes on every route family, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.auth import required_scope
from edgetrust.cli import main
from edgetrust.db import make_engine, make_session_factory, transaction, upgrade
from edgetrust.settings import Settings
from verifier.poller import as_utc
from verifier.tokens import (
    ApiToken,
    Scope,
    TokenError,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)

NOW = datetime.now(UTC)

# (method, path) of each route family; the Keylime routes in their envelope.
OPEN_ROUTES = [
    ("GET", "/healthz"),
    ("GET", "/version"),
    ("POST", "/v2.1/agents/device-1"),
    ("PUT", "/v2.1/agents/device-1"),
    ("POST", "/v2.5/agents/device-1/activate"),
    ("POST", "/v2.0/agents/device-1"),
    ("POST", "/v1/push/device-1/challenge"),
    ("POST", "/v1/push/device-1/evidence"),
]
READ_ROUTES = [
    ("GET", "/v1/devices/device-1/verdict"),
    ("POST", "/v1/verdicts:batch"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/admission"),
    ("POST", "/v1/gate"),
]
ADMIN_ROUTES = [
    ("GET", "/v2.1/agents/"),
    ("GET", "/v2.1/agents/device-1"),
    ("DELETE", "/v2.1/agents/device-1"),
    ("POST", "/v1/devices/device-1"),
    ("GET", "/v1/devices/device-1"),
    ("POST", "/v1/devices/device-1/pause"),
    ("POST", "/v1/devices/device-1/resume"),
    ("DELETE", "/v1/devices/device-1"),
    ("GET", "/v1/devices/device-1/attestations"),
    ("GET", "/v1/policies"),
    ("POST", "/v1/policies/fleet"),
    ("PUT", "/v1/policies/fleet"),
    ("GET", "/v1/policies/fleet"),
    ("DELETE", "/v1/policies/fleet"),
    ("GET", "/no/such/route"),
    ("POST", "/v1/devices/device-1/verdict"),
    ("POST", "/v1/push/device-1"),
    ("GET", "/v1/push/device-1"),
    ("DELETE", "/v1/push/device-1"),
    ("POST", "/v1/evidence:verify"),
    ("GET", "/v1/nodes"),
    ("PUT", "/v1/nodes/node-1"),
    ("DELETE", "/v1/nodes/node-1"),
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks"),
]


@dataclass
class Api:
    app: Flask
    client: FlaskClient
    sessions: sessionmaker[Session]
    admin: str
    read: str

    def call(self, method: str, path: str, token: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = self.client.open(path, method=method, headers=headers, json={})
        return response.status_code, response.get_json(silent=True) or {}


def new_token(sessions: sessionmaker[Session], name: str, scope: Scope,
              expires_at: datetime | None = None) -> str:
    with transaction(sessions) as session:
        _, text = create_token(session, name, scope, now=NOW, expires_at=expires_at)
    return text


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def make_api(engine: Engine, tmp_path: Path, **settings: object) -> Api:
    app = create_app(Settings(data_dir=tmp_path, database_url=str(engine.url.render_as_string(
        hide_password=False)), **settings), engine=engine)  # type: ignore[arg-type]
    sessions = make_session_factory(engine)
    return Api(app, app.test_client(), sessions, new_token(sessions, "ops", Scope.ADMIN),
               new_token(sessions, "gate", Scope.READ))


@pytest.fixture
def api(engine: Engine, tmp_path: Path) -> Api:
    return make_api(engine, tmp_path)


# --- the route table ----------------------------------------------------------------------------


def test_route_table_scopes() -> None:
    for method, path in OPEN_ROUTES:
        assert required_scope(method, path) is None, (method, path)
    for method, path in READ_ROUTES + [("GET", "/v1/verdicts/stream"), ("HEAD", "/v1/keys")]:
        assert required_scope(method, path) is Scope.READ, (method, path)
    for method, path in ADMIN_ROUTES:
        assert required_scope(method, path) is Scope.ADMIN, (method, path)


def test_route_table_rejects_lookalike_paths() -> None:
    assert required_scope("GET", "/v1/devices/a/b/verdict") is Scope.ADMIN
    assert required_scope("GET", "/v1/devices/a/verdict/x") is Scope.ADMIN
    assert required_scope("POST", "/v2.1/agents/a/b") is Scope.ADMIN
    assert required_scope("POST", "/vx/agents/device-1") is Scope.ADMIN
    assert required_scope("DELETE", "/v2.1/agents/device-1") is Scope.ADMIN
    assert required_scope("GET", "/healthz/x") is Scope.ADMIN
    assert required_scope("OPTIONS", "/v1/keys") is Scope.ADMIN


# --- route families -----------------------------------------------------------------------------


def test_open_routes_need_no_token(api: Api) -> None:
    for method, path in OPEN_ROUTES:
        status, _ = api.call(method, path)
        assert status not in (401, 403), (method, path, status)


def test_read_routes_need_a_token(api: Api) -> None:
    for method, path in READ_ROUTES + ADMIN_ROUTES:
        status, body = api.call(method, path)
        assert status == 401, (method, path, status)
        error = body.get("error") or body["results"]["error"]
        assert error["code"] == "unauthorized", (method, path)


def test_read_token_reads(api: Api) -> None:
    for method, path in READ_ROUTES:
        status, _ = api.call(method, path, api.read)
        assert status not in (401, 403), (method, path, status)


def test_read_token_cannot_mutate_or_read_admin(api: Api) -> None:
    for method, path in ADMIN_ROUTES:
        status, body = api.call(method, path, api.read)
        assert status == 403, (method, path, status)
        error = body.get("error") or body["results"]["error"]
        assert error["code"] == "forbidden", (method, path)


def test_admin_token_passes_everywhere(api: Api) -> None:
    for method, path in OPEN_ROUTES + READ_ROUTES + ADMIN_ROUTES:
        status, _ = api.call(method, path, api.admin)
        assert status not in (401, 403), (method, path, status)


def test_unknown_route_fails_closed(api: Api) -> None:
    assert api.call("GET", "/v1/secret")[0] == 401
    assert api.call("GET", "/v1/secret", api.read)[0] == 403
    assert api.call("GET", "/v1/secret", api.admin)[0] == 404


def test_keylime_route_errors_use_keylime_envelope(api: Api) -> None:
    status, body = api.call("GET", "/v2.1/agents/")

    assert status == 401
    assert body["code"] == 401
    assert body["results"]["error"]["code"] == "unauthorized"


def test_admin_mutation_takes_effect(api: Api) -> None:
    pcr_policy = {"pcrs": {"sha256": {"7": ["00" * 32]}}}
    admin = {"Authorization": f"Bearer {api.admin}"}
    read = {"Authorization": f"Bearer {api.read}"}

    created = api.client.post("/v1/policies/fleet", headers=admin, json={"kind": "pcr", "policy": pcr_policy})
    denied = api.client.delete("/v1/policies/fleet", headers=read)
    deleted = api.client.delete("/v1/policies/fleet", headers=admin)

    assert created.status_code == 201, created.get_json()
    assert denied.status_code == 403
    assert deleted.status_code == 200, deleted.get_json()


# --- bad tokens ---------------------------------------------------------------------------------


def test_revoked_token_is_rejected(api: Api) -> None:
    with transaction(api.sessions) as session:
        revoke_token(session, "gate", now=datetime.now(UTC))

    response = api.client.post("/v1/verdicts:batch", json={"device_ids": []},
                               headers={"Authorization": f"Bearer {api.read}"})

    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert "revoked" in response.get_json()["error"]["message"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_expired_token_is_rejected(api: Api) -> None:
    expired = new_token(api.sessions, "old", Scope.ADMIN, expires_at=datetime.now(UTC) - timedelta(seconds=1))

    response = api.client.get("/v1/policies", headers={"Authorization": f"Bearer {expired}"})

    assert response.status_code == 401
    assert "expired" in response.get_json()["error"]["message"]


@pytest.mark.parametrize("header", [
    "Bearer et_" + "A" * 43,
    "Bearer et_short",
    "Bearer " + "x" * 46,
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "",
])
def test_bad_authorization_header_is_rejected(api: Api, header: str) -> None:
    response = api.client.get("/v1/keys", headers={"Authorization": header})

    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_tokens_never_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with transaction(api.sessions) as session:
        revoke_token(session, "gate", now=datetime.now(UTC))

    api.client.get("/v1/keys", headers={"Authorization": f"Bearer {api.read}"})
    api.client.get("/v1/policies", headers={"Authorization": f"Bearer {api.admin}"})
    api.client.get("/v1/keys", headers={"Authorization": "Bearer et_" + "B" * 43})

    assert api.read not in caplog.text
    assert api.admin not in caplog.text
    assert "B" * 43 not in caplog.text


# --- settings -----------------------------------------------------------------------------------


def test_auth_off_opens_api_with_warning(engine: Engine, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgetrust.auth")

    api = make_api(engine, tmp_path, api_auth=False)

    assert api.call("GET", "/v1/policies")[0] == 200
    assert "API authentication is off" in caplog.text


def test_admission_accepts_listed_client_certificate(engine: Engine, tmp_path: Path) -> None:
    api = make_api(engine, tmp_path, admission_client_cns=["kube-apiserver"])

    listed = api.client.post("/v1/admission", json={}, environ_base={"SSL_CLIENT_S_DN_CN": "kube-apiserver"})
    other = api.client.post("/v1/admission", json={}, environ_base={"SSL_CLIENT_S_DN_CN": "someone"})
    spoofed = api.client.post("/v1/admission", json={}, headers={"SSL-CLIENT-S-DN-CN": "kube-apiserver"})
    elsewhere = api.client.post("/v1/gate", json={}, environ_base={"SSL_CLIENT_S_DN_CN": "kube-apiserver"})

    assert listed.status_code not in (401, 403)
    assert other.status_code == 401
    assert spoofed.status_code == 401
    assert elsewhere.status_code == 401


# --- the token store ----------------------------------------------------------------------------


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def test_store_keeps_only_the_digest(sessions: sessionmaker[Session]) -> None:
    text = new_token(sessions, "ci", Scope.READ)

    with sessions() as session:
        row = session.scalars(select(ApiToken)).one()
        identity = authenticate(session, text, now=NOW)

    assert text.startswith("et_")
    assert len(text) == 46
    assert text[3:] not in row.secret_sha256
    assert len(row.secret_sha256) == 64
    assert identity.name == "ci"
    assert identity.scope is Scope.READ


@pytest.mark.parametrize(("name", "code"), [("bad name", "token-name-invalid"), ("", "token-name-invalid")])
def test_store_rejects_invalid_name(sessions: sessionmaker[Session], name: str, code: str) -> None:
    with pytest.raises(TokenError) as raised, transaction(sessions) as session:
        create_token(session, name, Scope.READ, now=NOW)

    assert raised.value.code == code


def test_store_rejects_duplicate_name(sessions: sessionmaker[Session]) -> None:
    new_token(sessions, "ci", Scope.READ)

    with pytest.raises(TokenError) as raised, transaction(sessions) as session:
        create_token(session, "ci", Scope.ADMIN, now=NOW)

    assert raised.value.code == "token-exists"


def test_store_revoke_keeps_first_time(sessions: sessionmaker[Session]) -> None:
    new_token(sessions, "ci", Scope.READ)
    with transaction(sessions) as session:
        first = revoke_token(session, "ci", now=NOW).revoked_at
    with transaction(sessions) as session:
        second = revoke_token(session, "ci", now=NOW + timedelta(hours=1)).revoked_at

    assert first is not None
    assert second is not None
    assert as_utc(second) == as_utc(first) == NOW


def test_store_revoke_unknown_name(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(TokenError) as raised, transaction(sessions) as session:
        revoke_token(session, "nobody", now=NOW)

    assert raised.value.code == "token-not-found"


@pytest.mark.parametrize(("token", "code"), [
    ("et_" + "A" * 43, "token-unknown"),
    ("et_" + "A" * 42 + "!", "token-malformed"),
    ("xx_" + "A" * 43, "token-malformed"),
])
def test_store_rejects_bad_tokens(sessions: sessionmaker[Session], token: str, code: str) -> None:
    with pytest.raises(TokenError) as raised, sessions() as session:
        authenticate(session, token, now=NOW)

    assert raised.value.code == code


def test_scope_allows() -> None:
    assert Scope.ADMIN.allows(Scope.ADMIN)
    assert Scope.ADMIN.allows(Scope.READ)
    assert Scope.READ.allows(Scope.READ)
    assert not Scope.READ.allows(Scope.ADMIN)


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_creates_lists_and_revokes(engine: Engine, tmp_path: Path) -> None:
    env = {"EDGETRUST_DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "EDGETRUST_DATA_DIR": str(tmp_path)}
    runner = CliRunner()

    created = runner.invoke(main, ["token", "create", "--name", "ci", "--scope", "read",
                                   "--expires-in", "30"], env=env)
    text = created.stdout.strip()
    listed = runner.invoke(main, ["token", "list"], env=env)
    revoked = runner.invoke(main, ["token", "revoke", "ci"], env=env)
    after = runner.invoke(main, ["token", "list"], env=env)

    assert created.exit_code == 0, created.output
    assert text.startswith("et_")
    assert listed.exit_code == 0, listed.output
    assert "ci" in listed.stdout
    assert "active" in listed.stdout
    assert text not in listed.output
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in after.stdout
    with make_session_factory(engine)() as session:
        assert [token.name for token in list_tokens(session)] == ["ci"]


def test_cli_rejects_duplicate_name(engine: Engine, tmp_path: Path) -> None:
    env = {"EDGETRUST_DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "EDGETRUST_DATA_DIR": str(tmp_path)}
    runner = CliRunner()

    runner.invoke(main, ["token", "create", "--name", "ci", "--scope", "admin"], env=env)
    again = runner.invoke(main, ["token", "create", "--name", "ci", "--scope", "admin"], env=env)

    assert again.exit_code == 1
    assert "exists" in again.output
