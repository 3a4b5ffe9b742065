"""The policy REST API over real HTTP on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine, func, select, text

from edgetrust.app import create_app
from edgetrust.db import make_session_factory, transaction
from edgetrust.settings import Settings, SettingsError
from policies import dsse
from policies.dsse import sign_envelope
from policies.runtime import empty_policy_document
from tests.support.server import serving
from verifier import policy_store
from verifier.policy_models import Policy, PolicyContent, PolicyVersion
from verifier.tokens import Scope, create_token

SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def private_pem(key: ec.EllipticCurvePrivateKey = SIGNING_KEY) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: ec.EllipticCurvePrivateKey = SIGNING_KEY) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def runtime_policy(paths: int = 3, *, seed: str = "") -> dict[str, Any]:
    document = empty_policy_document()
    document["digests"] = {
        f"/usr/bin/{seed}tool{i}": [hashlib.sha256(f"{seed}{i}".encode()).hexdigest()]
        for i in range(paths)
    }
    return document


def pcr_policy(value: str = "00" * 32) -> dict[str, Any]:
    return {"pcrs": {"sha256": {"7": [value]}}}


def signed_upload(document: dict[str, Any], key: ec.EllipticCurvePrivateKey = SIGNING_KEY,
                  *, public_key: str | None = None) -> dict[str, Any]:
    envelope = json.loads(sign_envelope(json.dumps(document).encode(), private_pem(key)))
    return {"kind": "runtime", "envelope": envelope, "public_key": public_key or public_pem(key)}


class Api:
    def __init__(self, url: str, engine: Engine, admin_token: str, read_token: str) -> None:
        self.url = url + "/v1/policies"
        self.engine = engine
        self.admin_token = admin_token
        self.read_token = read_token
        self.headers = {"Authorization": f"Bearer {admin_token}"}
        self.http = requests.Session()
        self.http.headers.update(self.headers)

    def post(self, name: str, body: Any) -> requests.Response:
        return self.http.post(f"{self.url}/{name}", json=body, timeout=60)

    def put(self, name: str, body: Any) -> requests.Response:
        return self.http.put(f"{self.url}/{name}", json=body, timeout=60)

    def get(self, name: str = "", **params: Any) -> requests.Response:
        path = f"{self.url}/{name}" if name else self.url
        return self.http.get(path, params=params, timeout=60)

    def delete(self, name: str) -> requests.Response:
        return self.http.delete(f"{self.url}/{name}", timeout=60)

    def count(self, table: type[Any]) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(table)) or 0


def make_app(engine: Engine, data_dir: Path, **settings: Any) -> Any:
    return create_app(Settings(data_dir=data_dir, ek_ca_dir=data_dir / "ek-ca", **settings),
                      engine=engine)


@contextmanager
def serving_api(app: Any, engine: Engine) -> Iterator[Api]:
    policy_store.COMPILED_POLICIES.clear()
    now = datetime.now(UTC)
    with transaction(make_session_factory(engine)) as session:
        _admin, admin_token = create_token(session, "policy-admin", Scope.ADMIN, now=now)
        _reader, read_token = create_token(session, "policy-reader", Scope.READ, now=now)
    with serving(app) as server:
        yield Api(server.url, engine, admin_token, read_token)


@pytest.fixture
def app(migrated_engine: Engine, tmp_path: Path) -> Any:
    return make_app(migrated_engine, tmp_path)


@pytest.fixture
def api(app: Any, migrated_engine: Engine) -> Iterator[Api]:
    with serving_api(app, migrated_engine) as api:
        yield api


def error_of(response: requests.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


# --- Uploads and reads ------------------------------------------------------------------------


def test_post_creates_version_one(api: Api) -> None:
    response = api.post("fleet", {"kind": "runtime", "policy": runtime_policy()})

    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "fleet"
    assert body["kind"] == "runtime"
    assert body["version"] == 1
    assert body["created"] is True
    assert body["signed_by"] is None
    assert len(body["content_hash"]) == 64


def test_get_returns_policy_body(api: Api) -> None:
    created = api.post("fleet", {"kind": "pcr", "policy": pcr_policy()}).json()

    response = api.get("fleet")

    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 1
    assert body["content_hash"] == created["content_hash"]
    assert body["policy"] == pcr_policy()
    assert body["created_at"].endswith("+00:00")


def test_post_existing_name_conflicts(api: Api) -> None:
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    response = api.post("fleet", {"kind": "pcr", "policy": pcr_policy("11" * 32)})

    assert response.status_code == 409
    assert error_of(response)["code"] == "policy-exists"
    assert api.count(PolicyVersion) == 1


def test_put_adds_versions(api: Api) -> None:
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    second = api.put("fleet", {"kind": "pcr", "policy": pcr_policy("11" * 32)})
    unchanged = api.put("fleet", {"kind": "pcr", "policy": pcr_policy("11" * 32)})

    assert second.status_code == 201
    assert second.json()["version"] == 2
    assert unchanged.status_code == 200
    assert unchanged.json()["version"] == 2
    assert unchanged.json()["created"] is False
    assert api.get("fleet").json()["version"] == 2
    assert api.get("fleet", version=1).json()["policy"] == pcr_policy()


def test_put_missing_name_is_not_found(api: Api) -> None:
    response = api.put("missing", {"kind": "pcr", "policy": pcr_policy()})

    assert response.status_code == 404
    assert error_of(response)["code"] == "policy-not-found"
    assert api.count(Policy) == 0


def test_put_other_kind_conflicts(api: Api) -> None:
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    response = api.put("fleet", {"kind": "runtime", "policy": runtime_policy()})

    assert response.status_code == 409
    assert error_of(response)["code"] == "policy-kind-conflict"
    assert error_of(response)["field"] == "kind"


def test_same_content_stored_once(api: Api) -> None:
    document = runtime_policy(50)

    api.post("site-a", {"kind": "runtime", "policy": document})
    api.post("site-b", {"kind": "runtime", "policy": document})

    assert api.count(PolicyContent) == 1
    assert api.count(PolicyVersion) == 2


def test_list_returns_latest_versions(api: Api) -> None:
    api.post("b-fleet", {"kind": "pcr", "policy": pcr_policy()})
    api.put("b-fleet", {"kind": "pcr", "policy": pcr_policy("11" * 32)})
    api.post("a-fleet", {"kind": "runtime", "policy": runtime_policy()})

    listed = api.get().json()["policies"]
    runtime_only = api.get(kind="runtime").json()["policies"]

    assert [(item["name"], item["version"]) for item in listed] == [("a-fleet", 1), ("b-fleet", 2)]
    assert "policy" not in listed[0]
    assert [item["name"] for item in runtime_only] == ["a-fleet"]


def test_get_missing_version(api: Api) -> None:
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    missing = api.get("fleet", version=5)
    invalid = api.get("fleet", version="first")

    assert missing.status_code == 404
    assert error_of(missing)["field"] == "version"
    assert invalid.status_code == 400
    assert error_of(invalid)["field"] == "version"


def test_measured_boot_policy_round_trip(api: Api, fixtures_dir: Path) -> None:
    from evidence.eventlog import parse_event_log
    from policies.measured_boot_generate import create_measured_boot_policy

    raw = (fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-secureboot").read_bytes()
    document = create_measured_boot_policy(parse_event_log(raw))

    created = api.post("boot", {"kind": "measured-boot", "policy": document})

    assert created.status_code == 201
    assert api.get("boot").json()["policy"] == document


# --- Signed uploads ---------------------------------------------------------------------------


def test_signed_upload_is_stored_with_envelope(api: Api) -> None:
    upload = signed_upload(runtime_policy())

    response = api.post("signed", upload)

    assert response.status_code == 201
    assert len(response.json()["signed_by"]) == 64
    stored = api.get("signed").json()
    assert stored["envelope"] == upload["envelope"]
    assert stored["policy"]["digests"] == runtime_policy()["digests"]


def test_signed_upload_of_keylime_fixture(api: Api, fixtures_dir: Path) -> None:
    envelope = json.loads((fixtures_dir / "policy" / "keylime-runtime-policy-test-signed.json").read_text())
    public_key = (fixtures_dir / "policy" / "keylime-runtime-policy-pubkey.pub").read_text()

    good = api.post("coreos", {"kind": "runtime", "envelope": envelope, "public_key": public_key})

    assert good.status_code == 201
    bad_envelope = json.loads(
        (fixtures_dir / "policy" / "keylime-runtime-policy-test-signed-bad.json").read_text()
    )
    bad = api.put("coreos", {"kind": "runtime", "envelope": bad_envelope, "public_key": public_key})
    assert bad.status_code == 403
    assert error_of(bad)["code"] == "dsse-signature-invalid"
    assert error_of(bad)["field"] == "envelope.signatures"


def test_signed_upload_with_wrong_key(api: Api) -> None:
    upload = signed_upload(runtime_policy(), public_key=public_pem(OTHER_KEY))

    response = api.post("signed", upload)

    assert response.status_code == 403
    assert error_of(response)["code"] == "dsse-signature-invalid"
    assert api.count(Policy) == 0


def test_signed_upload_needs_public_key(api: Api) -> None:
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    response = api.post("signed", upload)

    assert response.status_code == 400
    assert error_of(response)["code"] == "missing-field"
    assert error_of(response)["field"] == "public_key"


def test_signed_payload_errors_name_field(api: Api) -> None:
    document = runtime_policy()
    document["excludes"] = ["*"]

    response = api.post("signed", signed_upload(document))

    assert response.status_code == 400
    assert error_of(response)["code"] == "policy-exclude-invalid"
    assert error_of(response)["field"] == "envelope.payload.excludes[0]"


# --- Trusted signing keys (setting policy_signing_keys) ---------------------------------------


def write_public_key(directory: Path, key: ec.EllipticCurvePrivateKey = SIGNING_KEY,
                     name: str = "policy-signing.pub") -> Path:
    path = directory / name
    path.write_text(public_pem(key))
    return path


def rsa_public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_id_of(key: ec.EllipticCurvePrivateKey) -> str:
    return dsse.key_id(key.public_key())


@pytest.fixture
def trusted_api(migrated_engine: Engine, tmp_path: Path) -> Iterator[Api]:
    """The API with SIGNING_KEY as its only trusted policy signing key."""
    app = make_app(migrated_engine, tmp_path,
                   policy_signing_keys=[str(write_public_key(tmp_path))])
    with serving_api(app, migrated_engine) as api:
        yield api


@pytest.fixture
def signed_only_api(migrated_engine: Engine, tmp_path: Path) -> Iterator[Api]:
    """The API with SIGNING_KEY trusted and policy_require_signature set."""
    app = make_app(migrated_engine, tmp_path, policy_require_signature=True,
                   policy_signing_keys=[str(write_public_key(tmp_path))])
    with serving_api(app, migrated_engine) as api:
        yield api


def test_trusted_key_verifies_upload(trusted_api: Api) -> None:
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    response = trusted_api.post("signed", upload)

    assert response.status_code == 201, response.text
    assert response.json()["signed_by"] == key_id_of(SIGNING_KEY)
    assert trusted_api.get("signed").json()["envelope"] == upload["envelope"]


def test_trusted_key_may_be_named(trusted_api: Api) -> None:
    response = trusted_api.post("signed", signed_upload(runtime_policy()))

    assert response.status_code == 201, response.text
    assert response.json()["signed_by"] == key_id_of(SIGNING_KEY)


def test_trusted_keys_from_several_files(migrated_engine: Engine, tmp_path: Path) -> None:
    paths = [str(write_public_key(tmp_path, OTHER_KEY, "other.pub")),
             str(write_public_key(tmp_path))]
    app = make_app(migrated_engine, tmp_path, policy_signing_keys=paths)
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    with serving_api(app, migrated_engine) as api:
        response = api.post("signed", upload)

    assert response.status_code == 201, response.text
    assert response.json()["signed_by"] == key_id_of(SIGNING_KEY)


def test_other_key_rejected(trusted_api: Api, caplog: pytest.LogCaptureFixture) -> None:
    upload = signed_upload(runtime_policy(), OTHER_KEY)
    del upload["public_key"]

    with caplog.at_level(logging.WARNING, logger="verifier.policy_api"):
        response = trusted_api.post("signed", upload)

    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "dsse-signature-invalid"
    assert error["field"] == "envelope.signatures"
    assert "policy_signing_keys" in error["message"]
    assert trusted_api.count(Policy) == 0
    assert "policy-admin" in caplog.text
    assert "dsse-signature-invalid" in caplog.text


def test_other_public_key_rejected(trusted_api: Api) -> None:
    # The envelope verifies with the key in the request, but the server does not trust that key.
    response = trusted_api.post("signed", signed_upload(runtime_policy(), OTHER_KEY))

    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "policy-signing-key-not-trusted"
    assert error["field"] == "public_key"
    assert key_id_of(OTHER_KEY) in error["message"]
    assert trusted_api.count(Policy) == 0


def test_trusted_public_key_must_have_signed(trusted_api: Api) -> None:
    # Naming a trusted key does not help an envelope that another key signed.
    upload = signed_upload(runtime_policy(), OTHER_KEY, public_key=public_pem(SIGNING_KEY))

    response = trusted_api.post("signed", upload)

    assert response.status_code == 403
    assert error_of(response)["code"] == "dsse-signature-invalid"
    assert error_of(response)["field"] == "envelope.signatures"
    assert trusted_api.count(Policy) == 0


def tampered_payload(upload: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(base64.b64decode(upload["envelope"]["payload"]))
    document["digests"]["/usr/bin/evil"] = ["ab" * 32]
    payload = base64.b64encode(json.dumps(document).encode()).decode()
    return {**upload, "envelope": {**upload["envelope"], "payload": payload}}


def tampered_payload_type(upload: dict[str, Any]) -> dict[str, Any]:
    return {**upload, "envelope": {**upload["envelope"], "payloadType": "application/json"}}


def tampered_signature(upload: dict[str, Any]) -> dict[str, Any]:
    signature = dict(upload["envelope"]["signatures"][0])
    raw = bytearray(base64.b64decode(signature["sig"]))
    raw[-1] ^= 0x01
    signature["sig"] = base64.b64encode(bytes(raw)).decode()
    return {**upload, "envelope": {**upload["envelope"], "signatures": [signature]}}


@pytest.mark.parametrize("tamper", [tampered_payload, tampered_payload_type, tampered_signature])
def test_tampered_envelope_rejected(trusted_api: Api, tamper: Any) -> None:
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    response = trusted_api.post("signed", tamper(upload))

    assert response.status_code == 403
    assert error_of(response)["code"] == "dsse-signature-invalid"
    assert error_of(response)["field"] == "envelope.signatures"
    assert trusted_api.count(Policy) == 0


INVALID_PUBLIC_KEYS = [
    # (public_key, code)
    ("not a PEM key", "signing-key-invalid"),
    (rsa_public_pem(), "signing-key-invalid"),
    (42, "invalid-field"),
]


def check_invalid_public_keys(api: Api) -> None:
    for public_key, code in INVALID_PUBLIC_KEYS:
        response = api.post("signed", {**signed_upload(runtime_policy()), "public_key": public_key})

        assert response.status_code == 400, public_key
        assert error_of(response)["code"] == code, public_key
        assert error_of(response)["field"] == "public_key", public_key
        assert api.count(Policy) == 0


def test_invalid_public_key_names_field(api: Api) -> None:
    check_invalid_public_keys(api)


def test_invalid_trusted_public_key_names_field(trusted_api: Api) -> None:
    check_invalid_public_keys(trusted_api)


def test_unsigned_policy_allowed_by_default(trusted_api: Api) -> None:
    response = trusted_api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    assert response.status_code == 201
    assert response.json()["signed_by"] is None


def test_require_signature_rejects_unsigned(signed_only_api: Api) -> None:
    response = signed_only_api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})

    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "policy-not-signed"
    assert error["field"] == "policy"
    assert "envelope" in error["message"]
    assert signed_only_api.count(Policy) == 0


def test_require_signature_accepts_signed(signed_only_api: Api) -> None:
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    response = signed_only_api.post("signed", upload)

    assert response.status_code == 201, response.text
    assert response.json()["signed_by"] == key_id_of(SIGNING_KEY)


def test_require_signature_needs_keys(migrated_engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="policy_require_signature is true but "
                                            "policy_signing_keys is empty"):
        make_app(migrated_engine, tmp_path, policy_require_signature=True)


UNUSABLE_KEY_FILES = [
    # (file content or None for a missing file, expected message)
    (None, "cannot read the policy signing key"),
    ("", "cannot be used: public key is not a PEM public key"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "cannot be used"),
    (private_pem().decode(), "is a private key; give its public key"),
    (rsa_public_pem(), "cannot be used: public key is RSAPublicKey, expected an EC (ECDSA) key"),
]


@pytest.mark.parametrize(("content", "message"), UNUSABLE_KEY_FILES)
def test_unusable_key_file_stops_app(migrated_engine: Engine, tmp_path: Path,
                                     content: str | None, message: str) -> None:
    path = tmp_path / "policy-signing.pub"
    if content is not None:
        path.write_text(content)

    with pytest.raises(SettingsError) as caught:
        make_app(migrated_engine, tmp_path, policy_signing_keys=[str(path)])

    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert "(setting policy_signing_keys)" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_key_directory_stops_app(migrated_engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read the policy signing key .*Is a directory"):
        make_app(migrated_engine, tmp_path, policy_signing_keys=[str(tmp_path)])


def test_serve_reports_unreadable_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main
    from edgetrust.commands import server

    def run_gunicorn(*_arguments: Any, **_options: Any) -> None:
        raise AssertionError("serve started the server despite an unreadable policy signing key")

    monkeypatch.setattr(server, "run_gunicorn", run_gunicorn)
    missing = tmp_path / "absent.pub"
    environment = {"EDGETRUST_DATA_DIR": str(tmp_path), "EDGETRUST_DATABASE_URL": None,
                   "EDGETRUST_CONFIG": None, "EDGETRUST_POLICY_SIGNING_KEYS": str(missing)}

    result = CliRunner().invoke(main, ["serve"], env=environment)

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"Error: cannot read the policy signing key {missing}: No such file or "
                         "directory (setting policy_signing_keys)")
    assert "Traceback" not in result.output


def test_empty_setting_warns_once(migrated_engine: Engine, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="verifier.policy_api"):
        make_app(migrated_engine, tmp_path)

    warnings = [record for record in caplog.records
                if record.name == "verifier.policy_api" and record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "policy_signing_keys is empty" in warnings[0].getMessage()


def test_trusted_keys_logged_without_warning(migrated_engine: Engine, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="verifier.policy_api"):
        make_app(migrated_engine, tmp_path, policy_signing_keys=[str(write_public_key(tmp_path))])

    records = [record for record in caplog.records if record.name == "verifier.policy_api"]
    assert [record.levelno for record in records] == [logging.INFO]
    assert key_id_of(SIGNING_KEY) in records[0].getMessage()


def test_empty_setting_keeps_request_key(api: Api) -> None:
    response = api.post("signed", signed_upload(runtime_policy(), OTHER_KEY))

    assert response.status_code == 201, response.text
    assert response.json()["signed_by"] == key_id_of(OTHER_KEY)


def test_cli_upload_to_trusted_server(trusted_api: Api, tmp_path: Path) -> None:
    envelope_file = tmp_path / "signed.json"
    envelope_file.write_text(json.dumps(signed_upload(runtime_policy())["envelope"]))

    without_key = run_cli(trusted_api, "upload", "signed", str(envelope_file), "--kind", "runtime")
    with_key = run_cli(trusted_api, "upload", "signed", str(envelope_file), "--kind", "runtime",
                       "--public-key", str(write_public_key(tmp_path, name="cli.pub")))

    assert without_key.exit_code == 0, without_key.output
    assert "version 1" in without_key.output
    assert with_key.exit_code == 0, with_key.output
    assert "unchanged, still version 1" in with_key.output


# --- Validation errors ------------------------------------------------------------------------


INVALID_UPLOADS = [
    # (body, code, field)
    ({"policy": runtime_policy()}, "missing-field", "kind"),
    ({"kind": "ima", "policy": runtime_policy()}, "policy-kind-invalid", "kind"),
    ({"kind": "runtime"}, "missing-field", "policy"),
    ({"kind": "runtime", "policy": [1]}, "invalid-field", "policy"),
    ({"kind": "runtime", "policy": runtime_policy(), "envelope": {}}, "invalid-field", "policy"),
    ({"kind": "runtime", "policy": {**runtime_policy(), "digests": {"/bin/sh": ["xyz"]}}},
     "policy-digest-invalid", 'policy.digests["/bin/sh"][0]'),
    ({"kind": "runtime", "policy": {k: v for k, v in runtime_policy().items() if k != "ima"}},
     "policy-field-missing", "policy.ima"),
    ({"kind": "runtime", "policy": {**runtime_policy(), "excludes": ["/tmp/.*", "*"]}},
     "policy-exclude-invalid", "policy.excludes[1]"),
    ({"kind": "pcr", "policy": {"pcrs": {"sha256": {"7": ["00"]}}}},
     "policy-digest-invalid", 'policy.pcrs.sha256["7"][0]'),
    ({"kind": "measured-boot", "policy": {"kernels": []}}, "policy-field-missing",
     "policy.pk"),
    ({"kind": "image-signature", "policy": {"keys": {"k": "not pem"}, "rules": []}},
     "image-signature-key-invalid", 'policy.keys["k"]'),
    ({"kind": "runtime", "envelope": {"payload": "!!", "payloadType": "x", "signatures": []},
      "public_key": public_pem()}, "dsse-envelope-invalid", "envelope.payload"),
]


@pytest.mark.parametrize(("body", "code", "field"), INVALID_UPLOADS)
def test_invalid_upload_names_field(api: Api, body: dict[str, Any], code: str, field: str) -> None:
    response = api.post("fleet", body)

    assert response.status_code == 400
    assert error_of(response)["code"] == code
    assert error_of(response)["field"] == field
    assert api.count(Policy) == 0
    assert api.count(PolicyContent) == 0


def test_invalid_name_rejected(api: Api) -> None:
    response = api.post("bad name!", {"kind": "pcr", "policy": pcr_policy()})

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-policy-name"


def test_body_not_json_rejected(api: Api) -> None:
    response = api.http.post(f"{api.url}/fleet", data=b"{not json", timeout=30)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-json"


# --- Deletes ----------------------------------------------------------------------------------


def test_delete_removes_policy(api: Api) -> None:
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})
    api.put("fleet", {"kind": "pcr", "policy": pcr_policy("11" * 32)})

    response = api.delete("fleet")

    assert response.status_code == 200
    assert response.json()["deleted_versions"] == 2
    assert api.get("fleet").status_code == 404
    assert api.count(PolicyContent) == 0


def test_delete_missing_is_not_found(api: Api) -> None:
    response = api.delete("missing")

    assert response.status_code == 404
    assert error_of(response)["code"] == "policy-not-found"


def test_delete_in_use_conflicts(api: Api, migrated_engine: Engine) -> None:
    # A stand-in for the verifier's device table: a foreign key to policies.name.
    with migrated_engine.begin() as connection:
        connection.execute(text(
            "CREATE TABLE test_devices (device_id VARCHAR(64) PRIMARY KEY, "
            "policy_name VARCHAR(255) REFERENCES policies (name))"
        ))
    api.post("fleet", {"kind": "pcr", "policy": pcr_policy()})
    with migrated_engine.begin() as connection:
        connection.execute(text("INSERT INTO test_devices VALUES ('car-1', 'fleet')"))

    response = api.delete("fleet")

    assert response.status_code == 409
    assert error_of(response)["code"] == "policy-in-use"
    assert api.get("fleet").status_code == 200


# --- Concurrency and size ---------------------------------------------------------------------


def test_concurrent_puts_give_consecutive_versions(api: Api) -> None:
    api.post("contested", {"kind": "pcr", "policy": pcr_policy()})
    uploads = 10
    barrier = threading.Barrier(uploads)
    statuses: list[int] = []
    versions: list[int] = []

    def upload(index: int) -> None:
        session = requests.Session()
        session.headers.update(api.headers)
        barrier.wait()
        response = session.put(f"{api.url}/contested",
                               json={"kind": "pcr", "policy": pcr_policy(f"{index + 1:064x}")},
                               timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 201:
            versions.append(response.json()["version"])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert statuses == [201] * uploads
    assert sorted(versions) == list(range(2, uploads + 2))


def test_concurrent_posts_of_one_name(api: Api) -> None:
    uploads = 6
    barrier = threading.Barrier(uploads)
    statuses: list[int] = []

    def upload(index: int) -> None:
        session = requests.Session()
        session.headers.update(api.headers)
        barrier.wait()
        response = session.post(f"{api.url}/racing",
                                json={"kind": "pcr", "policy": pcr_policy(f"{index + 1:064x}")},
                                timeout=60)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert sorted(statuses) == [201] + [409] * (uploads - 1)
    assert api.count(PolicyVersion) == 1


@pytest.mark.slow
def test_big_policy_upload(api: Api) -> None:
    # 200,000 digests (about 20 MB of JSON): stored once, read back whole.
    document = runtime_policy(200_000, seed="big")

    created = api.post("big", {"kind": "runtime", "policy": document})
    again = api.post("big-copy", {"kind": "runtime", "policy": document})

    assert created.status_code == 201
    assert again.status_code == 201
    assert api.count(PolicyContent) == 1
    assert len(api.get("big").json()["policy"]["digests"]) == 200_000


# --- Authentication ---------------------------------------------------------------------------


def test_routes_need_token(api: Api) -> None:
    anonymous = requests.Session()

    responses = [
        anonymous.post(f"{api.url}/fleet", json={"kind": "pcr", "policy": pcr_policy()}, timeout=30),
        anonymous.get(api.url, timeout=30),
        anonymous.delete(f"{api.url}/fleet", timeout=30),
    ]

    assert [response.status_code for response in responses] == [401, 401, 401]
    assert api.count(Policy) == 0


def test_read_token_cannot_change_policies(api: Api) -> None:
    reader = requests.Session()
    reader.headers["Authorization"] = f"Bearer {api.read_token}"

    response = reader.post(f"{api.url}/fleet", json={"kind": "pcr", "policy": pcr_policy()},
                           timeout=30)

    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"
    assert api.count(Policy) == 0


def test_cli_without_token_is_rejected(api: Api) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main

    server = api.url.removesuffix("/v1/policies")
    result = CliRunner().invoke(main, ["policy", "store", "list", "--server", server],
                                env={"EDGETRUST_TOKEN": ""})

    assert result.exit_code == 1
    assert "unauthorized" in result.output


# --- Command line -----------------------------------------------------------------------------


def run_cli(api: Api, *arguments: str) -> Any:
    from click.testing import CliRunner

    from edgetrust.cli import main

    server = api.url.removesuffix("/v1/policies")
    return CliRunner().invoke(main, ["policy", "store", *arguments, "--server", server,
                                     "--token", api.admin_token])


def test_cli_upload_list_show_delete(api: Api, tmp_path: Path) -> None:
    policy_file = tmp_path / "pcr.json"
    policy_file.write_text(json.dumps(pcr_policy()))
    shown_file = tmp_path / "shown_file.json"

    first = run_cli(api, "upload", "fleet", str(policy_file), "--kind", "pcr")
    policy_file.write_text(json.dumps(pcr_policy("11" * 32)))
    second = run_cli(api, "upload", "fleet", str(policy_file), "--kind", "pcr")
    listed = run_cli(api, "list")
    show = run_cli(api, "show", "fleet", "--version", "1", "-o", str(shown_file))
    deleted = run_cli(api, "delete", "fleet")

    assert first.exit_code == 0, first.output
    assert "version 1" in first.output
    assert second.exit_code == 0, second.output
    assert "version 2" in second.output
    assert "fleet\tpcr\tversion 2" in listed.output
    assert show.exit_code == 0, show.output
    assert json.loads(shown_file.read_text()) == pcr_policy()
    assert deleted.exit_code == 0, deleted.output
    assert "2 versions" in deleted.output


def test_cli_upload_signed_envelope(api: Api, tmp_path: Path) -> None:
    envelope_file = tmp_path / "signed.json"
    envelope_file.write_text(json.dumps(signed_upload(runtime_policy())["envelope"]))
    key_file = tmp_path / "key.pem"
    key_file.write_text(public_pem())

    result = run_cli(api, "upload", "signed", str(envelope_file), "--kind", "runtime",
                     "--public-key", str(key_file))

    assert result.exit_code == 0, result.output
    assert api.get("signed").json()["signed_by"] is not None


def test_cli_reports_rejection(api: Api, tmp_path: Path) -> None:
    policy_file = tmp_path / "pcr.json"
    policy_file.write_text(json.dumps({"pcrs": {"sha256": {"7": ["00"]}}}))

    result = run_cli(api, "upload", "fleet", str(policy_file), "--kind", "pcr")

    assert result.exit_code == 1
    assert "policy-digest-invalid" in result.output
    assert 'policy.pcrs.sha256["7"][0]' in result.output


def test_cli_unreachable_server(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgetrust.cli import main

    # Port 9 (discard) on loopback: nothing listens there in the test environment.
    result = CliRunner().invoke(main, ["policy", "store", "list", "--server", "http://127.0.0.1:9"])

    assert result.exit_code == 2
    assert "failed" in result.output
