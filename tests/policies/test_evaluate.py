"""Evaluation of IMA measurement list entries against runtime policies."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from evidence.findings import Finding, Severity, is_failure
from policies.errors import PolicyError
from policies.imasig import key_id_v2
from policies.runtime import (
    EMPTY_KEYRING_STATE,
    KeyringState,
    RuntimePolicy,
    empty_policy_document,
    evaluate,
    evaluate_incremental,
    parse_runtime_policy,
)
from tests.policies import imalist
from tests.policies.keys import (
    certificate_der,
    ec_key,
    ecdsa_signature_of_length,
    ima_signature,
    rsa_key,
    sign_digest,
    verification_keys_text,
)

BASH = b"#!bash"
BASH_DIGEST = hashlib.sha256(BASH).digest()


def make_policy(**changes: Any) -> RuntimePolicy:
    document = empty_policy_document()
    document.update(changes)
    return parse_runtime_policy(document)


def codes(findings: list[Finding]) -> list[str]:
    return [finding.code for finding in findings]


def only(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, findings
    return findings[0]


# --- ima-ng entries ---------------------------------------------------------------------------


def test_listed_digest_passes() -> None:
    policy = make_policy(digests={"/usr/bin/bash": [BASH_DIGEST.hex()]})

    assert evaluate(imalist.parse([imalist.file_line("/usr/bin/bash", BASH)]), policy) == []


def test_unlisted_digest_names_path_and_digest() -> None:
    policy = make_policy(digests={"/usr/bin/bash": ["00" * 32]})
    entries = imalist.parse([imalist.file_line("/usr/bin/bash", BASH)], start_index=41)

    finding = only(evaluate(entries, policy))

    assert finding.code == "ima-digest-not-allowed"
    assert finding.severity == Severity.ERROR
    assert finding.context["index"] == 41
    assert finding.context["path"] == "/usr/bin/bash"
    assert finding.context["digest"] == f"sha256:{BASH_DIGEST.hex()}"
    assert "/usr/bin/bash" in finding.message
    assert BASH_DIGEST.hex() in finding.message


def test_path_missing_from_policy() -> None:
    finding = only(evaluate(imalist.parse([imalist.file_line("/usr/bin/zsh", BASH)]), make_policy()))

    assert finding.code == "ima-path-not-in-policy"
    assert finding.context["path"] == "/usr/bin/zsh"


def test_excluded_path_passes() -> None:
    policy = make_policy(excludes=["/tmp/", "/var/log/.*"])
    entries = imalist.parse([imalist.file_line("/tmp/a", b"1"), imalist.file_line("/var/log/x", b"2")])

    assert evaluate(entries, policy) == []


def test_blank_exclude_line_excludes_nothing() -> None:
    policy = make_policy(excludes=[""])

    finding = only(evaluate(imalist.parse([imalist.file_line("/tmp/a", b"1")]), policy))

    assert finding.code == "ima-path-not-in-policy"


def test_each_failing_entry_gets_a_finding() -> None:
    policy = make_policy(digests={"/a": [hashlib.sha256(b"a").hexdigest()]})
    lines = [imalist.file_line("/a", b"a"), imalist.file_line("/b", b"b"), imalist.file_line("/a", b"x")]

    findings = evaluate(imalist.parse(lines), policy)

    assert codes(findings) == ["ima-path-not-in-policy", "ima-digest-not-allowed"]
    assert [finding.context["index"] for finding in findings] == [1, 2]


@pytest.mark.parametrize(
    "path", ["/opt/my car/manage.py", "/home/pi/mycar/mod\u00e8le.h5", "/srv/\u6a21\u578b"]
)
def test_path_with_spaces_or_non_ascii_matches_exactly(path: str) -> None:
    policy = make_policy(digests={path: [BASH_DIGEST.hex()]})

    assert evaluate(imalist.parse([imalist.file_line(path, BASH)]), policy) == []
    assert codes(evaluate(imalist.parse([imalist.file_line(path + "x", BASH)]), policy)) == [
        "ima-path-not-in-policy"
    ]


def test_sha1_digest_does_not_match_sha256_listing() -> None:
    policy = make_policy(digests={"/f": [hashlib.sha256(b"f").hexdigest()]})

    entries = imalist.parse([imalist.file_line("/f", b"f", algorithm="sha1")])

    assert codes(evaluate(entries, policy)) == ["ima-digest-not-allowed"]


# --- violations -------------------------------------------------------------------------------


def test_violation_fails_by_default() -> None:
    entries = imalist.parse([imalist.violation_line("/var/lib/db")])

    finding = only(evaluate(entries, make_policy(excludes=["/var/"])))

    assert finding.code == "ima-violation"
    assert finding.severity == Severity.ERROR


def test_violation_allowed_by_setting_is_a_warning() -> None:
    entries = imalist.parse([imalist.file_line("/a", b"a"), imalist.violation_line("/var/lib/db")])
    policy = make_policy(digests={"/a": [hashlib.sha256(b"a").hexdigest()]})

    findings = evaluate(entries, policy, allow_violations=True)

    assert codes(findings) == ["ima-violation"]
    assert not is_failure(findings)


# --- boot_aggregate ---------------------------------------------------------------------------


def boot_aggregate_line(digest: bytes, algorithm: str) -> str:
    return imalist.ng_line("boot_aggregate", digest, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_boot_aggregate_matching_recomputed_value_passes(algorithm: str) -> None:
    value = hashlib.new(algorithm, b"pcrs").digest()
    entries = imalist.parse([boot_aggregate_line(value, algorithm)])

    assert evaluate(entries, make_policy(), boot_aggregates={algorithm: value}) == []


def test_boot_aggregate_mismatch_is_reported() -> None:
    entries = imalist.parse([boot_aggregate_line(hashlib.sha256(b"forged").digest(), "sha256")])
    recomputed = hashlib.sha256(b"pcrs").digest()
    policy = make_policy(digests={"boot_aggregate": [hashlib.sha256(b"forged").hexdigest()]})

    finding = only(evaluate(entries, policy, boot_aggregates={"sha256": recomputed}))

    assert finding.code == "ima-boot-aggregate-mismatch"
    assert recomputed.hex() in finding.message


def test_boot_aggregate_of_other_algorithm_is_a_mismatch() -> None:
    entries = imalist.parse([boot_aggregate_line(hashlib.sha1(b"pcrs").digest(), "sha1")])

    findings = evaluate(entries, make_policy(), boot_aggregates={"sha256": hashlib.sha256(b"pcrs").digest()})

    assert codes(findings) == ["ima-boot-aggregate-mismatch"]


def test_all_zero_boot_aggregate_needs_policy_permission() -> None:
    entries = imalist.parse([boot_aggregate_line(bytes(20), "sha1")])
    recomputed = {"sha1": hashlib.sha1(b"pcrs").digest()}

    refused = evaluate(entries, make_policy(), boot_aggregates=recomputed)
    allowed = evaluate(
        entries, make_policy(digests={"boot_aggregate": ["00" * 20]}), boot_aggregates=recomputed
    )

    assert codes(refused) == ["ima-boot-aggregate-mismatch"]
    assert allowed == []


def test_all_zero_boot_aggregate_allowed_by_caller() -> None:
    entries = imalist.parse([boot_aggregate_line(bytes(32), "sha256")])
    recomputed = {"sha256": hashlib.sha256(b"pcrs").digest()}

    findings = evaluate(entries, make_policy(), boot_aggregates=recomputed, allow_zero_boot_aggregate=True)

    assert findings == []


def test_zero_allowance_does_not_pass_other_digests() -> None:
    entries = imalist.parse([boot_aggregate_line(hashlib.sha256(b"forged").digest(), "sha256")])
    recomputed = {"sha256": hashlib.sha256(b"pcrs").digest()}

    findings = evaluate(entries, make_policy(), boot_aggregates=recomputed, allow_zero_boot_aggregate=True)

    assert codes(findings) == ["ima-boot-aggregate-mismatch"]


def test_boot_aggregate_without_recomputed_value_uses_digests() -> None:
    value = hashlib.sha256(b"pcrs").digest()
    entries = imalist.parse([boot_aggregate_line(value, "sha256")])

    assert evaluate(entries, make_policy(digests={"boot_aggregate": [value.hex()]})) == []
    assert codes(evaluate(entries, make_policy())) == ["ima-path-not-in-policy"]


# --- ima-sig ----------------------------------------------------------------------------------


def signed_policy(*keys: Any, **changes: Any) -> RuntimePolicy:
    return make_policy(**{"verification-keys": verification_keys_text(list(keys))}, **changes)


def test_valid_signature_passes_unlisted_path() -> None:
    key = rsa_key()
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, sign_digest(key, BASH_DIGEST))])

    assert evaluate(entries, signed_policy(key)) == []


@pytest.mark.parametrize("length", [70, 71, 72])
def test_ecdsa_signature_of_any_length_passes(length: int) -> None:
    key = ec_key()
    signature = ima_signature(
        ecdsa_signature_of_length(key, BASH_DIGEST, length), key_id_v2(key.public_key())
    )
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature)])

    assert evaluate(entries, signed_policy(key)) == []


def test_invalid_signature_fails_unlisted_path() -> None:
    key = ec_key()
    signature = sign_digest(key, hashlib.sha256(b"other").digest())
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature)])

    finding = only(evaluate(entries, signed_policy(key)))

    assert finding.code == "ima-signature-invalid"
    assert finding.severity == Severity.ERROR
    assert finding.context["listed"] == "name-not-in-policy"


def test_invalid_signature_with_listed_digest_is_a_warning() -> None:
    key = ec_key()
    signature = sign_digest(key, hashlib.sha256(b"other").digest())
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature)])

    findings = evaluate(entries, signed_policy(key, digests={"/usr/bin/app": [BASH_DIGEST.hex()]}))

    assert codes(findings) == ["ima-signature-invalid"]
    assert not is_failure(findings)


def test_unknown_signing_key_fails_unlisted_path() -> None:
    entries = imalist.parse(
        [imalist.sig_line("/usr/bin/app", BASH_DIGEST, sign_digest(ec_key(), BASH_DIGEST))]
    )

    finding = only(evaluate(entries, signed_policy(ec_key())))

    assert finding.code == "ima-signature-key-unknown"


def test_signature_without_any_key_falls_back_to_digests() -> None:
    entries = imalist.parse(
        [imalist.sig_line("/usr/bin/app", BASH_DIGEST, sign_digest(ec_key(), BASH_DIGEST))]
    )

    finding = only(evaluate(entries, make_policy()))

    assert finding.code == "ima-path-not-in-policy"
    assert "not a known key" in finding.context["signature"]


def test_empty_signature_uses_digest_list() -> None:
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, b"")])

    assert evaluate(entries, make_policy(digests={"/usr/bin/app": [BASH_DIGEST.hex()]})) == []
    assert codes(evaluate(entries, signed_policy(ec_key()))) == ["ima-path-not-in-policy"]


def test_unparsable_signature_is_its_own_finding() -> None:
    key = ec_key()
    good = sign_digest(key, BASH_DIGEST)
    swapped = good[:7] + good[8:9] + good[7:8] + good[9:]
    entries = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, swapped)])

    failing = only(evaluate(entries, signed_policy(key)))
    passing = evaluate(entries, signed_policy(key, digests={"/usr/bin/app": [BASH_DIGEST.hex()]}))

    assert failing.code == "ima-signature-invalid"
    assert "size" in failing.message
    assert codes(passing) == ["ima-signature-invalid"]
    assert passing[0].severity == Severity.WARNING


def test_excluded_signed_entry_is_not_checked() -> None:
    entries = imalist.parse([imalist.sig_line("/tmp/app", BASH_DIGEST, b"\x03\x02garbage")])

    assert evaluate(entries, signed_policy(ec_key(), excludes=["/tmp/"])) == []


# --- ima-buf ----------------------------------------------------------------------------------


def test_kernel_version_buffer_listed_passes() -> None:
    line = imalist.buf_line("kernel_version", b"6.1.0-rpi7-rpi-v8")
    policy = make_policy(
        **{"ima-buf": {"kernel_version": [hashlib.sha256(b"6.1.0-rpi7-rpi-v8").hexdigest()]}}
    )

    assert evaluate(imalist.parse([line]), policy) == []


def test_kernel_version_buffer_not_listed_fails() -> None:
    line = imalist.buf_line("kernel_version", b"6.6.6-evil")
    listed = make_policy(**{"ima-buf": {"kernel_version": [hashlib.sha256(b"6.1.0").hexdigest()]}})

    other_digest = only(evaluate(imalist.parse([line]), listed))
    unknown_name = only(evaluate(imalist.parse([line]), make_policy()))

    assert other_digest.code == "ima-buf-not-allowed"
    assert other_digest.context["listed"] == "digest-not-listed"
    assert unknown_name.code == "ima-buf-not-allowed"
    assert unknown_name.context["listed"] == "name-not-in-policy"


def test_buffer_digest_must_hash_the_buffer() -> None:
    # A listed digest beside another buffer: the policy must not vouch for that buffer.
    line = imalist.buf_line("kernel_version", b"6.1.0")
    entry = imalist.parse([line])[0]._replace(digest=hashlib.sha256(b"other").digest())
    policy = make_policy(**{"ima-buf": {"kernel_version": [hashlib.sha256(b"other").hexdigest()]}})

    assert codes(evaluate([entry], policy)) == ["ima-buf-digest-mismatch"]


# Keeps each key alive beside its certificate, so that its id() is never reused.
_CERTIFICATES: dict[int, tuple[Any, bytes]] = {}


def certificate_der_cache(key: Any) -> bytes:
    """Return one certificate per key, so that a policy and a list can name the same one."""
    if id(key) not in _CERTIFICATES:
        _CERTIFICATES[id(key)] = (key, certificate_der(key))
    return _CERTIFICATES[id(key)][1]


def keyring_policy(key: Any, **changes: Any) -> RuntimePolicy:
    digest = hashlib.sha256(certificate_der_cache(key)).hexdigest()
    return make_policy(keyrings={".ima": [digest]}, **changes)


def keyring_lines(key: Any) -> list[str]:
    """Return an ima-sig line signed by the key, the key's .ima keyring line, the ima-sig again."""
    signature = sign_digest(key, BASH_DIGEST)
    return [
        imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature),
        imalist.buf_line(".ima", certificate_der_cache(key)),
        imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature),
    ]


