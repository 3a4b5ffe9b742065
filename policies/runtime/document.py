"""Validate a Keylime runtime policy document (format version 1) and normalise it.

A runtime policy is a JSON object with eight required keys::

    {"meta": {"version": 1, "generator": 0-3, "timestamp": "..."},
     "release": 0,
     "digests": {"<path>": ["<hex digest>", ...]},
     "excludes": ["<Python regex matched from the start of the path>"],
     "keyrings": {"<keyring name>": ["<hex digest of a key measured into it>"]},
     "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
     "ima-buf": {"<buffer name>": ["<hex digest of the buffer>"]},
     "verification-keys": "<JSON text: {\\"keyids\\": [...], \\"pubkeys\\": [base64 DER]}>"}

The rules follow Keylime 7.14.3's ``RUNTIME_POLICY_SCHEMA`` with these differences:

- A digest must have an even number of hex digits, because it is compared as bytes.
- A digest written ``<algorithm>:<hex>`` is accepted and stored without the prefix when the
  hex length fits the algorithm. Keylime's schema rejects that form, but older Keylime tools
  wrote it for ``boot_aggregate`` and Keylime's own test policy still carries one.
- A blank exclude (empty or only white space) is dropped: it excludes nothing. Keylime joins
  its excludes into one regular expression, where a blank one matches every path.
- Every exclude must compile on its own as a Python regular expression; a lone ``*`` does not.
- Each entry of ``verification-keys`` must decode to a supported public key. Keylime logs a
  bad key and skips it.

Every error is a PolicyError whose ``field`` is the JSON path of the value at fault, such as
``digests["/usr/bin/bash"][0]``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from policies.errors import (
    POLICY_DIGEST_INVALID,
    POLICY_EXCLUDE_INVALID,
    POLICY_FIELD_INVALID,
    POLICY_FIELD_MISSING,
    POLICY_NOT_JSON,
    POLICY_VERIFICATION_KEYS_INVALID,
    POLICY_VERSION_UNSUPPORTED,
    PolicyError,
)
from policies.imasig import VerificationKey, load_verification_key

RUNTIME_POLICY_VERSION = 1

# meta.generator as Keylime numbers it: unknown, empty allowlist, allowlist compatible with the
# runtime policy format, legacy allowlist.
GENERATOR_UNKNOWN = 0
GENERATOR_EMPTY_ALLOWLIST = 1
GENERATOR_COMPATIBLE_ALLOWLIST = 2
GENERATOR_LEGACY_ALLOWLIST = 3

LOG_HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")

REQUIRED_KEYS = (
    "meta",
    "release",
    "digests",
    "excludes",
    "keyrings",
    "ima",
    "ima-buf",
    "verification-keys",
)

# Digest sizes of the algorithm prefixes accepted in front of a digest.
_PREFIX_DIGEST_SIZES = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}

_DIGEST_PATTERN = re.compile(r"[0-9a-f]{40,128}")

_BLANK = re.compile(r"\s*")


def parse_json_object(unverified_document: bytes | str, *, what: str = "runtime policy") -> dict[str, Any]:
    """Parse JSON text that must hold an object."""
    try:
        value = json.loads(unverified_document)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PolicyError(f"{what} is not valid JSON: {exc}", code=POLICY_NOT_JSON) from None
    if not isinstance(value, dict):
        raise PolicyError(f"{what} must be a JSON object, got {_json_type(value)}", code=POLICY_NOT_JSON)
    return value


def empty_policy_document(generator: int = GENERATOR_EMPTY_ALLOWLIST) -> dict[str, Any]:
    """Return a valid runtime policy document that allows nothing."""
    return {
        "meta": {"version": RUNTIME_POLICY_VERSION, "generator": generator},
        "release": 0,
        "digests": {},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


def normalize_policy_document(unverified_policy: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a runtime policy document and return it in canonical form.

    The canonical form has exactly the eight keys. Each digest list is sorted, without
    duplicates and without algorithm prefixes. Blank excludes are dropped, and ignored
    keyrings are sorted. Keys outside the format (at the top level or in ``meta`` and ``ima``) are
    dropped, as Keylime ignores them. The result may share digest lists with the input, so
    copy the input before changing it. Raises PolicyError naming the field at fault.
    """
    for key in REQUIRED_KEYS:
        if key not in unverified_policy:
            raise PolicyError(f"required key {key!r} is missing", code=POLICY_FIELD_MISSING, field=key)

    verification_keys = unverified_policy["verification-keys"]
    _require_type(verification_keys, str, "verification-keys")
    parse_verification_keys(verification_keys)

    return {
        "meta": _normalize_meta(unverified_policy["meta"]),
        "release": _require_count(unverified_policy["release"], "release"),
        "digests": normalize_digest_table(unverified_policy["digests"], "digests"),
        "excludes": normalize_excludes(unverified_policy["excludes"]),
        "keyrings": normalize_digest_table(unverified_policy["keyrings"], "keyrings"),
        "ima": _normalize_ima(unverified_policy["ima"]),
        "ima-buf": normalize_digest_table(unverified_policy["ima-buf"], "ima-buf"),
        "verification-keys": verification_keys,
    }


