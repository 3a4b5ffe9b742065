"""PCR policies: the values each PCR of each bank may hold, checked against quoted values.

A PCR policy is a JSON object::

    {"pcrs": {"sha256": {"0": ["<hex digest>", ...], "7": [...]},
              "sha1": {...}}}

Each bank lists PCR indexes (decimal strings, 0-23) and, for each, one or more allowed values
as hex digests of the bank's size. A quoted PCR passes if its value is one of the listed
values. PCRs the policy does not list are not checked here.

Public API::

    parse_pcr_policy(unverified_document: Mapping[str, Any]) -> PcrPolicy
    evaluate_pcrs(policy: PcrPolicy, quoted: Mapping[str, Mapping[int, bytes]]) -> list[Finding]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from evidence.findings import Finding, Severity
from policies.errors import (
    POLICY_DIGEST_INVALID,
    POLICY_FIELD_INVALID,
    POLICY_FIELD_MISSING,
    PolicyError,
)

# Finding codes.
PCR_VALUE_NOT_ALLOWED: Final = "pcr-value-not-allowed"
PCR_BANK_MISSING: Final = "pcr-bank-missing"
PCR_NOT_QUOTED: Final = "pcr-not-quoted"

# Digest sizes of the PCR banks a TPM 2.0 can allocate (TCG Algorithm Registry).
BANK_DIGEST_SIZES: Final = MappingProxyType(
    {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
)
PCR_COUNT: Final = 24

_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, eq=False)
class PcrPolicy:
    """A validated PCR policy. Build it with ``parse_pcr_policy``."""

    content_hash: str
    """SHA-256 hex of the canonical serialisation."""
    banks: Mapping[str, Mapping[int, frozenset[bytes]]]
    """Allowed values by bank name and PCR index."""

    def to_document(self) -> dict[str, Any]:
        """Return the canonical document: banks and PCRs in order, values sorted."""
        return {
            "pcrs": {
                bank: {
                    str(index): sorted(value.hex() for value in values)
                    for index, values in sorted(pcrs.items())
                }
                for bank, pcrs in sorted(self.banks.items())
            }
        }

    def canonical_json(self) -> bytes:
        """Return the canonical serialisation that ``content_hash`` is computed over."""
        return _canonical_json(self.to_document())

    def selection(self) -> dict[str, tuple[int, ...]]:
        """Return the PCR indexes that a quote must cover, by bank."""
        return {bank: tuple(sorted(pcrs)) for bank, pcrs in self.banks.items()}


def parse_pcr_policy(unverified_document: Mapping[str, Any]) -> PcrPolicy:
    """Validate a decoded PCR policy. Raises PolicyError whose ``field`` is the JSON path."""
    if not isinstance(unverified_document, Mapping):
        raise PolicyError("PCR policy must be a JSON object", code=POLICY_FIELD_INVALID)
    unknown = sorted(set(unverified_document) - {"pcrs"})
    if unknown:
        raise PolicyError(
            f"unknown key {unknown[0]!r}; a PCR policy has only 'pcrs'",
            code=POLICY_FIELD_INVALID,
            field=unknown[0],
        )
    if "pcrs" not in unverified_document:
        raise PolicyError("'pcrs' is required", code=POLICY_FIELD_MISSING, field="pcrs")
    unverified_banks = unverified_document["pcrs"]
    if not isinstance(unverified_banks, Mapping):
        raise PolicyError("must be an object of PCR banks", code=POLICY_FIELD_INVALID, field="pcrs")

    banks: dict[str, Mapping[int, frozenset[bytes]]] = {}
    for bank, unverified_pcrs in unverified_banks.items():
        banks[bank] = MappingProxyType(_parse_bank(bank, unverified_pcrs))

    policy = PcrPolicy(content_hash="", banks=MappingProxyType(banks))
    content_hash = hashlib.sha256(policy.canonical_json()).hexdigest()
    return PcrPolicy(content_hash=content_hash, banks=policy.banks)


def _parse_bank(bank: str, unverified_pcrs: Any) -> dict[int, frozenset[bytes]]:
    field = f"pcrs.{bank}"
    size = BANK_DIGEST_SIZES.get(bank)
    if size is None:
        raise PolicyError(
            f"unknown PCR bank {bank!r}; expected one of {', '.join(BANK_DIGEST_SIZES)}",
            code=POLICY_FIELD_INVALID,
            field=field,
        )
    if not isinstance(unverified_pcrs, Mapping):
        raise PolicyError(
            "must be an object from PCR index to allowed values", code=POLICY_FIELD_INVALID, field=field
        )

    pcrs: dict[int, frozenset[bytes]] = {}
    for key, unverified_values in unverified_pcrs.items():
        index = _parse_index(key, f'{field}["{key}"]')
        pcrs[index] = _parse_values(unverified_values, size, f'{field}["{key}"]')
    return pcrs


def _parse_index(key: str, field: str) -> int:
    if not (key.isascii() and key.isdigit()) or (len(key) > 1 and key.startswith("0")):
        raise PolicyError(
            f"PCR index {key!r} is not a decimal number without leading zeros",
            code=POLICY_FIELD_INVALID,
            field=field,
        )
    index = int(key)
    if index >= PCR_COUNT:
        raise PolicyError(
            f"PCR index {index} is out of range 0-{PCR_COUNT - 1}", code=POLICY_FIELD_INVALID, field=field
        )
    return index


def _parse_values(unverified_values: Any, size: int, field: str) -> frozenset[bytes]:
    if not isinstance(unverified_values, list) or not unverified_values:
        raise PolicyError("must be a non-empty array of hex digests", code=POLICY_FIELD_INVALID, field=field)
    values = set()
    for position, value in enumerate(unverified_values):
        item = f"{field}[{position}]"
        if not isinstance(value, str) or not _HEX_DIGITS.issuperset(value):
            raise PolicyError(f"{value!r} is not a hex digest", code=POLICY_DIGEST_INVALID, field=item)
        if len(value) != 2 * size:
            raise PolicyError(
                f"digest has {len(value)} hex digits; this bank's digests have {2 * size}",
                code=POLICY_DIGEST_INVALID,
                field=item,
            )
        values.add(bytes.fromhex(value))
    return frozenset(values)


def evaluate_pcrs(policy: PcrPolicy, quoted: Mapping[str, Mapping[int, bytes]]) -> list[Finding]:
    """Check quoted PCR values against the policy.

    ``quoted`` maps bank names to the PCR values a verified quote covers. Steps:

    1. Each bank the policy lists must be in the quote, else ``pcr-bank-missing``.
    2. Each PCR the policy lists must be in the quote, else ``pcr-not-quoted``.
    3. Each such PCR's value must be an allowed value, else ``pcr-value-not-allowed``.
    """
    findings: list[Finding] = []
    for bank, pcrs in sorted(policy.banks.items()):
        quoted_bank = quoted.get(bank)
        if quoted_bank is None:
            findings.append(
                Finding(
                    PCR_BANK_MISSING,
                    Severity.ERROR,
                    f"the policy checks PCR bank {bank}, which the quote does not contain",
                    {"bank": bank, "quoted_banks": sorted(quoted)},
                )
            )
            continue

        for index, allowed in sorted(pcrs.items()):
            value = quoted_bank.get(index)
            if value is None:
                findings.append(
                    Finding(
                        PCR_NOT_QUOTED,
                        Severity.ERROR,
                        f"the policy checks PCR {index} in bank {bank}, which the quote does not cover",
                        {"bank": bank, "pcr": index},
                    )
                )
            elif value not in allowed:
                findings.append(
                    Finding(
                        PCR_VALUE_NOT_ALLOWED,
                        Severity.ERROR,
                        f"PCR {index} in bank {bank} is {value.hex()}, not an allowed value",
                        {
                            "bank": bank,
                            "pcr": index,
                            "value": value.hex(),
                            "allowed": sorted(item.hex() for item in allowed),
                        },
                    )
                )
    return findings


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