def test_allowed_keyring_key_verifies_later_entries_only() -> None:
    key = ec_key()
    entries = imalist.parse(keyring_lines(key))

    evaluation = evaluate_incremental(entries, keyring_policy(key, **{"verification-keys": ""}))

    assert codes(evaluation.findings) == ["ima-path-not-in-policy"]
    assert evaluation.findings[0].context["index"] == 0
    assert [learned.keyring for learned in evaluation.keyring_state.keys] == [".ima"]


def test_keyring_key_with_unlisted_digest_is_not_learned() -> None:
    key = ec_key()
    entries = imalist.parse(keyring_lines(key))
    policy = make_policy(keyrings={".ima": ["ab" * 32]})

    evaluation = evaluate_incremental(entries, policy)

    assert codes(evaluation.findings) == [
        "ima-path-not-in-policy",
        "ima-keyring-key-not-allowed",
        "ima-path-not-in-policy",
    ]
    assert evaluation.findings[1].context["listed"] == "digest-not-listed"
    assert evaluation.keyring_state == EMPTY_KEYRING_STATE


def test_keyring_missing_from_policy_is_not_allowed() -> None:
    key = rsa_key()
    entries = imalist.parse([imalist.buf_line(".builtin_trusted_keys", certificate_der_cache(key))])

    finding = only(evaluate(entries, keyring_policy(key)))

    assert finding.code == "ima-keyring-key-not-allowed"
    assert finding.context["listed"] == "name-not-in-policy"
    assert finding.context["key_id"] == f"{key_id_v2(key.public_key()):08x}"


