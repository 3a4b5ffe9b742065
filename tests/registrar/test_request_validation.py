"""Malformed registration and activation requests get a 4xx naming the field, never a 500, and
leave the device table untouched."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.registrar.conftest import EkCas, Registrar, error_of
from tests.registrar.helpers import SoftwareDevice, b64
from tests.support import ekca


@pytest.fixture(scope="module")
def device(ek_cas: EkCas) -> SoftwareDevice:
    return SoftwareDevice.create(ek_cas.issuer)


def truncated(data: bytes, cut: int = 5) -> str:
    return b64(data[:-cut])


def test_body_not_json(registrar: Registrar) -> None:
    response = registrar.post("/v2.3/agents/dev-1", data=b"{not json",
                              headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-json"
    assert registrar.row_count() == 0


@pytest.mark.parametrize("body", [b"", b"[]", b'"text"', b"42", b"null"])
def test_body_not_object(registrar: Registrar, body: bytes) -> None:
    response = registrar.post("/v2.3/agents/dev-1", data=body,
                              headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-json"
    assert registrar.row_count() == 0


def _cases(device: SoftwareDevice) -> list[tuple[str, dict[str, Any], str, str]]:
    """(case id, body overrides, expected error code, expected field)."""
    assert device.ekcert is not None
    return [
        ("aik missing", {"aik_tpm": None}, "missing-field", "aik_tpm"),
        ("aik number", {"aik_tpm": 7}, "invalid-field", "aik_tpm"),
        ("aik object", {"aik_tpm": {"a": 1}}, "invalid-field", "aik_tpm"),
        ("aik not base64", {"aik_tpm": "!!not base64!!"}, "invalid-base64", "aik_tpm"),
        ("aik bad padding", {"aik_tpm": b64(device.aik_tpm)[:-2]}, "invalid-base64", "aik_tpm"),
        ("aik truncated", {"aik_tpm": truncated(device.aik_tpm)}, "structure-truncated",
         "aik_tpm"),
        ("aik trailing bytes", {"aik_tpm": b64(device.aik_tpm + b"\x00")}, "trailing-bytes",
         "aik_tpm"),
        ("aik size only", {"aik_tpm": b64(b"\x00")}, "structure-truncated", "aik_tpm"),
        ("ek truncated", {"ek_tpm": truncated(device.ek_tpm)}, "structure-truncated", "ek_tpm"),
        ("ek list", {"ek_tpm": ["x"]}, "invalid-field", "ek_tpm"),
        ("ek bool", {"ek_tpm": True}, "invalid-field", "ek_tpm"),
        ("ek and cert missing", {"ek_tpm": None, "ekcert": None}, "missing-field", "ek_tpm"),
        ("ekcert not base64", {"ekcert": "%%%"}, "invalid-base64", "ekcert"),
        ("ekcert garbage", {"ekcert": b64(b"\x30\x03abc")}, "ek-certificate-malformed", "ekcert"),
        ("ekcert truncated", {"ekcert": truncated(ekca.der(device.ekcert), 40)},
         "ek-certificate-malformed", "ekcert"),
        ("ekcert number", {"ekcert": 12}, "invalid-field", "ekcert"),
        ("ekcert bad pem", {"ekcert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
         "ek-certificate-malformed", "ekcert"),
        ("iak truncated", {"iak_tpm": truncated(device.aik_tpm)}, "structure-truncated",
         "iak_tpm"),
        ("idevid not base64", {"idevid_tpm": "*"}, "invalid-base64", "idevid_tpm"),
        ("iak cert garbage", {"iak_cert": b64(b"garbage")}, "invalid-field", "iak_cert"),
        ("idevid cert number", {"idevid_cert": 1}, "invalid-field", "idevid_cert"),
        ("iak attest not base64", {"iak_attest": "?"}, "invalid-base64", "iak_attest"),
        ("iak sign number", {"iak_sign": 3.5}, "invalid-field", "iak_sign"),
        ("mtls cert not pem", {"mtls_cert": "enabled"}, "invalid-field", "mtls_cert"),
        ("mtls cert number", {"mtls_cert": 0}, "invalid-field", "mtls_cert"),
        ("ip invalid", {"ip": "not an address!"}, "invalid-field", "ip"),
        ("ip number", {"ip": 127}, "invalid-field", "ip"),
        ("port zero", {"port": 0}, "invalid-field", "port"),
        ("port too large", {"port": 70000}, "invalid-field", "port"),
        ("port text", {"port": "http"}, "invalid-field", "port"),
        ("port bool", {"port": True}, "invalid-field", "port"),
        ("port float", {"port": 9002.5}, "invalid-field", "port"),
    ]


def test_invalid_fields_rejected(registrar: Registrar, device: SoftwareDevice) -> None:
    for case, overrides, code, field in _cases(device):
        response = registrar.register("dev-1", device.body(**overrides))

        assert response.status_code == 400, (case, response.text)
        error = error_of(response)
        assert error["code"] == code, (case, error)
        assert error["field"] == field, (case, error)
        assert field in error["message"], (case, error)

    assert registrar.row_count() == 0


@pytest.mark.parametrize(
    "device_id",
    ["a b", "x" * 256, "dev:one", "uuid;drop", "dev\u00e9", "~home"],
)
def test_invalid_device_id(registrar: Registrar, device: SoftwareDevice, device_id: str) -> None:
    response = registrar.register(device_id, device.body())

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid-device-id"
    assert error["field"] == "uuid"
    assert "A-Z, a-z, 0-9" in error["message"]
    assert registrar.row_count() == 0


def test_invalid_device_id_on_every_route(registrar: Registrar) -> None:
    tag = "0" * 96
    responses = {
        "activate": registrar.activate("a b", tag),
        "activate post": registrar.activate("a b", tag, via_put=False),
        "get": registrar.get("/v2.3/agents/a b"),
        "delete": registrar.delete("a b"),
    }

    for route, response in responses.items():
        assert response.status_code == 400, route
        assert error_of(response)["code"] == "invalid-device-id", route


def test_unsupported_api_version(registrar: Registrar, device: SoftwareDevice) -> None:
    response = registrar.register("dev-1", device.body(), version="2.0")

    assert response.status_code == 404
    assert error_of(response)["code"] == "not-found"
    assert registrar.row_count() == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing-field"),
        ({"auth_tag": 5}, "invalid-field"),
        ({"auth_tag": "zz" * 48}, "invalid-field"),
        ({"auth_tag": "ab" * 47}, "invalid-field"),
        ({"auth_tag": "ab" * 64}, "invalid-field"),
    ],
)
def test_invalid_auth_tag(registrar: Registrar, body: dict[str, Any], code: str) -> None:
    response = registrar.http.put(f"{registrar.url}/v2.3/agents/dev-1", json=body, timeout=30)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == code
    assert error["field"] == "auth_tag"


def test_activation_body_not_json(registrar: Registrar) -> None:
    response = registrar.http.put(f"{registrar.url}/v2.3/agents/dev-1", data=b"tag",
                                  timeout=30)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid-json"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                      max_size=3),
    max_leaves=6,
)
_fuzz_ids = itertools.count()
_field_names = st.sampled_from(
    ["aik_tpm", "ek_tpm", "ekcert", "iak_tpm", "iak_cert", "idevid_tpm", "idevid_cert",
     "iak_attest", "iak_sign", "mtls_cert", "ip", "port"]
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.dictionaries(_field_names, _json_values | st.binary(max_size=40).map(b64),
                                 max_size=4))
def test_arbitrary_fields_never_500(registrar: Registrar, device: SoftwareDevice,
                                    mutations: dict[str, Any]) -> None:
    device_id = f"fuzz-{next(_fuzz_ids)}"
    body = {**device.body(), **mutations}

    response = registrar.post(f"/v2.3/agents/{device_id}", data=json.dumps(body),
                              headers={"Content-Type": "application/json"})

    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert registrar.row(device_id) is None
