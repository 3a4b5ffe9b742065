"""device.identity: the uuid and AK survive restarts; bad files are reported, never replaced."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from device.errors import IdentityError
from device.identity import (
    IDENTITY_FILE_NAME,
    AgentIdentity,
    IdentityStore,
    load_or_create_identity,
)
from tests.device.conftest import TpmUnderTest

pytestmark = pytest.mark.swtpm


def create_or_load(tpm_under_test: TpmUnderTest, state_dir: Path, *, configured_uuid: str = "",
                   ek_type: str = "rsa", ak_type: str = "ecc") -> AgentIdentity:
    with tpm_under_test.connect() as tpm:
        ek = tpm.read_endorsement_key(ek_type)
        identity = load_or_create_identity(
            IdentityStore(state_dir), tpm, ek, configured_uuid=configured_uuid,
            ek_type=ek_type, ak_type=ak_type)
        assert tpm.transient_handles() == []
        return identity


def test_first_start_creates_private_file(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"

    identity = create_or_load(provisioned_swtpm, state_dir)

    path = state_dir / IDENTITY_FILE_NAME
    assert uuid.UUID(identity.uuid).version == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in state_dir.iterdir()) == [IDENTITY_FILE_NAME]
    stored = json.loads(path.read_text())
    assert stored["uuid"] == identity.uuid
    assert stored["ek_type"] == "rsa"
    assert stored["ak_type"] == "ecc"


def test_restart_keeps_uuid_and_ak(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    first = create_or_load(provisioned_swtpm, tmp_path)
    file_before = (tmp_path / IDENTITY_FILE_NAME).read_bytes()

    provisioned_swtpm.swtpm.restart()
    second = create_or_load(provisioned_swtpm, tmp_path)

    assert second.uuid == first.uuid
    assert second.ak.name == first.ak.name
    assert second.ak == first.ak
    assert (tmp_path / IDENTITY_FILE_NAME).read_bytes() == file_before


def test_restart_keeps_ak_under_template_ek(p256_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    first = create_or_load(p256_swtpm, tmp_path, ek_type="ecc", ak_type="rsa")

    p256_swtpm.swtpm.restart()
    second = create_or_load(p256_swtpm, tmp_path, ek_type="ecc", ak_type="rsa")

    assert second.ak.name == first.ak.name
    assert second.ek_name == first.ek_name


def test_configured_uuid_used_on_first_start(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    identity = create_or_load(blank_swtpm, tmp_path, configured_uuid="car-0042")

    assert identity.uuid == "car-0042"


def test_invalid_configured_uuid_rejected(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="setting agent_uuid is 'car 42'") as raised:
        create_or_load(blank_swtpm, tmp_path, configured_uuid="car 42")

    assert raised.value.code == "agent-uuid-invalid"
    assert not (tmp_path / IDENTITY_FILE_NAME).exists()


def _valid_fields(tpm_under_test: TpmUnderTest, state_dir: Path) -> dict[str, Any]:
    create_or_load(tpm_under_test, state_dir)
    fields: dict[str, Any] = json.loads((state_dir / IDENTITY_FILE_NAME).read_text())
    return fields


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: "{\"uuid\": ", "not valid JSON"),
        (lambda f: [f], "expected a JSON object, got list"),
        (lambda f: {**f, "format": 2}, "format is 2, expected 1"),
        (lambda f: {k: v for k, v in f.items() if k != "ak_private"}, "field 'ak_private' is missing"),
        (lambda f: {**f, "ak_public": "not base64!"}, "field 'ak_public' is not valid base64"),
        (lambda f: {**f, "ak_public": "AAEC"}, "field 'ak_public' is not a TPM2B_PUBLIC"),
        (lambda f: {**f, "ak_private": "AAUCAw=="}, "field 'ak_private' is not a TPM2B_PRIVATE"),
        (lambda f: {**f, "ek_name": "zz"}, "field 'ek_name' is not hexadecimal"),
        (lambda f: {**f, "uuid": "a b"}, "field 'uuid' is 'a b'"),
    ],
)
def test_corrupt_file_reported_not_replaced(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                            change: Any, reason: str) -> None:
    fields = _valid_fields(blank_swtpm, tmp_path)
    changed = change(fields)
    path = tmp_path / IDENTITY_FILE_NAME
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    corrupt_bytes = path.read_bytes()

    with pytest.raises(IdentityError) as raised:
        create_or_load(blank_swtpm, tmp_path)

    assert raised.value.code == "identity-corrupt"
    assert str(path) in raised.value.message
    assert reason in raised.value.message
    assert "remove it" in raised.value.message
    assert path.read_bytes() == corrupt_bytes


def test_empty_file_is_corrupt(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE_NAME).write_bytes(b"")

    with pytest.raises(IdentityError) as raised:
        create_or_load(blank_swtpm, tmp_path)

    assert raised.value.code == "identity-corrupt"


def test_unreadable_file_reported(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE_NAME).mkdir()

    with pytest.raises(IdentityError) as raised:
        create_or_load(blank_swtpm, tmp_path)

    assert raised.value.code == "identity-unreadable"
    assert str(tmp_path / IDENTITY_FILE_NAME) in raised.value.message


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"configured_uuid": "other-uuid"}, "setting agent_uuid is 'other-uuid'"),
        ({"ek_type": "ecc"}, "setting agent_ek_type is 'ecc'"),
        ({"ak_type": "rsa"}, "setting agent_ak_type is 'rsa'"),
    ],
)
def test_changed_settings_rejected(provisioned_swtpm: TpmUnderTest, tmp_path: Path,
                                   settings: dict[str, str], message: str) -> None:
    create_or_load(provisioned_swtpm, tmp_path)

    with pytest.raises(IdentityError, match=message) as raised:
        create_or_load(provisioned_swtpm, tmp_path, **settings)

    assert raised.value.code == "identity-mismatch"


def test_file_from_other_tpm_rejected(provisioned_swtpm: TpmUnderTest, blank_swtpm: TpmUnderTest,
                                      tmp_path: Path) -> None:
    create_or_load(provisioned_swtpm, tmp_path)

    with pytest.raises(IdentityError, match="TPM was cleared or replaced") as raised:
        create_or_load(blank_swtpm, tmp_path)

    assert raised.value.code == "identity-mismatch"


def test_ak_blob_from_other_tpm_rejected(provisioned_swtpm: TpmUnderTest,
                                         blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    own_dir, other_dir = tmp_path / "own", tmp_path / "other"
    create_or_load(provisioned_swtpm, own_dir)
    create_or_load(blank_swtpm, other_dir)
    own = json.loads((own_dir / IDENTITY_FILE_NAME).read_text())
    other = json.loads((other_dir / IDENTITY_FILE_NAME).read_text())
    own["ak_private"], own["ak_public"] = other["ak_private"], other["ak_public"]
    (own_dir / IDENTITY_FILE_NAME).write_text(json.dumps(own))

    with pytest.raises(IdentityError, match="does not load under this TPM's EK") as raised:
        create_or_load(provisioned_swtpm, own_dir)

    assert raised.value.code == "identity-mismatch"
    assert "TPM2_Load" in raised.value.message


def test_save_replaces_file_atomically(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    identity = create_or_load(blank_swtpm, state_dir)
    store = IdentityStore(state_dir)

    store.save(AgentIdentity(uuid="renamed", ek_type=identity.ek_type, ek_name=identity.ek_name,
                             ak_type=identity.ak_type, ak=identity.ak))

    assert sorted(p.name for p in state_dir.iterdir()) == [IDENTITY_FILE_NAME]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    loaded = store.load()
    assert loaded is not None
    assert loaded.uuid == "renamed"
    assert loaded.ak == identity.ak
