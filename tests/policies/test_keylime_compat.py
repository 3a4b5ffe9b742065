"""Runtime policy evaluation compared with Keylime 7.14.3 on the same lists and policies.

Keylime runs in its own virtual environment (``.venv-keylime``, built by
``scripts/setup-keylime.sh``) through ``keylime_ima_oracle.py``. For each list the tests
compare whether it passes and which entries fail, with Keylime's failure event ids mapped to
edgetrust's finding codes. PCR 10 and template hashes are the IMA parser's business and are
not compared here: the lists are built with correct template hashes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from evidence.findings import Finding, Severity
from evidence.ima import parse_ascii_lines
from policies import dsse
from policies.generate import policy_from_measurement_list
from policies.imasig import key_id_v2
from policies.runtime import empty_policy_document, evaluate, parse_runtime_policy
from tests.conftest import REPO_ROOT
from tests.policies import imalist
from tests.policies.keys import (
    certificate_der,
    ec_key,
    ecdsa_signature_of_length,
    ima_signature,
    pem_private,
    pem_public,
    rsa_key,
    sign_digest,
    verification_keys_text,
)

KEYLIME_PYTHON = REPO_ROOT / ".venv-keylime" / "bin" / "python"
ORACLE = Path(__file__).with_name("keylime_ima_oracle.py")
QUIET_LOGGING = REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"

pytestmark = pytest.mark.skipif(
    not KEYLIME_PYTHON.exists(),
    reason=f"Keylime's venv is missing at {KEYLIME_PYTHON}; build it with scripts/setup-keylime.sh",
)

# Keylime's failure event ids (last component) for edgetrust's finding codes.
_KEYLIME_EVENT_BY_CODE = {
    "ima-path-not-in-policy": "not_in_allowlist",
    "ima-digest-not-allowed": "runtime_policy_hash",
    "ima-boot-aggregate-mismatch": "runtime_policy_hash",
    "ima-violation": "tomtou",
    "ima-keyring-key-unsupported": "invalid_key",
}
_KEYLIME_EVENT_BY_LISTED = {
    "name-not-in-policy": "not_in_allowlist",
    "digest-not-listed": "runtime_policy_hash",
}


def keylime_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    if QUIET_LOGGING.exists():
        environment["KEYLIME_LOGGING_CONFIG"] = str(QUIET_LOGGING)
    return environment


def run_keylime(lines: list[str], policy: dict[str, Any]) -> dict[str, Any]:
    request = json.dumps({"lines": lines, "policy": policy, "boot_aggregates": None})
    completed = subprocess.run(
        [str(KEYLIME_PYTHON), str(ORACLE)],
        input=request,
        capture_output=True,
        text=True,
        env=keylime_environment(),
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def keylime_failing_entries(result: dict[str, Any]) -> dict[int, list[str]]:
    return {
        index: sorted(event.rsplit(".", 1)[1] for event in events)
        for index, events in enumerate(result["entries"])
        if events
    }


def as_keylime_event(finding: Finding) -> str:
    listed = finding.context.get("listed")
    if listed is not None:
        return _KEYLIME_EVENT_BY_LISTED[listed]
    return _KEYLIME_EVENT_BY_CODE[finding.code]


def edgetrust_failing_entries(findings: list[Finding]) -> dict[int, list[str]]:
    failing: dict[int, list[str]] = {}
    for finding in findings:
        if finding.severity >= Severity.ERROR:
            failing.setdefault(finding.context["index"], []).append(as_keylime_event(finding))
    return {index: sorted(events) for index, events in failing.items()}


def assert_same_as_keylime(
    lines: list[str], document: dict[str, Any], **evaluate_options: Any
) -> list[Finding]:
    """Assert that edgetrust and Keylime agree on the list; return edgetrust's findings."""
    policy = parse_runtime_policy(document)
    entries = parse_ascii_lines(lines).entries
    findings = evaluate(entries, policy, **evaluate_options)

    keylime = run_keylime(lines, document)

    assert edgetrust_failing_entries(findings) == keylime_failing_entries(keylime)
    assert bool(keylime["full"]) == any(finding.severity >= Severity.ERROR for finding in findings)
    return findings


def make_document(**changes: Any) -> dict[str, Any]:
    document = empty_policy_document()
    document.update(changes)
    return document


# --- the shared fixtures ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_keylime_fixture_logs_match(fixtures_dir: Path, algorithm: str) -> None:
    lines = (fixtures_dir / "ima" / f"keylime-ima-log-{algorithm}").read_text().splitlines()
    document = json.loads((fixtures_dir / "policy" / f"keylime-policy-{algorithm}.json").read_text())

    findings = assert_same_as_keylime(lines, document)

    assert findings


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_keylime_fixture_logs_with_own_policy_match(fixtures_dir: Path, algorithm: str) -> None:
    lines = (fixtures_dir / "ima" / f"keylime-ima-log-{algorithm}").read_text().splitlines()
    generated = policy_from_measurement_list(parse_ascii_lines(lines).entries).document

    assert_same_as_keylime(lines, generated)


