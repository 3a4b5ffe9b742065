"""Loading and validation of runtime policies (Keylime format version 1)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from policies.errors import PolicyError
from policies.imasig import key_id_v2
from policies.runtime import empty_policy_document, parse_runtime_policy
from policies.runtime.compiled import digest_allowed
from tests.policies.keys import ec_key, rsa_key, spki_der, verification_keys_text

SHA1 = "a" * 40
SHA256 = "b" * 64


def policy_with(**changes: Any) -> dict[str, Any]:
    document = empty_policy_document()
    document.update(changes)
    return document


def rejected(document: Any) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_runtime_policy(document)
    return caught.value


# --- fixtures ---------------------------------------------------------------------------------


PLAIN_FIXTURES = [
    "keylime-policy-sha1.json",
    "keylime-policy-sha256.json",
    "keylime-policy-sha384.json",
    "keylime-policy-sha512.json",
    "keylime-policy-unknown.json",
    "keylime-runtime-policy-test.json",
]


@pytest.mark.parametrize("name", PLAIN_FIXTURES)
def test_fixture_policy_loads(fixtures_dir: Path, name: str) -> None:
    policy = parse_runtime_policy((fixtures_dir / "policy" / name).read_bytes())
    source = json.loads((fixtures_dir / "policy" / name).read_text())

    assert set(policy.digests) == set(source["digests"])
    assert policy.log_hash_alg == source["ima"]["log_hash_alg"]


def test_fixture_prefixed_boot_aggregate_is_stripped(fixtures_dir: Path) -> None:
    policy = parse_runtime_policy((fixtures_dir / "policy" / "keylime-runtime-policy-test.json").read_bytes())

    expected = bytes.fromhex("4309217e9709def327c3409407f4d52907aeba46ef1b4f46529fd095f2ef9fb2")
    assert digest_allowed(policy.digests, "boot_aggregate", expected) is True


def test_fixture_envelope_needs_key(fixtures_dir: Path) -> None:
    error = rejected((fixtures_dir / "policy" / "keylime-runtime-policy-test-signed.json").read_bytes())

    assert error.code == "dsse-key-required"


# --- required keys and types ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["meta", "release", "digests", "excludes", "keyrings", "ima", "ima-buf", "verification-keys"]
)
def test_missing_required_key_is_named(key: str) -> None:
    document = empty_policy_document()
    del document[key]

    error = rejected(document)

    assert error.code == "policy-field-missing"
    assert error.field == key


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"meta": {"version": 2, "generator": 0}}, "meta.version", "policy-version-unsupported"),
        ({"meta": {"version": "1", "generator": 0}}, "meta.version", "policy-field-invalid"),
        ({"meta": {"version": True, "generator": 0}}, "meta.version", "policy-field-invalid"),
        ({"meta": {"generator": 0}}, "meta.version", "policy-field-missing"),
        ({"meta": {"version": 1, "generator": 4}}, "meta.generator", "policy-field-invalid"),
        ({"meta": {"version": 1, "generator": 0, "timestamp": 5}}, "meta.timestamp", "policy-field-invalid"),
        ({"meta": []}, "meta", "policy-field-invalid"),
        ({"release": -1}, "release", "policy-field-invalid"),
        ({"release": 1.5}, "release", "policy-field-invalid"),
        ({"digests": []}, "digests", "policy-field-invalid"),
        ({"excludes": "/tmp"}, "excludes", "policy-field-invalid"),
        ({"excludes": ["/tmp", 3]}, "excludes[1]", "policy-field-invalid"),
        ({"keyrings": None}, "keyrings", "policy-field-invalid"),
        ({"ima-buf": "x"}, "ima-buf", "policy-field-invalid"),
        ({"verification-keys": {}}, "verification-keys", "policy-field-invalid"),
        (
            {"ima": {"log_hash_alg": "sha1", "dm_policy": None}},
            "ima.ignored_keyrings",
            "policy-field-missing",
        ),
        (
            {"ima": {"ignored_keyrings": [1], "log_hash_alg": "sha1", "dm_policy": None}},
            "ima.ignored_keyrings[0]",
            "policy-field-invalid",
        ),
        (
            {"ima": {"ignored_keyrings": [], "log_hash_alg": "md5", "dm_policy": None}},
            "ima.log_hash_alg",
            "policy-field-invalid",
        ),
        (
            {"ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": {}}},
            "ima.dm_policy",
            "policy-field-invalid",
        ),
    ],
)
def test_invalid_field_is_named(change: dict[str, Any], field: str, code: str) -> None:
    error = rejected(policy_with(**change))

    assert error.field == field
    assert error.code == code


def test_not_json_is_rejected() -> None:
    assert rejected(b"{not json").code == "policy-not-json"
    assert rejected(b"[1, 2]").code == "policy-not-json"
    assert rejected(b"[" * 100_000 + b"]" * 100_000).code == "policy-not-json"


def test_unknown_keys_are_ignored() -> None:
    plain = parse_runtime_policy(empty_policy_document())
    extended = parse_runtime_policy(policy_with(comment="made by hand"))

    assert extended.content_hash == plain.content_hash


# --- digests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("digest", "problem"),
    [
        ("A" * 40, "uppercase"),
        ("a" * 39, "39 characters"),
        ("a" * 130, "130 characters"),
        ("a" * 41, "odd number"),
        ("g" * 40, "40 characters"),
        ("sha256:" + "a" * 40, "algorithm prefix"),
        ("md5:" + "a" * 32, "algorithm prefix"),
    ],
)
def test_bad_digest_is_named_with_json_path(digest: str, problem: str) -> None:
    error = rejected(policy_with(digests={"/usr/bin/bash": [SHA1, digest]}))

    assert error.code == "policy-digest-invalid"
    assert error.field == 'digests["/usr/bin/bash"][1]'
    assert problem in error.message


def test_digest_of_wrong_type_is_named() -> None:
    error = rejected(policy_with(digests={"/usr/bin/bash": [7]}))

    assert error.field == 'digests["/usr/bin/bash"][0]'
    assert "got an integer" in error.message


def test_empty_digest_list_is_rejected() -> None:
    error = rejected(policy_with(digests={"/usr/bin/bash": []}))

    assert error.field == 'digests["/usr/bin/bash"]'
    assert error.code == "policy-digest-invalid"


def test_several_digests_per_path_are_allowed() -> None:
    policy = parse_runtime_policy(policy_with(digests={"/usr/bin/bash": [SHA1, SHA256, SHA1]}))

    assert digest_allowed(policy.digests, "/usr/bin/bash", bytes.fromhex(SHA1)) is True
    assert digest_allowed(policy.digests, "/usr/bin/bash", bytes.fromhex(SHA256)) is True
    assert digest_allowed(policy.digests, "/usr/bin/bash", bytes(20)) is False
    assert digest_allowed(policy.digests, "/usr/bin/sh", bytes(20)) is None


def test_digest_bytes_are_compared_whole() -> None:
    # A single allowed digest is stored as bytes; a shorter digest must not match as a substring.
    policy = parse_runtime_policy(policy_with(digests={"/f": [SHA256]}))

    assert digest_allowed(policy.digests, "/f", bytes.fromhex("b" * 40)) is False


@pytest.mark.parametrize(
    ("table", "field"),
    [("keyrings", 'keyrings[".ima"][0]'), ("ima-buf", 'ima-buf["kernel_version"][0]')],
)
def test_other_digest_tables_name_fields(table: str, field: str) -> None:
    name = field.split('"')[1]
    error = rejected(policy_with(**{table: {name: ["xyz"]}}))

    assert error.field == field


# --- excludes ---------------------------------------------------------------------------------


def test_lone_star_exclude_is_rejected_naming_it() -> None:
    error = rejected(policy_with(excludes=["/tmp/.*", "*"]))

    assert error.code == "policy-exclude-invalid"
    assert error.field == "excludes[1]"
    assert "'*'" in error.message


def test_unbalanced_exclude_is_rejected() -> None:
    error = rejected(policy_with(excludes=["/var/log/(.*"]))

    assert error.code == "policy-exclude-invalid"
    assert "/var/log/(.*" in error.message


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_exclude_excludes_nothing(blank: str) -> None:
    policy = parse_runtime_policy(policy_with(excludes=[blank]))

    assert policy.excludes == ()
    assert not policy.exclude_matcher.matches("/usr/bin/bash")
    assert not policy.exclude_matcher.matches("")


def test_exclude_matches_from_start_of_path() -> None:
    policy = parse_runtime_policy(policy_with(excludes=["/tmp/", "var"]))
    matches = policy.exclude_matcher.matches

    assert matches("/tmp/x")
    assert not matches("/var/tmp/x")
    assert not matches("/var/log")
    assert matches("variable")


def test_exclude_with_groups_keeps_own_backreference() -> None:
    policy = parse_runtime_policy(policy_with(excludes=["(/a)x", r"(/b)\1"]))
    matches = policy.exclude_matcher.matches

    assert matches("/ax")
    assert matches("/b/b")
    assert not matches("/b/a")


def test_exclude_with_inline_flag_works() -> None:
    policy = parse_runtime_policy(policy_with(excludes=["/opt/", "(?i)/TMP/"]))

    assert policy.exclude_matcher.matches("/tmp/a")
    assert policy.exclude_matcher.matches("/opt/b")


# --- verification keys ------------------------------------------------------------------------


def test_verification_keys_load_with_given_and_computed_ids() -> None:
    first, second = ec_key(), rsa_key()
    text = verification_keys_text([first, second], key_ids=[0x1234ABCD])

    policy = parse_runtime_policy(policy_with(**{"verification-keys": text}))

    assert [key.key_id for key in policy.verification_keys] == [0x1234ABCD, key_id_v2(second.public_key())]


def test_verification_keys_double_encoded_are_accepted() -> None:
    text = json.dumps(verification_keys_text([ec_key()]))

    policy = parse_runtime_policy(policy_with(**{"verification-keys": text}))

    assert len(policy.verification_keys) == 1


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{not json", "verification-keys"),
        ('{"keyids": []}', "verification-keys.pubkeys"),
        ('{"keyids": [], "pubkeys": ["%%%"]}', "verification-keys.pubkeys[0]"),
        ('{"keyids": [], "pubkeys": ["AAAA"]}', "verification-keys.pubkeys[0]"),
        ('{"keyids": ["x"], "pubkeys": ["AAAA"]}', "verification-keys.keyids[0]"),
        ('{"keyids": [], "pubkeys": "AAAA"}', "verification-keys.pubkeys"),
    ],
)
def test_bad_verification_keys_are_named(text: str, field: str) -> None:
    error = rejected(policy_with(**{"verification-keys": text}))

    assert error.code == "policy-verification-keys-invalid"
    assert error.field == field


def test_verification_key_of_unsupported_type_is_rejected() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    import base64

    from cryptography.hazmat.primitives import serialization

    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = json.dumps({"keyids": [], "pubkeys": [base64.b64encode(der).decode()]})

    error = rejected(policy_with(**{"verification-keys": text}))

    assert error.field == "verification-keys.pubkeys[0]"
    assert "Ed25519" in error.message


def test_verification_key_round_trips_through_document() -> None:
    key = ec_key()
    policy = parse_runtime_policy(policy_with(**{"verification-keys": verification_keys_text([key])}))

    assert policy.verification_keys[0].spki_der() == spki_der(key)


# --- content hash -----------------------------------------------------------------------------


def test_content_hash_ignores_formatting_and_digest_order() -> None:
    document = policy_with(digests={"/a": [SHA1, SHA256], "/b": [SHA1]}, excludes=["/tmp/"])
    reordered = policy_with(digests={"/b": [SHA1, SHA1], "/a": [SHA256, SHA1]}, excludes=["/tmp/", ""])

    first = parse_runtime_policy(json.dumps(document, indent=2))
    second = parse_runtime_policy(json.dumps(reordered))

    assert first.content_hash == second.content_hash


def test_content_hash_changes_with_a_digest() -> None:
    document = policy_with(digests={"/a": [SHA1]})
    changed = copy.deepcopy(document)
    changed["digests"]["/a"] = ["c" * 40]

    assert parse_runtime_policy(document).content_hash != parse_runtime_policy(changed).content_hash


def test_document_round_trip_keeps_content_hash(fixtures_dir: Path) -> None:
    policy = parse_runtime_policy((fixtures_dir / "policy" / "keylime-runtime-policy-test.json").read_bytes())

    again = parse_runtime_policy(policy.to_document())

    assert again.content_hash == policy.content_hash
    assert again.canonical_json() == policy.canonical_json()


def test_prefixed_digest_normalises_to_bare_hex() -> None:
    with_prefix = parse_runtime_policy(policy_with(digests={"boot_aggregate": ["sha256:" + SHA256]}))
    bare = parse_runtime_policy(policy_with(digests={"boot_aggregate": [SHA256]}))

    assert with_prefix.content_hash == bare.content_hash
