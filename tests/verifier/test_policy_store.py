"""The policy store on a real database (SQLite and PostgreSQL): content by hash, versions,
deletes, concurrency and the shared compiled objects."""

from __future__ import annotations

import hashlib
import json
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import make_session_factory, transaction
from policies.dsse import sign_envelope
from policies.errors import PolicyError
from policies.runtime import empty_policy_document
from verifier import policy_store
from verifier.policy_models import Policy, PolicyContent, PolicyVersion
from verifier.policy_store import (
    InvalidPolicyName,
    PolicyExists,
    PolicyInUse,
    PolicyKindConflict,
    PolicyNotFound,
    UnknownPolicyKind,
)

SHA256_ZERO = "00" * 32

SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def private_pem(key: ec.EllipticCurvePrivateKey = SIGNING_KEY) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: ec.EllipticCurvePrivateKey = SIGNING_KEY) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pcr_policy(*values: str) -> dict[str, Any]:
    return {"pcrs": {"sha256": {"0": list(values or [SHA256_ZERO])}}}


def runtime_policy(paths: int, *, seed: str = "") -> dict[str, Any]:
    document = empty_policy_document()
    document["digests"] = {
        f"/usr/bin/{seed}tool{i:06d}": [hashlib.sha256(f"{seed}{i}".encode()).hexdigest()]
        for i in range(paths)
    }
    return document