@pytest.fixture(scope="module")
def agent_lines(fixtures_dir: Path) -> list[str]:
    return (fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_text().splitlines()


@pytest.fixture(scope="module")
def agent_policy(agent_lines: list[str]) -> dict[str, Any]:
    return policy_from_measurement_list(parse_ascii_lines(agent_lines).entries).document


def test_real_list_passes_its_generated_policy(agent_lines: list[str], agent_policy: dict[str, Any]) -> None:
    assert assert_same_as_keylime(agent_lines, agent_policy) == []


def test_real_list_with_mutated_policy_matches(agent_lines: list[str], agent_policy: dict[str, Any]) -> None:
    document = json.loads(json.dumps(agent_policy))
    paths = sorted(document["digests"])
    for path in paths[5:40]:
        del document["digests"][path]
    for path in paths[40:80]:
        document["digests"][path] = [hashlib.sha1(path.encode()).hexdigest()]
    for path in paths[80:90]:
        document["digests"][path].append(hashlib.sha256(path.encode()).hexdigest())
    document["excludes"] = ["/usr/lib/python3", r"/etc/.*\.conf$"]

    findings = assert_same_as_keylime(agent_lines, document)

    assert {finding.code for finding in findings} == {"ima-path-not-in-policy", "ima-digest-not-allowed"}


def test_real_list_with_mutated_entries_matches(agent_lines: list[str], agent_policy: dict[str, Any]) -> None:
    entries = parse_ascii_lines(agent_lines).entries
    mutated = list(agent_lines)
    for position in range(3, len(entries), 97):
        entry = entries[position]
        mutated[position] = imalist.ng_line(entry.path, hashlib.sha1(entry.digest).digest(), algorithm="sha1")
    mutated[50] = imalist.ng_line("/usr/bin/dropped-in", bytes(range(20)), algorithm="sha1")
    mutated.insert(60, imalist.violation_line("/var/log/syslog"))

    findings = assert_same_as_keylime(mutated, agent_policy)

    assert {finding.code for finding in findings} == {
        "ima-digest-not-allowed",
        "ima-path-not-in-policy",
        "ima-violation",
    }


# --- lists of our own, one per failure kind ---------------------------------------------------


def test_digest_path_and_exclude_cases_match() -> None:
    lines = [
        imalist.file_line("/usr/bin/allowed", b"ok"),
        imalist.file_line("/usr/bin/changed", b"evil"),
        imalist.file_line("/usr/bin/unknown", b"?"),
        imalist.file_line("/tmp/scratch", b"excluded"),
        imalist.file_line("/home/pi/my car/manage.py", b"car"),
    ]
    document = make_document(
        digests={
            "/usr/bin/allowed": [hashlib.sha256(b"ok").hexdigest()],
            "/usr/bin/changed": [hashlib.sha256(b"good").hexdigest()],
            "/home/pi/my car/manage.py": [hashlib.sha256(b"car").hexdigest()],
        },
        excludes=["/tmp/"],
    )

    findings = assert_same_as_keylime(lines, document)

    assert [finding.code for finding in findings] == ["ima-digest-not-allowed", "ima-path-not-in-policy"]


def test_signature_cases_match() -> None:
    digest = hashlib.sha256(b"signed binary").digest()
    rsa_signer, ec_signer, stranger = rsa_key(), ec_key(), ec_key()
    lines = [
        imalist.sig_line("/usr/bin/rsa-signed", digest, sign_digest(rsa_signer, digest)),
        imalist.sig_line("/usr/bin/ec-signed", digest, sign_digest(ec_signer, digest)),
        imalist.sig_line(
            "/usr/bin/ec-72",
            digest,
            ima_signature(
                ecdsa_signature_of_length(ec_signer, digest, 72), key_id_v2(ec_signer.public_key())
            ),
        ),
        imalist.sig_line(
            "/usr/bin/wrong-digest", digest, sign_digest(ec_signer, hashlib.sha256(b"x").digest())
        ),
        imalist.sig_line("/usr/bin/stranger", digest, sign_digest(stranger, digest)),
        imalist.sig_line("/usr/bin/listed-bad-signature", digest, sign_digest(stranger, digest)),
        imalist.sig_line("/usr/bin/unsigned", digest, b""),
    ]
    document = make_document(
        digests={"/usr/bin/listed-bad-signature": [digest.hex()]},
        **{"verification-keys": verification_keys_text([rsa_signer, ec_signer])},
    )

    findings = assert_same_as_keylime(lines, document)

    assert [finding.code for finding in findings] == [
        "ima-signature-invalid",
        "ima-signature-key-unknown",
        "ima-path-not-in-policy",
    ]


def test_keyring_cases_match() -> None:
    digest = hashlib.sha256(b"signed by a keyring key").digest()
    allowed, refused = ec_key(), rsa_key()
    allowed_certificate, refused_certificate = certificate_der(allowed), certificate_der(refused)
    lines = [
        imalist.sig_line("/usr/bin/early", digest, sign_digest(allowed, digest)),
        imalist.buf_line(".ima", allowed_certificate),
        imalist.buf_line(".ima", refused_certificate),
        imalist.buf_line(".builtin_trusted_keys", refused_certificate),
        imalist.buf_line(".platform", refused_certificate),
        imalist.sig_line("/usr/bin/late", digest, sign_digest(allowed, digest)),
        imalist.sig_line("/usr/bin/refused-key", digest, sign_digest(refused, digest)),
    ]
    document = make_document(
        keyrings={".ima": [hashlib.sha256(allowed_certificate).hexdigest()]},
        ima={"ignored_keyrings": [".platform"], "log_hash_alg": "sha1", "dm_policy": None},
    )

    findings = assert_same_as_keylime(lines, document)

    assert [finding.context["index"] for finding in findings] == [0, 2, 3, 6]


def test_kernel_version_buffer_cases_match() -> None:
    lines = [
        imalist.buf_line("kernel_version", b"6.1.0-rpi7-rpi-v8"),
        imalist.buf_line("kernel_version", b"6.6.6-unknown"),
        imalist.buf_line("boot_cmdline", b"console=serial0"),
    ]
    document = make_document(
        **{"ima-buf": {"kernel_version": [hashlib.sha256(b"6.1.0-rpi7-rpi-v8").hexdigest()]}}
    )

    findings = assert_same_as_keylime(lines, document)

    assert [finding.code for finding in findings] == ["ima-buf-not-allowed", "ima-buf-not-allowed"]


def test_violations_fail_as_in_keylime_without_configuration() -> None:
    lines = [imalist.file_line("/a", b"a"), imalist.violation_line("/var/lib/db")]

    findings = assert_same_as_keylime(
        lines, make_document(digests={"/a": [hashlib.sha256(b"a").hexdigest()]})
    )

    assert [finding.code for finding in findings] == ["ima-violation"]


# --- documented differences -------------------------------------------------------------------


def test_blank_exclude_differs_on_purpose() -> None:
    # Keylime joins excludes into one regex, where a blank one matches every path.
    lines = [imalist.file_line("/usr/bin/unknown", b"?")]
    document = make_document(excludes=[""])

    keylime = run_keylime(lines, document)
    findings = evaluate(parse_ascii_lines(lines).entries, parse_runtime_policy(document))

    assert keylime["full"] == []
    assert [finding.code for finding in findings] == ["ima-path-not-in-policy"]


# --- DSSE -------------------------------------------------------------------------------------


def test_envelope_signed_here_verifies_in_keylime(tmp_path: Path, fixtures_dir: Path) -> None:
    key = ec_key()
    payload = (fixtures_dir / "policy" / "keylime-runtime-policy-test.json").read_bytes()
    envelope = dsse.sign_envelope(payload, pem_private(key))
    script = (
        "import sys, base64\n"
        "from keylime import signing\n"
        "envelope, key = sys.stdin.buffer.read().split(b'\\n--\\n')\n"
        "verified = signing.verify_dsse_envelope(envelope, base64.b64decode(key))\n"
        "sys.stdout.buffer.write(verified.payload if verified else b'REJECTED')\n"
    )
    completed = subprocess.run(
        [str(KEYLIME_PYTHON), "-c", script],
        input=envelope.encode() + b"\n--\n" + base64.b64encode(pem_public(key)),
        capture_output=True,
        env=keylime_environment(),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    assert completed.stdout == payload


def test_keylime_unknown_algorithm_log_is_rejected_by_both(fixtures_dir: Path) -> None:
    # The template-hash column has 32 bytes while the policy's log_hash_alg is sha1.
    from evidence.errors import EvidenceError

    lines = (fixtures_dir / "ima" / "keylime-ima-log-unknown").read_text().splitlines()
    document = json.loads((fixtures_dir / "policy" / "keylime-policy-unknown.json").read_text())
    policy = parse_runtime_policy(document)

    keylime = run_keylime(lines, document)
    with pytest.raises(EvidenceError) as caught:
        parse_ascii_lines(lines, template_hash_algorithm=policy.log_hash_alg)

    assert keylime["full"] == ["ima.validation.ima_hash", "ima.validation.ima_hash"]
    assert "template hash" in caught.value.message
