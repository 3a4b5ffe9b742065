"""Unit tests of the registrar's pure helpers and of its start-up."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from sqlalchemy import Engine

from edgetrust.app import create_app
from edgetrust.settings import Settings, SettingsError
from evidence.errors import TrustStoreError
from evidence.tpm import SigningAlgorithm, TpmAlg
from registrar.errors import InvalidDeviceId
from registrar.services import (
    SECRET_LENGTH,
    expected_auth_tag,
    new_secret,
    parse_ak_algorithms,
    parse_device_id,
)


@pytest.mark.parametrize("device_id", ["a", "D432FBB3-d2f1-4a97-9ef7-75bd81c00000", "node_1.x",
                                       "x" * 255])
def test_device_id_accepted(device_id: str) -> None:
    assert parse_device_id(device_id) == device_id


@pytest.mark.parametrize("device_id", ["", "x" * 256, "a/b", "a b", "a\n", "caf\u00e9", "a:b"])
def test_device_id_rejected(device_id: str) -> None:
    with pytest.raises(InvalidDeviceId, match="A-Z, a-z, 0-9") as raised:
        parse_device_id(device_id)

    assert raised.value.code == "invalid-device-id"
    assert raised.value.field == "uuid"


def test_secret_is_keylime_password() -> None:
    secrets = {new_secret() for _ in range(100)}

    assert len(secrets) == 100
    for secret in secrets:
        assert len(secret) == SECRET_LENGTH
        assert secret.isalnum()
        assert secret.isascii()


def test_auth_tag_keyed_with_base64_secret() -> None:
    secret = b"0123456789abcdefABCDEF0123456789"
    expected = hmac.new(base64.b64encode(secret), b"agent-1", hashlib.sha384).hexdigest()

    assert expected_auth_tag(secret, "agent-1") == expected.encode()
    assert expected_auth_tag(secret, "agent-2") != expected.encode()


def test_ak_algorithms_parsed() -> None:
    parsed = parse_ak_algorithms(["rsassa-sha256", " ECDSA-sha384 ", "rsapss-sha512"])

    assert parsed == {
        SigningAlgorithm(TpmAlg.RSA, TpmAlg.RSASSA, TpmAlg.SHA256),
        SigningAlgorithm(TpmAlg.ECC, TpmAlg.ECDSA, TpmAlg.SHA384),
        SigningAlgorithm(TpmAlg.RSA, TpmAlg.RSAPSS, TpmAlg.SHA512),
    }


@pytest.mark.parametrize("entry", ["rsassa", "ecdsa-md5", "ecdaa-sha256", "sha256", ""])
def test_ak_algorithms_invalid_entry(entry: str) -> None:
    with pytest.raises(SettingsError, match="ak_allowed_algorithms"):
        parse_ak_algorithms([entry])


def test_invalid_ca_bundle_stops_start(migrated_engine: Engine, tmp_path: Path) -> None:
    bundle = tmp_path / "ek-ca"
    bundle.mkdir()
    (bundle / "vendor.pem").write_text("not a certificate\n")
    settings = Settings(data_dir=tmp_path, ek_ca_dir=bundle)

    with pytest.raises(TrustStoreError, match="vendor.pem"):
        create_app(settings, engine=migrated_engine)
