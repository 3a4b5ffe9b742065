"""POST /v1/evidence:verify on SQLite and PostgreSQL: good and tampered evidence from a software-TPM
device (verifier.fleet_sim), stored and inline policies, fields named in validation errors, and
nothing written to the database."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, MetaData, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import import_all_models, make_session_factory
from edgetrust.settings import Settings
from tests.verifier.conftest import store_runtime_policy
from verifier.fleet_sim import SimulatedDevice, make_files, runtime_policy_document

NONCE = "q2Vd8sKq0Lr1mZ3xYt7u"


@pytest.fixture
def client(migrated_engine: Engine, tmp_path: Path) -> FlaskClient:
    settings = Settings(data_dir=tmp_path, api_auth=False,
                        database_url=migrated_engine.url.render_as_string(hide_password=False))
    return create_app(settings, engine=migrated_engine).test_client()


@pytest.fixture
def sessions(migrated_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(migrated_engine)


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(5)


@pytest.fixture
def device(files: dict[str, bytes]) -> SimulatedDevice:
    return SimulatedDevice("check-car", files=dict(files))


def request_body(device: SimulatedDevice, policies: dict[str, Any], *, nonce: str = NONCE,
                 mask: str = "0x107ff") -> dict[str, Any]:
    """Quote the device over ``nonce`` and build a verify request from its response."""
    status, body = device.answer_quote({"nonce": nonce, "mask": mask, "ima_ml_entry": "0"})
    assert status == 200
    results = body["results"]
    return {
        "ak_tpm": base64.b64encode(device.tpm.ak_tpm).decode(),
        "ek_tpm": base64.b64encode(device.tpm.ek_tpm).decode(),
        "nonce": NONCE,
        "mask": mask,
        "quote": results["quote"],
        "hash_alg": results["hash_alg"],
        "ima_measurement_list": results["ima_measurement_list"],
        "ima_measurement_list_entry": results["ima_measurement_list_entry"],
        "policies": policies,
        "device_id": device.device_id,
    }


def check(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/evidence:verify", json=body)
    assert response.status_code == 200, response.get_json()
    answer: dict[str, Any] = response.get_json()
    return answer


def error_codes(answer: dict[str, Any]) -> list[str]:
    return [finding["code"] for finding in answer["findings"] if finding["severity"] == "error"]


def row_counts(engine: Engine) -> dict[str, int]:
    metadata: MetaData = import_all_models()
    with engine.connect() as connection:
        return {table.name: connection.scalar(select(func.count()).select_from(table)) or 0
                for table in metadata.sorted_tables}


# --- good and tampered evidence -----------------------------------------------------------------


def test_verify_good_evidence_trusted(client: FlaskClient, device: SimulatedDevice,
                                      files: dict[str, bytes], migrated_engine: Engine) -> None:
    before = row_counts(migrated_engine)

    answer = check(client, request_body(device, {"runtime": runtime_policy_document(files)}))

    assert answer["verdict"]["status"] == "trusted"
    assert answer["verdict"]["device_id"] == "check-car"
    assert answer["verdict"]["policies"][0]["name"] == "inline"
    assert error_codes(answer) == []
    assert row_counts(migrated_engine) == before


def test_verify_stored_policy_by_name(client: FlaskClient, sessions: sessionmaker[Session],
                                      device: SimulatedDevice, files: dict[str, bytes]) -> None:
    store_runtime_policy(sessions, files, name="fleet")

    answer = check(client, request_body(device, {"runtime": "fleet"}))

    assert answer["verdict"]["status"] == "trusted"
    assert answer["verdict"]["policies"][0]["name"] == "fleet"
    assert answer["verdict"]["policies"][0]["version"] == 1


def test_verify_changed_file_untrusted(client: FlaskClient, device: SimulatedDevice,
                                       files: dict[str, bytes]) -> None:
    device.measure("/usr/bin/tool0", b"\x02" * 32)

    answer = check(client, request_body(device, {"runtime": runtime_policy_document(files)}))

    assert answer["verdict"]["status"] == "untrusted"
    assert error_codes(answer) == ["ima-digest-not-allowed"]


def test_verify_tampered_list_untrusted(client: FlaskClient, device: SimulatedDevice,
                                        files: dict[str, bytes]) -> None:
    body = request_body(device, {"runtime": runtime_policy_document(files)})
    lines = body["ima_measurement_list"].splitlines(keepends=True)
    body["ima_measurement_list"] = "".join(lines[:-1])  # hide the newest entry

    answer = check(client, body)

    assert answer["verdict"]["status"] == "untrusted"
    assert error_codes(answer) == ["ima-pcr-mismatch"]


def test_verify_tampered_quote_untrusted(client: FlaskClient, device: SimulatedDevice,
                                         files: dict[str, bytes]) -> None:
    body = request_body(device, {"runtime": runtime_policy_document(files)})
    attest, signature, pcrs = body["quote"][1:].split(":")
    raw = bytearray(base64.b64decode(attest))
    raw[-1] ^= 1
    body["quote"] = "r" + ":".join([base64.b64encode(bytes(raw)).decode(), signature, pcrs])

    answer = check(client, body)

    assert answer["verdict"]["status"] == "untrusted"
    assert error_codes(answer) == ["quote-signature-invalid"]


def test_verify_wrong_nonce_untrusted(client: FlaskClient, device: SimulatedDevice) -> None:
    body = request_body(device, {}, nonce="SomeOtherNonce123")

    answer = check(client, body)

    assert answer["verdict"]["status"] == "untrusted"
    assert error_codes(answer) == ["quote-nonce-mismatch"]


def test_verify_foreign_ek_reported(client: FlaskClient, device: SimulatedDevice) -> None:
    other = SimulatedDevice("other", files={})
    body = request_body(device, {})
    body["ek_tpm"] = base64.b64encode(other.tpm.ek_tpm).decode()

    answer = check(client, body)

    assert answer["verdict"]["status"] == "untrusted"
    assert error_codes(answer) == ["quote-qualified-signer-mismatch"]


def test_verify_mask_defaults_to_policy_pcrs(client: FlaskClient, device: SimulatedDevice,
                                             files: dict[str, bytes]) -> None:
    body = request_body(device, {"runtime": runtime_policy_document(files)})
    del body["mask"]

    answer = check(client, body)

    assert answer["verdict"]["status"] == "trusted"


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"ak_tpm": None}, "ak_tpm", 400),
        ({"ak_tpm": base64.b64encode(b"\x00\x04abcd").decode()}, "ak_tpm", 400),
        ({"ak_tpm": "%%%"}, "ak_tpm", 400),
        ({"ek_tpm": base64.b64encode(b"junk").decode()}, "ek_tpm", 400),
        ({"nonce": None}, "nonce", 400),
        ({"nonce": "has spaces"}, "nonce", 400),
        ({"mask": "0x1000000"}, "mask", 400),
        ({"quote": None}, "quote", 400),
        ({"ima_measurement_list_entry": 3}, "ima_measurement_list_entry", 400),
        ({"policies": ["fleet"]}, "policies", 400),
        ({"policies": {"boot": "fleet"}}, "policies.boot", 400),
        ({"policies": {"runtime": "no-such-policy"}}, "policies.runtime", 404),
        ({"policies": {"runtime": {"meta": {}}}}, "policies.runtime", 400),
        ({"policies": {"pcr": 7}}, "policies.pcr", 400),
    ],
)
def test_verify_names_invalid_field(client: FlaskClient, device: SimulatedDevice, change: dict[str, Any],
                                    field: str, status: int) -> None:
    body = {**request_body(device, {}), **change}
    body = {key: value for key, value in body.items() if value is not None}

    response = client.post("/v1/evidence:verify", json=body)

    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["field"] == field


def test_verify_rejects_policy_of_other_kind(client: FlaskClient, sessions: sessionmaker[Session],
                                             device: SimulatedDevice, files: dict[str, bytes]) -> None:
    store_runtime_policy(sessions, files, name="fleet")

    response = client.post("/v1/evidence:verify", json=request_body(device, {"pcr": "fleet"}))

    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "policies.pcr"
    assert "runtime policy" in response.get_json()["error"]["message"]


def test_verify_rejects_non_json(client: FlaskClient) -> None:
    response = client.post("/v1/evidence:verify", data=json.dumps([1, 2]), content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid-json"