def _normalize_meta(unverified_meta: Any) -> dict[str, Any]:
    _require_type(unverified_meta, dict, "meta")
    for key in ("version", "generator"):
        if key not in unverified_meta:
            raise PolicyError(
                f"required key {key!r} is missing", code=POLICY_FIELD_MISSING, field=f"meta.{key}"
            )

    version = _require_count(unverified_meta["version"], "meta.version")
    if version != RUNTIME_POLICY_VERSION:
        raise PolicyError(
            f"runtime policy format version {version} is not supported, expected {RUNTIME_POLICY_VERSION}",
            code=POLICY_VERSION_UNSUPPORTED,
            field="meta.version",
        )

    generator = _require_count(unverified_meta["generator"], "meta.generator")
    if generator > GENERATOR_LEGACY_ALLOWLIST:
        raise PolicyError(
            f"generator {generator} is out of range, expected 0 to {GENERATOR_LEGACY_ALLOWLIST}",
            code=POLICY_FIELD_INVALID,
            field="meta.generator",
        )

    meta: dict[str, Any] = {"version": version, "generator": generator}
    if "timestamp" in unverified_meta:
        _require_type(unverified_meta["timestamp"], str, "meta.timestamp")
        meta["timestamp"] = unverified_meta["timestamp"]
    return meta


def _normalize_ima(unverified_ima: Any) -> dict[str, Any]:
    _require_type(unverified_ima, dict, "ima")
    for key in ("ignored_keyrings", "log_hash_alg", "dm_policy"):
        if key not in unverified_ima:
            raise PolicyError(
                f"required key {key!r} is missing", code=POLICY_FIELD_MISSING, field=f"ima.{key}"
            )

    ignored = unverified_ima["ignored_keyrings"]
    _require_type(ignored, list, "ima.ignored_keyrings")
    for index, name in enumerate(ignored):
        _require_type(name, str, f"ima.ignored_keyrings[{index}]")

    log_hash_alg = unverified_ima["log_hash_alg"]
    _require_type(log_hash_alg, str, "ima.log_hash_alg")
    if log_hash_alg not in LOG_HASH_ALGORITHMS:
        raise PolicyError(
            f"log hash algorithm {log_hash_alg!r} is not supported, expected one of "
            f"{', '.join(LOG_HASH_ALGORITHMS)}",
            code=POLICY_FIELD_INVALID,
            field="ima.log_hash_alg",
        )

    # NOTE: Keylime's device-mapper policy (dm_policy) is not implemented; Keylime 7.14.3's
    # schema also admits only null here.
    if unverified_ima["dm_policy"] is not None:
        raise PolicyError(
            "device-mapper policies are not supported, expected null",
            code=POLICY_FIELD_INVALID,
            field="ima.dm_policy",
        )

    return {
        "ignored_keyrings": sorted(set(ignored)),
        "log_hash_alg": log_hash_alg,
        "dm_policy": None,
    }


def normalize_digest_table(unverified_table: Any, field: str) -> dict[str, list[str]]:
    """Validate a name → digest list table (``digests``, ``keyrings``, ``ima-buf``)."""
    _require_type(unverified_table, dict, field)
    table: dict[str, list[str]] = {}
    fullmatch = _DIGEST_PATTERN.fullmatch
    for name, unverified_digests in unverified_table.items():
        # Fast path for the common case: one well-formed digest. The list is already in
        # canonical form, so it is kept rather than copied.
        if type(unverified_digests) is list and len(unverified_digests) == 1:
            digest = unverified_digests[0]
            if type(digest) is str and fullmatch(digest) and not len(digest) & 1:
                table[name] = unverified_digests
                continue
        table[name] = _normalize_digest_list(unverified_digests, f"{field}[{json.dumps(name)}]")
    return table


def _normalize_digest_list(unverified_digests: Any, field: str) -> list[str]:
    _require_type(unverified_digests, list, field)
    if not unverified_digests:
        raise PolicyError(
            "digest list is empty, expected at least one digest",
            code=POLICY_DIGEST_INVALID,
            field=field,
        )
    digests = {
        normalize_digest(digest, f"{field}[{index}]") for index, digest in enumerate(unverified_digests)
    }
    return sorted(digests)


