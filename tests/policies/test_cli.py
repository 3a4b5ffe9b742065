"""The ``edgetrust policy`` commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetrust.cli import main
from tests.policies import imalist
from tests.policies.keys import ec_key, pem_private, pem_public, rsa_key


def run(*arguments: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["policy", *map(str, arguments)])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def agent_list(fixtures_dir: Path) -> Path:
    return fixtures_dir / "ima" / "rust-keylime-agent.ascii"


def test_create_from_ima_list_then_check_passes(tmp_path: Path, agent_list: Path) -> None:
    policy = tmp_path / "policy.json"

    created = run("create", "runtime", "--from-ima-list", agent_list, "-o", policy)
    checked = run("check", "--policy", policy, "--ima-list", agent_list)

    assert created[0] == 0
    assert "boot_aggregate" in json.loads(policy.read_text())["digests"]
    assert checked[0] == 0
    assert "826 entries, 0 findings: the list passes the policy" in checked[1]


def test_create_from_ima_list_with_exclude(tmp_path: Path, agent_list: Path) -> None:
    code, output, _ = run("create", "runtime", "--from-ima-list", agent_list, "--exclude", "/tmp/")

    assert code == 0
    assert json.loads(output)["excludes"] == ["/tmp/"]


def test_check_reports_findings_as_json(tmp_path: Path) -> None:
    ima_list = tmp_path / "ascii_runtime_measurements"
    ima_list.write_text(
        "\n".join([imalist.file_line("/usr/bin/a", b"a"), imalist.file_line("/usr/bin/b", b"b")]) + "\n"
    )
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", ima_list, "-o", policy)
    document = json.loads(policy.read_text())
    document["digests"]["/usr/bin/b"] = [hashlib.sha256(b"other").hexdigest()]
    policy.write_text(json.dumps(document))

    code, output, _ = run("check", "--policy", policy, "--ima-list", ima_list, "--json")
    result = json.loads(output)

    assert code == 1
    assert result["passed"] is False
    assert [finding["code"] for finding in result["findings"]] == ["ima-digest-not-allowed"]
    assert result["findings"][0]["context"]["path"] == "/usr/bin/b"


def test_check_catches_tampered_template_hash(tmp_path: Path) -> None:
    line = imalist.file_line("/usr/bin/a", b"a")
    ima_list = tmp_path / "list"
    ima_list.write_text(line + "\n")
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", ima_list, "-o", policy)
    ima_list.write_text(
        line.replace(hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()) + "\n"
    )
    document = json.loads(policy.read_text())
    document["digests"]["/usr/bin/a"].append(hashlib.sha256(b"b").hexdigest())
    policy.write_text(json.dumps(document))

    code, output, _ = run("check", "--policy", policy, "--ima-list", ima_list)

    assert code == 1
    assert "ima-template-hash-mismatch" in output


@pytest.fixture
def secureboot_log(fixtures_dir: Path) -> Path:
    return fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-secureboot"


@pytest.fixture
def mb_policy(tmp_path: Path, secureboot_log: Path) -> Path:
    from evidence.eventlog import parse_event_log
    from policies.measured_boot_generate import create_measured_boot_policy

    path = tmp_path / "mb-policy.json"
    path.write_text(json.dumps(create_measured_boot_policy(parse_event_log(secureboot_log.read_bytes()))))
    return path


def test_check_with_event_log_passes(
    tmp_path: Path, agent_list: Path, secureboot_log: Path, mb_policy: Path
) -> None:
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", agent_list, "-o", policy)

    code, output, _ = run(
        "check",
        "--policy",
        policy,
        "--ima-list",
        agent_list,
        "--eventlog",
        secureboot_log,
        "--mb-policy",
        mb_policy,
    )

    assert code == 0
    assert "0 findings" in output


def test_check_with_other_event_log_fails(
    tmp_path: Path, agent_list: Path, fixtures_dir: Path, mb_policy: Path
) -> None:
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", agent_list, "-o", policy)
    other_log = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements"

    code, output, _ = run(
        "check",
        "--policy",
        policy,
        "--ima-list",
        agent_list,
        "--eventlog",
        other_log,
        "--mb-policy",
        mb_policy,
    )

    assert code == 1
    assert "mb-" in output


def test_check_event_log_needs_mb_policy(tmp_path: Path, agent_list: Path, secureboot_log: Path) -> None:
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", agent_list, "-o", policy)

    code, _, error = run("check", "--policy", policy, "--ima-list", agent_list, "--eventlog", secureboot_log)

    assert code == 2
    assert "--mb-policy" in error


def test_check_unparsable_event_log_is_one_line_error(
    tmp_path: Path, agent_list: Path, fixtures_dir: Path, mb_policy: Path
) -> None:
    policy = tmp_path / "policy.json"
    run("create", "runtime", "--from-ima-list", agent_list, "-o", policy)
    bogus = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-bogus"

    code, _, error = run(
        "check", "--policy", policy, "--ima-list", agent_list, "--eventlog", bogus, "--mb-policy", mb_policy
    )

    assert code == 2
    assert error.count("\n") == 1


def test_check_bad_policy_is_one_line_error(tmp_path: Path, agent_list: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"meta": {"version": 1, "generator": 0}, "excludes": ["*"]}))

    code, _, error = run("check", "--policy", policy, "--ima-list", agent_list)

    assert code == 2
    assert error.count("\n") == 1
    assert "release" in error


def test_check_unparsable_list_is_one_line_error(tmp_path: Path, fixtures_dir: Path) -> None:
    ima_list = tmp_path / "list"
    ima_list.write_text("10 zz ima-ng sha1:00 /x\n")

    code, _, error = run(
        "check", "--policy", fixtures_dir / "policy" / "keylime-policy-sha1.json", "--ima-list", ima_list
    )

    assert code == 2
    assert error.count("\n") == 1


def test_sign_then_verify(tmp_path: Path, fixtures_dir: Path) -> None:
    key = ec_key()
    (tmp_path / "key.pem").write_bytes(pem_private(key))
    (tmp_path / "key.pub").write_bytes(pem_public(key))
    envelope = tmp_path / "signed.json"

    signed = run(
        "sign",
        "--key",
        tmp_path / "key.pem",
        fixtures_dir / "policy" / "keylime-runtime-policy-test.json",
        "-o",
        envelope,
    )
    verified = run("verify", "--key", tmp_path / "key.pub", envelope)

    assert signed[0] == 0
    assert json.loads(envelope.read_text())["payloadType"] == "application/vnd.keylime+json"
    assert verified[0] == 0
    assert "signature verified" in verified[1]


def test_verify_keylime_fixtures(fixtures_dir: Path) -> None:
    public_key = fixtures_dir / "policy" / "keylime-runtime-policy-pubkey.pub"

    good = run(
        "verify", "--key", public_key, fixtures_dir / "policy" / "keylime-runtime-policy-test-signed.json"
    )
    bad = run(
        "verify", "--key", public_key, fixtures_dir / "policy" / "keylime-runtime-policy-test-signed-bad.json"
    )

    assert good[0] == 0
    assert bad[0] == 1
    assert "no signature" in bad[2]


def test_check_signed_policy_needs_key(tmp_path: Path, fixtures_dir: Path, agent_list: Path) -> None:
    signed = fixtures_dir / "policy" / "keylime-runtime-policy-test-signed.json"

    without_key = run("check", "--policy", signed, "--ima-list", agent_list)
    with_key = run(
        "check",
        "--policy",
        signed,
        "--key",
        fixtures_dir / "policy" / "keylime-runtime-policy-pubkey.pub",
        "--ima-list",
        agent_list,
    )

    assert without_key[0] == 2
    assert "public key" in without_key[2]
    assert with_key[0] == 1
    assert "ima-path-not-in-policy" in with_key[1]


def test_sign_rejects_invalid_policy_and_rsa_key(tmp_path: Path) -> None:
    key = tmp_path / "rsa.pem"
    from cryptography.hazmat.primitives import serialization

    key.write_bytes(
        rsa_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"digests": {}}))
    (tmp_path / "ec.pem").write_bytes(pem_private(ec_key()))

    invalid_policy = run("sign", "--key", tmp_path / "ec.pem", policy, "-o", tmp_path / "out.json")
    run("create", "runtime", "--from-dir", tmp_path, "-o", policy)
    rsa = run("sign", "--key", key, policy, "-o", tmp_path / "out.json")

    assert invalid_policy[0] == 2
    assert rsa[0] == 2
    assert "EC" in rsa[2]


def test_import_allowlist_with_excludes(tmp_path: Path, fixtures_dir: Path) -> None:
    excludes = tmp_path / "excludes.txt"
    excludes.write_text("/tmp/\n\n/var/log/.*\n")

    code, output, _ = run(
        "import-allowlist",
        fixtures_dir / "policy" / "keylime-ima-allowlist-short.txt",
        "--excludes",
        excludes,
    )

    assert code == 0
    assert json.loads(output)["excludes"] == ["/tmp/", "/var/log/.*"]


def test_import_allowlist_bad_exclude_is_one_line_error(tmp_path: Path, fixtures_dir: Path) -> None:
    excludes = tmp_path / "excludes.txt"
    excludes.write_text("*\n")

    code, _, error = run(
        "import-allowlist",
        fixtures_dir / "policy" / "keylime-ima-allowlist-short.txt",
        "--excludes",
        excludes,
    )

    assert code == 2
    assert error.count("\n") == 1
    assert "line 1" in error


def test_create_from_dir_with_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_text("car-7\n")

    code, output, _ = run("create", "runtime", "--from-dir", tmp_path, "--root", "--hash", "sha1")

    assert code == 0
    assert json.loads(output)["digests"] == {"/etc/hostname": [hashlib.sha1(b"car-7\n").hexdigest()]}


def test_create_needs_exactly_one_source(tmp_path: Path, agent_list: Path) -> None:
    none_given = run("create", "runtime")
    two_given = run("create", "runtime", "--from-dir", tmp_path, "--from-ima-list", agent_list)

    assert none_given[0] == 2
    assert two_given[0] == 2


def test_create_donkeycar_car(tmp_path: Path) -> None:
    car = tmp_path / "mycar"
    (car / "models").mkdir(parents=True)
    (car / "manage.py").write_text("# drive\n")
    (car / "models" / "pilot.h5").write_bytes(b"h5")

    code, output, error = run("create", "runtime", "--donkeycar-car", car, "--prefix", "/home/pi/mycar")

    if code == 2 and "not installed" in error:
        pytest.skip("donkeycar is not installed in this venv (pip install donkeycar==5.3.0)")
    assert code == 0
    assert "/home/pi/mycar/models/pilot.h5" in json.loads(output)["digests"]
