"""Image-signature policies: key types cosign uses, repository rules and globs, deny by
default."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519

from policies.errors import PolicyError
from policies.image_signature import (
    is_repository,
    parse_image_signature_policy,
    repository_of,
)

PublicKey = Any


def pem(public_key: PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


P256 = pem(ec.generate_private_key(ec.SECP256R1()).public_key())
P384 = pem(ec.generate_private_key(ec.SECP384R1()).public_key())
RSA2048 = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
ED25519 = pem(ed25519.Ed25519PrivateKey.generate().public_key())


def policy(**keys: str) -> dict[str, Any]:
    return {
        "keys": keys or {"release": P256, "tools": P384},
        "rules": [
            {"repository": "registry.example/donkeycar/*", "keys": ["release"]},
            {"repository": "registry.example/tools/gate", "keys": ["tools", "release"]},
            {"repository": "mirror.example:5000/**", "keys": ["tools"]},
        ],
    }


@pytest.fixture(scope="module")
def loaded() -> Any:
    return parse_image_signature_policy(policy())


def names(keys: tuple[Any, ...]) -> list[str]:
    return [key.name for key in keys]


def test_exact_repository_gets_its_keys(loaded: Any) -> None:
    assert names(loaded.keys_for("registry.example/tools/gate")) == ["tools", "release"]


def test_single_star_matches_one_segment(loaded: Any) -> None:
    assert names(loaded.keys_for("registry.example/donkeycar/car")) == ["release"]
    assert loaded.keys_for("registry.example/donkeycar/car/debug") == ()


def test_double_star_matches_across_segments(loaded: Any) -> None:
    assert names(loaded.keys_for("mirror.example:5000/a/b/c")) == ["tools"]


def test_unmatched_repository_is_denied(loaded: Any) -> None:
    assert loaded.keys_for("registry.example/other/car") == ()
    assert loaded.keys_for("evil.example/donkeycar/car") == ()
    # A prefix is not a match: the glob covers the whole repository name.
    assert loaded.keys_for("registry.example/tools/gate-evil") == ()


def test_keys_carry_id_and_object(loaded: Any) -> None:
    (key,) = loaded.keys_for("registry.example/donkeycar/car")

    assert len(key.key_id) == 64
    assert isinstance(key.public_key, ec.EllipticCurvePublicKey)
    assert key.pem.startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize("key_pem", [P256, P384, RSA2048, ED25519])
def test_accepts_cosign_key_types(key_pem: str) -> None:
    loaded = parse_image_signature_policy(policy(release=key_pem, tools=key_pem))

    assert names(loaded.keys_for("registry.example/donkeycar/car")) == ["release"]


@pytest.mark.parametrize(("key_pem", "message"), [
    (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()), "1024 bits"),
    (pem(ec.generate_private_key(ec.SECP256K1()).public_key()), "secp256k1"),
    (pem(dsa.generate_private_key(key_size=2048).public_key()), "cannot sign cosign"),
    (pem(x25519.X25519PrivateKey.generate().public_key()), "cannot sign cosign"),
    ("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "not a PEM"),
])
def test_rejects_unusable_key(key_pem: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as raised:
        parse_image_signature_policy(policy(release=key_pem, tools=P256))

    assert raised.value.code == "image-signature-key-invalid"
    assert raised.value.field == 'keys["release"]'


INVALID_RULES = [
    ({"repository": "registry.example/donkeycar/car:latest", "keys": ["release"]},
     "rules[0].repository"),
    ({"repository": "registry.example/donkeycar/car@sha256:" + "0" * 64, "keys": ["release"]},
     "rules[0].repository"),
    ({"repository": "registry.example/DonkeyCar", "keys": ["release"]}, "rules[0].repository"),
    ({"repository": "registry.example", "keys": ["release"]}, "rules[0].repository"),
    ({"repository": "registry.example/donkeycar/*", "keys": []}, "rules[0].keys"),
    ({"repository": "registry.example/donkeycar/*", "keys": ["missing"]}, "rules[0].keys[0]"),
    ({"repository": "registry.example/donkeycar/*"}, "keys"),
    ({"repository": "registry.example/donkeycar/*", "keys": ["release"], "tag": "x"},
     "rules[0].tag"),
]


@pytest.mark.parametrize(("rule", "field"), INVALID_RULES)
def test_rejects_invalid_rule(rule: dict[str, Any], field: str) -> None:
    document = {"keys": {"release": P256}, "rules": [rule]}

    with pytest.raises(PolicyError) as raised:
        parse_image_signature_policy(document)

    assert raised.value.field == field


def test_rejects_missing_rules() -> None:
    with pytest.raises(PolicyError) as raised:
        parse_image_signature_policy({"keys": {"release": P256}})

    assert raised.value.code == "policy-field-missing"
    assert raised.value.field == "rules"


def test_content_hash_ignores_key_formatting() -> None:
    first = parse_image_signature_policy(policy())
    reformatted = policy()
    reformatted["keys"]["release"] = P256.replace("\n", "\r\n")

    second = parse_image_signature_policy(reformatted)

    assert second.content_hash == first.content_hash
    assert parse_image_signature_policy(first.canonical_json()).content_hash == first.content_hash


@pytest.mark.parametrize(("reference", "repository"), [
    ("registry.example/donkeycar/car:4.5", "registry.example/donkeycar/car"),
    ("registry.example/donkeycar/car@sha256:" + "ab" * 32, "registry.example/donkeycar/car"),
    ("registry.example:5000/car:4.5@sha256:" + "ab" * 32, "registry.example:5000/car"),
    ("registry.example:5000/car", "registry.example:5000/car"),
])
def test_repository_of_reference(reference: str, repository: str) -> None:
    assert repository_of(reference) == repository
    assert is_repository(repository)
