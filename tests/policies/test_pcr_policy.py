"""PCR policies: allowed values per PCR and bank, checked against quoted PCR values."""

from __future__ import annotations

from typing import Any

import pytest

from policies.errors import PolicyError
from policies.pcr import (
    PCR_BANK_MISSING,
    PCR_NOT_QUOTED,
    PCR_VALUE_NOT_ALLOWED,
    evaluate_pcrs,
    parse_pcr_policy,
)

GOOD = bytes(range(32))
OTHER = bytes(32)
SHA1_GOOD = bytes(range(20))


def document() -> dict[str, Any]:
    return {"pcrs": {"sha256": {"0": [GOOD.hex(), OTHER.hex()], "7": [GOOD.hex()]},
                     "sha1": {"0": [SHA1_GOOD.hex()]}}}


def test_allowed_values_pass() -> None:
    policy = parse_pcr_policy(document())
    quoted = {"sha256": {0: OTHER, 7: GOOD, 10: OTHER}, "sha1": {0: SHA1_GOOD}}

    assert evaluate_pcrs(policy, quoted) == []


def test_value_not_allowed() -> None:
    policy = parse_pcr_policy(document())
    quoted = {"sha256": {0: GOOD, 7: OTHER}, "sha1": {0: SHA1_GOOD}}

    findings = evaluate_pcrs(policy, quoted)

    assert [f.code for f in findings] == [PCR_VALUE_NOT_ALLOWED]
    assert findings[0].context["pcr"] == 7
    assert findings[0].context["bank"] == "sha256"
    assert findings[0].context["value"] == OTHER.hex()


def test_bank_missing() -> None:
    policy = parse_pcr_policy(document())

    findings = evaluate_pcrs(policy, {"sha256": {0: GOOD, 7: GOOD}})

    assert [f.code for f in findings] == [PCR_BANK_MISSING]
    assert findings[0].context["bank"] == "sha1"


def test_pcr_not_quoted() -> None:
    policy = parse_pcr_policy(document())

    findings = evaluate_pcrs(policy, {"sha256": {0: GOOD}, "sha1": {0: SHA1_GOOD}})

    assert [f.code for f in findings] == [PCR_NOT_QUOTED]
    assert findings[0].context["pcr"] == 7


def test_selection_lists_pcrs_per_bank() -> None:
    assert parse_pcr_policy(document()).selection() == {"sha1": (0,), "sha256": (0, 7)}


def test_content_hash_ignores_order_and_case() -> None:
    reordered = {"pcrs": {"sha1": {"0": [SHA1_GOOD.hex().upper()]},
                          "sha256": {"7": [GOOD.hex()], "0": [OTHER.hex(), GOOD.hex(), GOOD.hex()]}}}

    assert parse_pcr_policy(reordered).content_hash == parse_pcr_policy(document()).content_hash


INVALID = [
    ({}, "policy-field-missing", "pcrs"),
    ({"pcrs": []}, "policy-field-invalid", "pcrs"),
    ({"pcrs": {}, "extra": 1}, "policy-field-invalid", "extra"),
    ({"pcrs": {"md5": {"0": ["00" * 16]}}}, "policy-field-invalid", "pcrs.md5"),
    ({"pcrs": {"sha256": {"24": [GOOD.hex()]}}}, "policy-field-invalid", 'pcrs.sha256["24"]'),
    ({"pcrs": {"sha256": {"07": [GOOD.hex()]}}}, "policy-field-invalid", 'pcrs.sha256["07"]'),
    ({"pcrs": {"sha256": {"x": [GOOD.hex()]}}}, "policy-field-invalid", 'pcrs.sha256["x"]'),
    ({"pcrs": {"sha256": {"0": []}}}, "policy-field-invalid", 'pcrs.sha256["0"]'),
    ({"pcrs": {"sha256": {"0": [SHA1_GOOD.hex()]}}}, "policy-digest-invalid",
     'pcrs.sha256["0"][0]'),
    ({"pcrs": {"sha256": {"0": [GOOD.hex(), "zz" * 32]}}}, "policy-digest-invalid",
     'pcrs.sha256["0"][1]'),
]


@pytest.mark.parametrize(("unverified", "code", "field"), INVALID)
def test_rejects_invalid_document(unverified: dict[str, Any], code: str, field: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_pcr_policy(unverified)

    assert raised.value.code == code
    assert raised.value.field == field
