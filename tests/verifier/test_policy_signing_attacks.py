"""Hostile policy uploads that must get a client error, not a 500, from a server with trusted keys.

The server runs over real HTTP on 127.0.0.1 with SIGNING_KEY as its only key of the setting
policy_signing_keys and policy_require_signature set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.verifier.test_policy_api import (
    OTHER_KEY,
    SIGNING_KEY,
    Api,
    error_of,
    make_app,
    private_pem,
    runtime_policy,
    serving_api,
    sign_envelope,
    signed_upload,
    write_public_key,
)
from verifier.policy_models import Policy

# Lone UTF-16 surrogates are valid JSON string escapes, and json.loads keeps them in the str,
# but such a str has no UTF-8 form.
LONE_SURROGATE = "\ud800"


@pytest.fixture
def signed_only(migrated_engine: Engine, tmp_path: Path) -> Iterator[Api]:
    app = make_app(migrated_engine, tmp_path, policy_require_signature=True,
                   policy_signing_keys=[str(write_public_key(tmp_path))])
    with serving_api(app, migrated_engine) as api:
        yield api


def foreign_upload() -> dict[str, Any]:
    """An upload signed with OTHER_KEY, which the server does not trust, without public_key."""
    upload = signed_upload(runtime_policy(), OTHER_KEY)
    del upload["public_key"]
    return upload


def test_lone_surrogate_payload_type_rejected(signed_only: Api) -> None:
    upload = foreign_upload()
    upload["envelope"]["payloadType"] = LONE_SURROGATE

    response = signed_only.post("surrogate-type", upload)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "dsse-envelope-invalid"
    assert error_of(response)["field"] == "envelope.payloadType"
    assert signed_only.count(Policy) == 0


def test_lone_surrogate_public_key_rejected(signed_only: Api) -> None:
    upload = foreign_upload()
    upload["public_key"] = "-----BEGIN PUBLIC KEY-----\n" + LONE_SURROGATE

    response = signed_only.post("surrogate-key", upload)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "signing-key-invalid"
    assert error_of(response)["field"] == "public_key"
    assert signed_only.count(Policy) == 0


def test_deeply_nested_envelope_rejected(signed_only: Api) -> None:
    depth = 100_000
    body = '{"kind": "runtime", "envelope": ' + "[" * depth + "]" * depth + "}"

    response = signed_only.http.post(f"{signed_only.url}/nested", data=body,
                                     headers={"Content-Type": "application/json"}, timeout=60)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid-json"
    assert signed_only.count(Policy) == 0


def test_foreign_signature_rejected(signed_only: Api) -> None:
    # Control: the foreign upload without a hostile value is rejected for its signature alone.
    response = signed_only.post("foreign", foreign_upload())

    assert response.status_code == 403
    assert error_of(response)["code"] == "dsse-signature-invalid"
    assert error_of(response)["field"] == "envelope.signatures"


def test_deeply_nested_signed_payload_rejected(signed_only: Api) -> None:
    # A trusted signer, so the payload passes the signature check and reaches the JSON decoder.
    depth = 100_000
    upload = {"kind": "runtime", "envelope": json.loads(sign_envelope(
        ("[" * depth + "]" * depth).encode(), private_pem(SIGNING_KEY)))}

    response = signed_only.post("nested-payload", upload)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "policy-not-json"
    assert signed_only.count(Policy) == 0