@pytest.mark.parametrize("ignored", [[".ima"], ["*"]])
def test_ignored_keyring_passes_without_learning(ignored: list[str]) -> None:
    key = ec_key()
    ima = {"ignored_keyrings": ignored, "log_hash_alg": "sha1", "dm_policy": None}

    evaluation = evaluate_incremental(imalist.parse(keyring_lines(key)), make_policy(ima=ima))

    assert codes(evaluation.findings) == ["ima-path-not-in-policy", "ima-path-not-in-policy"]
    assert evaluation.keyring_state == EMPTY_KEYRING_STATE


def test_excluded_keyring_entry_passes_without_learning() -> None:
    key = ec_key()

    evaluation = evaluate_incremental(imalist.parse(keyring_lines(key)), make_policy(excludes=[r"\.ima$"]))

    assert codes(evaluation.findings) == ["ima-path-not-in-policy", "ima-path-not-in-policy"]
    assert evaluation.keyring_state == EMPTY_KEYRING_STATE


def test_keyring_key_of_unsupported_type_fails() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    der = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    policy = make_policy(keyrings={".ima": [hashlib.sha256(der).hexdigest()]})

    assert codes(evaluate(imalist.parse([imalist.buf_line(".ima", der)]), policy)) == [
        "ima-keyring-key-unsupported"
    ]


