"""DSSE envelopes: Keylime's signed fixtures, PAE, signing and verification."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from policies import dsse
from policies.errors import PolicyError
from policies.runtime import PolicyCache, load_runtime_policy_file
from tests.policies.keys import ec_key, pem_private, pem_public, rsa_key


@pytest.fixture
def policy_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "policy"


def test_keylime_signed_fixture_verifies(policy_dir: Path) -> None:
    envelope = (policy_dir / "keylime-runtime-policy-test-signed.json").read_bytes()
    public_key = (policy_dir / "keylime-runtime-policy-pubkey.pub").read_bytes()

    verified = dsse.verify_envelope(envelope, public_key)

    assert verified.payload == (policy_dir / "keylime-runtime-policy-test.json").read_bytes()
    assert verified.payload_type == "application/vnd.keylime+json"
    assert verified.keyid == json.loads(envelope)["signatures"][0]["keyid"]


def test_keylime_signed_bad_fixture_is_rejected(policy_dir: Path) -> None:
    envelope = (policy_dir / "keylime-runtime-policy-test-signed-bad.json").read_bytes()
    public_key = (policy_dir / "keylime-runtime-policy-pubkey.pub").read_bytes()

    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, public_key)

    assert caught.value.code == "dsse-signature-invalid"


def test_signed_fixture_loads_as_policy(policy_dir: Path) -> None:
    envelope = (policy_dir / "keylime-runtime-policy-test-signed.json").read_bytes()
    public_key = (policy_dir / "keylime-runtime-policy-pubkey.pub").read_bytes()

    policy = load_runtime_policy_file(envelope, public_key_pem=public_key, cache=PolicyCache())

    assert "/boot/grub2/i386-pc/tr.mod" in policy.digests


def test_plain_policy_with_key_is_rejected(policy_dir: Path) -> None:
    public_key = (policy_dir / "keylime-runtime-policy-pubkey.pub").read_bytes()

    with pytest.raises(PolicyError) as caught:
        load_runtime_policy_file(
            (policy_dir / "keylime-runtime-policy-test.json").read_bytes(), public_key_pem=public_key
        )

    assert caught.value.code == "policy-not-signed"


def test_pae_matches_dsse_specification_example() -> None:
    # The example from the DSSE v1 protocol description.
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert dsse.pae("t/ü", "é".encode()) == b"DSSEv1 4 t/\xc3\xbc 2 \xc3\xa9"


def test_sign_then_verify_round_trip() -> None:
    key = ec_key()
    envelope = dsse.sign_envelope(b'{"x": 1}', pem_private(key))

    verified = dsse.verify_envelope(envelope, pem_public(key))

    assert verified.payload == b'{"x": 1}'
    assert json.loads(envelope)["signatures"][0]["keyid"] == dsse.key_id(key.public_key())


def test_signature_over_payload_alone_is_rejected() -> None:
    key = ec_key()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = b"{}"
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": dsse.KEYLIME_PAYLOAD_TYPE,
        "signatures": [{"sig": base64.b64encode(signature).decode()}],
    }

    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, pem_public(key))

    assert caught.value.code == "dsse-signature-invalid"


def test_changed_payload_type_is_rejected() -> None:
    key = ec_key()
    envelope = json.loads(dsse.sign_envelope(b"{}", pem_private(key)))
    envelope["payloadType"] = "application/json"

    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, pem_public(key))

    assert caught.value.code == "dsse-signature-invalid"


def test_changed_payload_is_rejected() -> None:
    key = ec_key()
    envelope = json.loads(dsse.sign_envelope(b'{"a": 1}', pem_private(key)))
    envelope["payload"] = base64.b64encode(b'{"a": 2}').decode()

    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, pem_public(key))

    assert caught.value.code == "dsse-signature-invalid"


def test_other_key_is_rejected() -> None:
    envelope = dsse.sign_envelope(b"{}", pem_private(ec_key()))

    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, pem_public(ec_key()))

    assert caught.value.code == "dsse-signature-invalid"


def test_second_signature_may_verify() -> None:
    key = ec_key()
    envelope = json.loads(dsse.sign_envelope(b"{}", pem_private(key)))
    envelope["signatures"].insert(0, {"keyid": "other", "sig": base64.b64encode(b"\x30\x00").decode()})

    assert dsse.verify_envelope(envelope, pem_public(key)).payload == b"{}"


def test_url_safe_base64_is_accepted() -> None:
    key = ec_key()
    payload = b"\xfb\xff" * 10
    envelope = json.loads(dsse.sign_envelope(payload, pem_private(key)))
    envelope["payload"] = base64.urlsafe_b64encode(payload).decode()

    assert dsse.verify_envelope(envelope, pem_public(key)).payload == payload


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"payloadType": "t", "signatures": []}, "payload"),
        ({"payload": "e30=", "signatures": []}, "payloadType"),
        ({"payload": "e30=", "payloadType": "t", "signatures": {}}, "signatures"),
        ({"payload": "e30=", "payloadType": "t", "signatures": []}, "signatures"),
        ({"payload": "e30=", "payloadType": "t", "signatures": [{"keyid": "k"}]}, "signatures[0]"),
        ({"payload": "%%%", "payloadType": "t", "signatures": [{"sig": "AA=="}]}, "payload"),
    ],
)
def test_malformed_envelope_is_named(envelope: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(envelope, pem_public(ec_key()))

    assert caught.value.code == "dsse-envelope-invalid"
    assert caught.value.field == field


def test_rsa_key_is_rejected_for_verification() -> None:
    with pytest.raises(PolicyError) as caught:
        dsse.verify_envelope(b"{}", pem_public(rsa_key()))

    assert caught.value.code == "signing-key-invalid"
    assert "RSA" in caught.value.message


def test_not_a_pem_key_is_rejected() -> None:
    with pytest.raises(PolicyError) as caught:
        dsse.sign_envelope(b"{}", b"-----BEGIN NOTHING-----")

    assert caught.value.code == "signing-key-invalid"


def test_deeply_nested_envelope_is_rejected() -> None:
    with pytest.raises(PolicyError) as raised:
        dsse.parse_envelope(b"[" * 100_000 + b"]" * 100_000)

    assert raised.value.code == "dsse-envelope-invalid"