@pytest.fixture
def sessions(migrated_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(migrated_engine)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    policy_store.COMPILED_POLICIES.clear()
    yield
    policy_store.COMPILED_POLICIES.clear()


def count(sessions: sessionmaker[Session], table: type[Any]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def put(sessions: sessionmaker[Session], name: str, kind: str, body: dict[str, Any],
        **options: Any) -> policy_store.StoredPolicy:
    with transaction(sessions) as session:
        return policy_store.store_policy(session, name, kind, body, **options)


def test_put_creates_version_one(sessions: sessionmaker[Session]) -> None:
    stored = put(sessions, "fleet-pcr", "pcr", pcr_policy())

    assert stored.created
    assert stored.version.version == 1
    assert stored.version.kind == "pcr"
    with sessions() as session:
        found = policy_store.latest(session, "fleet-pcr")
        assert found.content_hash == stored.version.content_hash
        assert policy_store.content(session, found.content_hash).kind == "pcr"


def test_put_same_content_keeps_version(sessions: sessionmaker[Session]) -> None:
    first = put(sessions, "fleet-pcr", "pcr", pcr_policy("aa" * 32, "bb" * 32))

    # Another order and upper case digits: the same content.
    again = put(sessions, "fleet-pcr", "pcr", pcr_policy("BB" * 32, "aa" * 32))

    assert not again.created
    assert again.version.version == 1
    assert again.version.content_hash == first.version.content_hash
    assert count(sessions, PolicyVersion) == 1


def test_put_new_content_adds_version(sessions: sessionmaker[Session]) -> None:
    first = put(sessions, "fleet-pcr", "pcr", pcr_policy("aa" * 32))
    second = put(sessions, "fleet-pcr", "pcr", pcr_policy("bb" * 32))
    # Going back to the first content is a change too.
    third = put(sessions, "fleet-pcr", "pcr", pcr_policy("aa" * 32))

    assert [first.version.version, second.version.version, third.version.version] == [1, 2, 3]
    assert third.version.content_hash == first.version.content_hash
    assert count(sessions, PolicyContent) == 2
    with sessions() as session:
        assert policy_store.latest(session, "fleet-pcr").version == 3
        assert policy_store.get(session, "fleet-pcr", 2).content_hash == second.version.content_hash
        assert [v.version for v in policy_store.versions(session, "fleet-pcr")] == [1, 2, 3]


def test_names_share_content(sessions: sessionmaker[Session]) -> None:
    put(sessions, "site-a", "pcr", pcr_policy())
    put(sessions, "site-b", "pcr", pcr_policy())

    assert count(sessions, PolicyContent) == 1
    assert count(sessions, PolicyVersion) == 2


def test_list_returns_latest_of_each_name(sessions: sessionmaker[Session]) -> None:
    put(sessions, "b-policy", "pcr", pcr_policy("aa" * 32))
    put(sessions, "b-policy", "pcr", pcr_policy("bb" * 32))
    put(sessions, "a-policy", "runtime", runtime_policy(2))

    with sessions() as session:
        listed = policy_store.list(session)
        runtime_only = policy_store.list(session, kind="runtime")

    assert [(v.name, v.version) for v in listed] == [("a-policy", 1), ("b-policy", 2)]
    assert [v.name for v in runtime_only] == ["a-policy"]


def test_expect_new_rejects_stored_name(sessions: sessionmaker[Session]) -> None:
    put(sessions, "fleet-pcr", "pcr", pcr_policy())

    with pytest.raises(PolicyExists) as raised:
        put(sessions, "fleet-pcr", "pcr", pcr_policy("aa" * 32), expect="new")

    assert raised.value.code == "policy-exists"
    assert count(sessions, PolicyVersion) == 1


def test_expect_existing_rejects_missing_name(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(PolicyNotFound) as raised:
        put(sessions, "missing", "pcr", pcr_policy(), expect="existing")

    assert raised.value.code == "policy-not-found"
    assert count(sessions, Policy) == 0
    assert count(sessions, PolicyContent) == 0


def test_kind_of_name_is_fixed(sessions: sessionmaker[Session]) -> None:
    put(sessions, "fleet", "pcr", pcr_policy())

    with pytest.raises(PolicyKindConflict) as raised:
        put(sessions, "fleet", "runtime", runtime_policy(1))

    assert raised.value.code == "policy-kind-conflict"
    assert raised.value.field == "kind"
    assert count(sessions, PolicyContent) == 1


def test_invalid_body_writes_nothing(sessions: sessionmaker[Session]) -> None:
    body = pcr_policy("aa" * 31)

    with pytest.raises(PolicyError) as raised:
        put(sessions, "fleet-pcr", "pcr", body)

    assert raised.value.code == "policy-digest-invalid"
    assert raised.value.field == 'pcrs.sha256["0"][0]'
    assert count(sessions, Policy) == 0
    assert count(sessions, PolicyContent) == 0


@pytest.mark.parametrize("name", ["", "a b", "x" * 256, "../etc", "naïve"])
def test_invalid_name_rejected(sessions: sessionmaker[Session], name: str) -> None:
    with pytest.raises(InvalidPolicyName) as raised:
        put(sessions, name, "pcr", pcr_policy())

    assert raised.value.code == "invalid-policy-name"


def test_unknown_kind_rejected(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(UnknownPolicyKind) as raised:
        put(sessions, "fleet", "ima", pcr_policy())

    assert raised.value.code == "policy-kind-invalid"
    assert raised.value.field == "kind"


def test_get_missing_version_raises(sessions: sessionmaker[Session]) -> None:
    put(sessions, "fleet-pcr", "pcr", pcr_policy())

    with sessions() as session, pytest.raises(PolicyNotFound) as raised:
        policy_store.get(session, "fleet-pcr", 2)

    assert raised.value.field == "version"


def test_signed_upload_records_envelope(sessions: sessionmaker[Session]) -> None:
    body = runtime_policy(3)
    envelope = json.loads(sign_envelope(json.dumps(body).encode(), private_pem()))
    signed = policy_store.verify_signed_policy(envelope, [public_pem()])

    stored = put(sessions, "signed", "runtime", signed.document, envelope=signed)

    assert stored.version.envelope == envelope
    assert stored.version.signed_by == signed.keyid
    assert len(signed.keyid) == 64


def test_signed_upload_rejects_wrong_key(sessions: sessionmaker[Session]) -> None:
    body = runtime_policy(3)
    envelope = json.loads(sign_envelope(json.dumps(body).encode(), private_pem()))

    with pytest.raises(PolicyError) as raised:
        policy_store.verify_signed_policy(envelope, [public_pem(OTHER_KEY)])

    assert raised.value.code == "dsse-signature-invalid"


def test_delete_removes_versions_and_orphans(sessions: sessionmaker[Session]) -> None:
    put(sessions, "shared", "pcr", pcr_policy())
    put(sessions, "doomed", "pcr", pcr_policy())
    put(sessions, "doomed", "pcr", pcr_policy("aa" * 32))

    with transaction(sessions) as session:
        deleted = policy_store.delete(session, "doomed")

    assert deleted == 2
    assert count(sessions, Policy) == 1
    assert count(sessions, PolicyVersion) == 1
    # The content "shared" still uses stays; the one only "doomed" used goes.
    assert count(sessions, PolicyContent) == 1


def test_delete_missing_raises(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session, pytest.raises(PolicyNotFound):
        policy_store.delete(session, "missing")


def test_delete_in_use_by_usage_check(sessions: sessionmaker[Session],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    put(sessions, "fleet-pcr", "pcr", pcr_policy())
    monkeypatch.setattr(policy_store, "_usage_checks", [])
    policy_store.register_usage_check(
        lambda session, name: ["car-7", "car-3"] if name == "fleet-pcr" else []
    )

    with pytest.raises(PolicyInUse) as raised, transaction(sessions) as session:
        policy_store.delete(session, "fleet-pcr")

    assert raised.value.code == "policy-in-use"
    assert raised.value.device_ids == ("car-3", "car-7")
    assert count(sessions, PolicyVersion) == 1


def test_delete_in_use_by_foreign_key(migrated_engine: Engine,
                                      sessions: sessionmaker[Session]) -> None:
    # A stand-in for the verifier's device table: a foreign key to policies.name.
    with migrated_engine.begin() as connection:
        connection.execute(text(
            "CREATE TABLE test_devices (device_id VARCHAR(64) PRIMARY KEY, "
            "policy_name VARCHAR(255) REFERENCES policies (name))"
        ))
    put(sessions, "fleet-pcr", "pcr", pcr_policy())
    with transaction(sessions) as session:
        session.execute(text("INSERT INTO test_devices VALUES ('car-1', 'fleet-pcr')"))

    with pytest.raises(PolicyInUse) as raised, transaction(sessions) as session:
        policy_store.delete(session, "fleet-pcr")

    assert raised.value.code == "policy-in-use"
    assert count(sessions, PolicyVersion) == 1
    assert count(sessions, PolicyContent) == 1


def test_update_leaves_device_rows_alone(migrated_engine: Engine,
                                         sessions: sessionmaker[Session]) -> None:
    # Devices refer to a name and load its latest version at their next attestation, so a new
    # version changes no device row, such as the verifier's IMA progress.
    with migrated_engine.begin() as connection:
        connection.execute(text(
            "CREATE TABLE test_devices (device_id VARCHAR(64) PRIMARY KEY, "
            "policy_name VARCHAR(255) REFERENCES policies (name), next_ima_entry INTEGER)"
        ))
    put(sessions, "fleet-pcr", "pcr", pcr_policy())
    with transaction(sessions) as session:
        session.execute(text("INSERT INTO test_devices VALUES ('car-1', 'fleet-pcr', 417)"))

    updated = put(sessions, "fleet-pcr", "pcr", pcr_policy("aa" * 32))

    assert updated.version.version == 2
    with migrated_engine.connect() as connection:
        device = connection.execute(text("SELECT policy_name, next_ima_entry FROM test_devices")).one()
    assert tuple(device) == ("fleet-pcr", 417)
    with sessions() as session:
        assert policy_store.latest(session, "fleet-pcr").content_hash == updated.version.content_hash


def test_concurrent_uploads_get_consecutive_versions(sessions: sessionmaker[Session]) -> None:
    uploads = 8
    barrier = threading.Barrier(uploads)
    errors: list[BaseException] = []
    numbers: list[int] = []

    def upload(index: int) -> None:
        try:
            barrier.wait()
            stored = put(sessions, "contested", "pcr", pcr_policy(f"{index:064x}"))
            numbers.append(stored.version.version)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(numbers) == list(range(1, uploads + 1))
    with sessions() as session:
        assert policy_store.latest(session, "contested").version == uploads


def test_concurrent_same_content_makes_one_version(sessions: sessionmaker[Session]) -> None:
    uploads = 6
    barrier = threading.Barrier(uploads)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            barrier.wait()
            put(sessions, "same", "pcr", pcr_policy())
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=upload) for _ in range(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert count(sessions, PolicyVersion) == 1
    assert count(sessions, PolicyContent) == 1


def test_compiled_is_shared_by_content_hash(sessions: sessionmaker[Session]) -> None:
    stored = put(sessions, "fleet-pcr", "pcr", pcr_policy())
    content_hash = stored.version.content_hash

    with sessions() as session:
        objects = {id(policy_store.compiled(session, content_hash)) for _ in range(100)}

    assert len(objects) == 1
    with sessions() as session:
        assert policy_store.compiled(session, content_hash).content_hash == content_hash


def test_compiled_missing_hash_raises(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(PolicyNotFound):
        policy_store.compiled(session, "ab" * 32)


def test_compiled_rejects_corrupt_body(sessions: sessionmaker[Session]) -> None:
    stored = put(sessions, "fleet-pcr", "pcr", pcr_policy())
    with transaction(sessions) as session:
        row = session.get(PolicyContent, stored.version.content_hash)
        assert row is not None
        row.body = json.dumps(pcr_policy("aa" * 32)).encode()

    with sessions() as session, pytest.raises(policy_store.PolicyContentCorrupt) as raised:
        policy_store.compiled(session, stored.version.content_hash)

    assert raised.value.code == "policy-content-corrupt"


@pytest.mark.slow
def test_big_policy_stored_once_and_shared(sessions: sessionmaker[Session]) -> None:
    # 200,000 digests: one content row for every upload of it, one compiled object for 100 devices.
    body = runtime_policy(200_000, seed="big")

    first = put(sessions, "fleet-runtime", "runtime", body)
    put(sessions, "lab-runtime", "runtime", body)
    again = put(sessions, "fleet-runtime", "runtime", body)

    assert not again.created
    assert count(sessions, PolicyContent) == 1
    with sessions() as session:
        shared = policy_store.compiled(session, first.version.content_hash)
        tracemalloc.start()
        objects = {
            id(policy_store.compiled(session, first.version.content_hash)) for _device in range(100)
        }
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    assert objects == {id(shared)}
    # The policy takes tens of megabytes; 100 more devices must not copy any of it.
    assert peak < 1_000_000


def test_runtime_fixture_round_trip(sessions: sessionmaker[Session], fixtures_dir: Path) -> None:
    document = json.loads((fixtures_dir / "policy" / "keylime-runtime-policy-test.json").read_text())

    stored = put(sessions, "coreos", "runtime", document)

    with sessions() as session:
        policy = policy_store.compiled(session, stored.version.content_hash)
    assert policy.content_hash == stored.version.content_hash