# --- incremental evaluation -------------------------------------------------------------------


def test_incremental_evaluation_equals_whole_list() -> None:
    key = ec_key()
    lines = keyring_lines(key) + [imalist.file_line("/b", b"b"), imalist.file_line("/a", b"a")]
    policy = keyring_policy(key, digests={"/a": [hashlib.sha256(b"a").hexdigest()]})

    whole = evaluate(imalist.parse(lines), policy)

    first = evaluate_incremental(imalist.parse(lines[:2]), policy)
    stored = json.loads(json.dumps(first.keyring_state.to_json()))
    second = evaluate_incremental(
        imalist.parse(lines[2:], start_index=2), policy, keyring_state=KeyringState.from_json(stored)
    )

    assert first.findings + second.findings == whole
    assert second.keyring_state == first.keyring_state


def test_keyring_state_keeps_certificate_key_id() -> None:
    key = ec_key()
    certificate = certificate_der(key, subject_key_id=b"\x01\x02\x03\x04\x05")
    policy = make_policy(keyrings={".ima": [hashlib.sha256(certificate).hexdigest()]})
    signature = sign_digest(key, BASH_DIGEST, key_id=0x02030405)

    state = evaluate_incremental(imalist.parse([imalist.buf_line(".ima", certificate)]), policy).keyring_state
    restored = KeyringState.from_json(state.to_json())
    later = imalist.parse([imalist.sig_line("/usr/bin/app", BASH_DIGEST, signature)], start_index=1)

    assert restored.keys[0].key.key_id == 0x02030405
    assert evaluate(later, policy, keyring_state=restored) == []


def test_same_key_is_learned_once() -> None:
    key = ec_key()
    line = imalist.buf_line(".ima", certificate_der_cache(key))

    evaluation = evaluate_incremental(imalist.parse([line, line]), keyring_policy(key))

    assert len(evaluation.keyring_state.keys) == 1


@pytest.mark.parametrize(
    "stored",
    [
        {"version": 2, "keys": []},
        {"version": 1},
        {"version": 1, "keys": [{"keyring": ".ima"}]},
        {"version": 1, "keys": [{"keyring": ".ima", "key_id": "1", "public_key": "AAAA"}]},
        {"version": 1, "keys": [{"keyring": ".ima", "key_id": 1, "public_key": "%%"}]},
    ],
)
def test_malformed_keyring_state_is_rejected(stored: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        KeyringState.from_json(stored)


def test_policy_object_is_not_changed_by_evaluation() -> None:
    policy = make_policy(digests={"/a": ["00" * 32]})
    before = policy.canonical_json()

    evaluate(imalist.parse([imalist.file_line("/a", b"a")]), policy, boot_aggregates={"sha256": bytes(32)})

    assert policy.canonical_json() == before
