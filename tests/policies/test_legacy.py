"""Import of Keylime's legacy allowlists and exclude lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.errors import PolicyError
from policies.runtime import import_allowlist, parse_exclude_list, parse_runtime_policy
from policies.runtime.compiled import digest_allowed

SHA1 = "1" * 40
SHA256 = "2" * 64


def test_fixture_allowlist_imports(fixtures_dir: Path) -> None:
    text = (fixtures_dir / "policy" / "keylime-ima-allowlist-short.txt").read_text()

    document = import_allowlist(text)
    policy = parse_runtime_policy(document)

    assert document["meta"]["generator"] == 3
    assert len(policy.digests) == 21
    assert digest_allowed(
        policy.digests,
        "boot_aggregate",
        bytes.fromhex("4309217e9709def327c3409407f4d52907aeba46ef1b4f46529fd095f2ef9fb2"),
    )


def test_fixture_allowlist_equals_keylime_test_policy(fixtures_dir: Path) -> None:
    # Keylime's test policy was made from this allowlist; the digests must agree.
    imported = parse_runtime_policy(
        import_allowlist((fixtures_dir / "policy" / "keylime-ima-allowlist-short.txt").read_text())
    )
    policy = parse_runtime_policy((fixtures_dir / "policy" / "keylime-runtime-policy-test.json").read_bytes())

    assert dict(imported.digests) == dict(policy.digests)


def test_flat_allowlist_lines() -> None:
    text = "\n".join(
        [
            "# comment",
            f"{SHA1}  /usr/bin/bash",
            f"{SHA256}\t/usr/bin/bash",
            "",
            f"sha256:{SHA256}  /opt/my car/manage.py",
            f"{SHA256}  %keyring:.ima",
        ]
    )

    document = import_allowlist(text)

    assert document["digests"] == {"/usr/bin/bash": [SHA1, SHA256], "/opt/my_car/manage.py": [SHA256]}
    assert document["keyrings"] == {".ima": [SHA256]}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (f"{SHA1}  /a\njustonefield", "line 2"),
        (f"{SHA1}  /a\n\nXYZ  /b", "line 3"),
        (f"{'A' * 40}  /a", "line 1"),
    ],
)
def test_bad_allowlist_line_is_named(text: str, field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        import_allowlist(text)

    assert caught.value.code == "allowlist-invalid"
    assert caught.value.field == field


def test_json_allowlist_imports() -> None:
    text = json.dumps(
        {
            "meta": {"version": 5},
            "hashes": {"/usr/bin/bash": [SHA1]},
            "excludes": ["/tmp/"],
            "ima": {"ignored_keyrings": [".ima"], "log_hash_alg": "sha256", "dm_policy": None},
        }
    )

    document = import_allowlist(text)

    assert document["digests"] == {"/usr/bin/bash": [SHA1]}
    assert document["excludes"] == ["/tmp/"]
    assert document["ima"]["log_hash_alg"] == "sha256"
    assert document["meta"]["version"] == 1


def test_json_allowlist_errors_name_hashes() -> None:
    with pytest.raises(PolicyError) as caught:
        import_allowlist(json.dumps({"hashes": {"/a": ["zz"]}}))

    assert caught.value.field == 'hashes["/a"][0]'


def test_runtime_policy_is_not_an_allowlist() -> None:
    with pytest.raises(PolicyError) as caught:
        import_allowlist(json.dumps({"digests": {}}))

    assert caught.value.code == "allowlist-invalid"
    assert "already a runtime policy" in caught.value.message


def test_exclude_list_imports_with_allowlist() -> None:
    document = import_allowlist(f"{SHA1}  /a", excludes="# volatile\n/var/log/.*\n\n/tmp/\n")

    assert document["excludes"] == ["/var/log/.*", "/tmp/"]


def test_exclude_list_blank_lines_exclude_nothing() -> None:
    assert parse_exclude_list("\n   \n") == []


def test_exclude_list_lone_star_is_rejected_naming_line() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_exclude_list("/tmp/\n*\n")

    assert caught.value.code == "exclude-list-invalid"
    assert caught.value.field == "line 2"
    assert "'*'" in caught.value.message