def normalize_digest(unverified_digest: Any, field: str) -> str:
    """Validate one digest and return it as lowercase hex without an algorithm prefix."""
    _require_type(unverified_digest, str, field)
    digest: str = unverified_digest
    algorithm, colon, hex_part = digest.partition(":")
    if colon:
        size = _PREFIX_DIGEST_SIZES.get(algorithm)
        if size is None or len(hex_part) != 2 * size:
            raise PolicyError(
                f"digest {digest!r} has an unknown algorithm prefix or a length that does not "
                f"fit it; expected lowercase hex, optionally after one of "
                f"{', '.join(_PREFIX_DIGEST_SIZES)} and a colon",
                code=POLICY_DIGEST_INVALID,
                field=field,
            )
        digest = hex_part

    if not _DIGEST_PATTERN.fullmatch(digest):
        if _DIGEST_PATTERN.fullmatch(digest.lower()):
            problem = "uses uppercase letters"
        else:
            problem = f"is not 40 to 128 hex digits ({len(digest)} characters)"
        raise PolicyError(
            f"digest {unverified_digest!r} {problem}; expected lowercase hex of 40 to 128 digits",
            code=POLICY_DIGEST_INVALID,
            field=field,
        )
    if len(digest) % 2:
        raise PolicyError(
            f"digest {unverified_digest!r} has an odd number of hex digits ({len(digest)})",
            code=POLICY_DIGEST_INVALID,
            field=field,
        )
    return digest


def normalize_excludes(unverified_excludes: Any, field: str = "excludes") -> list[str]:
    """Validate exclude regular expressions and drop the blank ones."""
    _require_type(unverified_excludes, list, field)
    excludes: list[str] = []
    for index, pattern in enumerate(unverified_excludes):
        item_field = f"{field}[{index}]"
        _require_type(pattern, str, item_field)
        if _BLANK.fullmatch(pattern):
            continue
        validate_exclude(pattern, item_field)
        excludes.append(pattern)
    return excludes


def validate_exclude(pattern: str, field: str) -> None:
    """Raise PolicyError unless ``pattern`` compiles as a Python regular expression."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PolicyError(
            f"exclude {pattern!r} is not a valid regular expression: {exc}",
            code=POLICY_EXCLUDE_INVALID,
            field=field,
        ) from None


def parse_verification_keys(unverified_text: str) -> tuple[VerificationKey, ...]:
    """Parse the ``verification-keys`` JSON text into keys.

    The text is empty or a JSON object ``{"meta": {"version": 1}, "keyids": [<int>, ...],
    "pubkeys": ["<base64 DER SubjectPublicKeyInfo or certificate>", ...]}``; ``keyids[i]``
    names ``pubkeys[i]`` and, when missing or 0, the key id is computed from the key. Keylime's
    database stores this text JSON-encoded a second time, so a JSON string holding the object
    is accepted too.
    """
    if not unverified_text:
        return ()
    field = "verification-keys"
    try:
        value = json.loads(unverified_text)
        if isinstance(value, str):
            value = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise PolicyError(
            f"verification keys are not valid JSON text: {exc}",
            code=POLICY_VERIFICATION_KEYS_INVALID,
            field=field,
        ) from None

    _require_type(value, dict, field, code=POLICY_VERIFICATION_KEYS_INVALID)
    key_ids = value.get("keyids", [])
    if "pubkeys" not in value:
        raise PolicyError(
            "required key 'pubkeys' is missing",
            code=POLICY_VERIFICATION_KEYS_INVALID,
            field=f"{field}.pubkeys",
        )
    public_keys = value["pubkeys"]
    _require_type(key_ids, list, f"{field}.keyids", code=POLICY_VERIFICATION_KEYS_INVALID)
    _require_type(public_keys, list, f"{field}.pubkeys", code=POLICY_VERIFICATION_KEYS_INVALID)

    keys = []
    for index, encoded in enumerate(public_keys):
        key_field = f"{field}.pubkeys[{index}]"
        key_id = key_ids[index] if index < len(key_ids) else None
        if key_id is not None and (type(key_id) is not int or not 0 <= key_id < 2**32):
            raise PolicyError(
                f"key id {key_id!r} is not an integer from 0 to 2**32 - 1",
                code=POLICY_VERIFICATION_KEYS_INVALID,
                field=f"{field}.keyids[{index}]",
            )
        keys.append(_load_encoded_key(encoded, key_id, key_field))
    return tuple(keys)


def _load_encoded_key(encoded: Any, key_id: int | None, field: str) -> VerificationKey:
    _require_type(encoded, str, field, code=POLICY_VERIFICATION_KEYS_INVALID)
    try:
        der = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise PolicyError(
            f"public key is not valid base64: {exc}",
            code=POLICY_VERIFICATION_KEYS_INVALID,
            field=field,
        ) from None
    try:
        return load_verification_key(der, key_id=key_id)
    except PolicyError as exc:
        raise PolicyError(exc.message, code=POLICY_VERIFICATION_KEYS_INVALID, field=field) from None


def _require_type(value: Any, expected: type, field: str, *, code: str = POLICY_FIELD_INVALID) -> None:
    # bool is a subclass of int in Python but not an integer in JSON.
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return
    raise PolicyError(f"expected {_TYPE_NAMES[expected]}, got {_json_type(value)}", code=code, field=field)


def _require_count(value: Any, field: str) -> int:
    _require_type(value, int, field)
    if value < 0:
        raise PolicyError(
            f"expected an integer of at least 0, got {value}", code=POLICY_FIELD_INVALID, field=field
        )
    result: int = value
    return result


_TYPE_NAMES: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
