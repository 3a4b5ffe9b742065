"""The policy REST API over real HTTP on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select, text

from edgetrust.app import create_app
from edgetrust.db import make_session_factory, transaction
from edgetrust.settings import Settings
from policies.dsse import sign_envelope
from policies.runtime import empty_policy_document
from tests.support.server import serving
from verifier import policy_store
from verifier.policy_api import PolicyApi
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


@pytest.fixture
def app(migrated_engine: Engine, tmp_path: Path) -> Any:
    settings = Settings(data_dir=tmp_path, ek_ca_dir=tmp_path / "ek-ca")
    return create_app(settings, engine=migrated_engine)


@pytest.fixture
def api(app: Any, migrated_engine: Engine) -> Iterator[Api]:
    policy_store.COMPILED_POLICIES.clear()
    now = datetime.now(UTC)
    with transaction(make_session_factory(migrated_engine)) as session:
        _admin, admin_token = create_token(session, "policy-admin", Scope.ADMIN, now=now)
        _reader, read_token = create_token(session, "policy-reader", Scope.READ, now=now)
    with serving(app) as server:
        yield Api(server.url, migrated_engine, admin_token, read_token)


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


def test_configured_keys_verify_uploads(app: Any, api: Api) -> None:
    app.extensions["edgetrust"].extras["policies"] = PolicyApi(
        trusted_keys=(public_pem(OTHER_KEY).encode(), public_pem().encode())
    )
    upload = signed_upload(runtime_policy())
    del upload["public_key"]

    trusted = api.post("signed", upload)
    with_key = api.post("other", signed_upload(runtime_policy()))
    untrusted = api.post("untrusted", {**signed_upload(runtime_policy(), ec.generate_private_key(
        ec.SECP256R1())), "public_key": None})

    assert trusted.status_code == 201
    assert with_key.status_code == 400
    assert error_of(with_key)["field"] == "public_key"
    assert untrusted.status_code == 403


def test_signed_payload_errors_name_field(api: Api) -> None:
    document = runtime_policy()
    document["excludes"] = ["*"]

    response = api.post("signed", signed_upload(document))

    assert response.status_code == 400
    assert error_of(response)["code"] == "policy-exclude-invalid"
    assert error_of(response)["field"] == "envelope.payload.excludes[0]"


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
