"""Convert Keylime's legacy allowlists and exclude lists into a runtime policy.

Formats read:

- Flat allowlist: one ``<hex digest>  <path>`` line per file, fields separated by white space.
  The digest may carry an algorithm prefix (``sha256:<hex>``). A path written
  ``%keyring:<name>`` lists a key digest under ``keyrings[<name>]``. Spaces in a path become
  ``_``, because IMA logs them that way. Blank lines and lines starting with ``#`` are skipped.
- JSON allowlist (Keylime before runtime policies): an object whose ``hashes`` maps paths to
  digest lists, optionally with ``excludes``, ``keyrings``, ``ima``, ``ima-buf`` and
  ``verification-keys`` in the runtime policy's form.
- Exclude list: one Python regular expression per line. Blank lines and lines starting with
  ``#`` are skipped.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from policies.errors import ALLOWLIST_INVALID, EXCLUDE_LIST_INVALID, PolicyError
from policies.runtime.document import (
    GENERATOR_LEGACY_ALLOWLIST,
    empty_policy_document,
    normalize_digest,
    normalize_policy_document,
    validate_exclude,
)

KEYRING_PREFIX = "%keyring:"


def import_allowlist(unverified_text: str, *, excludes: str | None = None) -> dict[str, Any]:
    """Convert a legacy allowlist (flat or JSON) and an optional exclude list into a policy.

    Returns the normalised runtime policy document. Raises PolicyError naming the line or the
    field at fault.
    """
    stripped = unverified_text.lstrip()
    if stripped.startswith("{"):
        document = _convert_json_allowlist(unverified_text)
    else:
        document = _convert_flat_allowlist(unverified_text)

    if excludes is not None:
        document["excludes"] = list(document["excludes"]) + parse_exclude_list(excludes)
    document["meta"]["timestamp"] = dt.datetime.now(dt.UTC).isoformat()
    return normalize_policy_document(document)


def parse_exclude_list(unverified_text: str) -> list[str]:
    """Read an exclude list: one regular expression per line. Raises PolicyError."""
    excludes = []
    for line_number, line in enumerate(unverified_text.splitlines(), start=1):
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        try:
            validate_exclude(pattern, f"line {line_number}")
        except PolicyError as exc:
            raise PolicyError(exc.message, code=EXCLUDE_LIST_INVALID, field=exc.field) from None
        excludes.append(pattern)
    return excludes


def _convert_flat_allowlist(unverified_text: str) -> dict[str, Any]:
    document = empty_policy_document(GENERATOR_LEGACY_ALLOWLIST)
    for line_number, line in enumerate(unverified_text.splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        field = f"line {line_number}"
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise PolicyError(
                f"allowlist line {text[:80]!r} is not '<digest> <path>'",
                code=ALLOWLIST_INVALID,
                field=field,
            )
        digest_text, path = parts
        try:
            digest = normalize_digest(digest_text, field)
        except PolicyError as exc:
            raise PolicyError(exc.message, code=ALLOWLIST_INVALID, field=field) from None

        if path.startswith(KEYRING_PREFIX):
            table = document["keyrings"]
            name = path[len(KEYRING_PREFIX) :]
        else:
            table = document["digests"]
            name = path.replace(" ", "_")
        digests = table.setdefault(name, [])
        if digest not in digests:
            digests.append(digest)
    return document


def _convert_json_allowlist(unverified_text: str) -> dict[str, Any]:
    try:
        allowlist = json.loads(unverified_text)
    except (ValueError, RecursionError) as exc:
        raise PolicyError(f"allowlist is not valid JSON: {exc}", code=ALLOWLIST_INVALID) from None
    if not isinstance(allowlist, dict):
        raise PolicyError("JSON allowlist must be an object", code=ALLOWLIST_INVALID)
    if "digests" in allowlist:
        raise PolicyError(
            "the file is already a runtime policy (it has a digests key); load it directly",
            code=ALLOWLIST_INVALID,
            field="digests",
        )
    if "hashes" not in allowlist:
        raise PolicyError("JSON allowlist has no hashes key", code=ALLOWLIST_INVALID, field="hashes")

    document = empty_policy_document(GENERATOR_LEGACY_ALLOWLIST)
    document["digests"] = allowlist["hashes"]
    for key in ("excludes", "keyrings", "ima", "ima-buf", "verification-keys"):
        if allowlist.get(key):
            document[key] = allowlist[key]
    try:
        # Validate here so that errors name the allowlist's own field.
        return normalize_policy_document(document)
    except PolicyError as exc:
        field = exc.field
        if field is not None and field.startswith("digests"):
            field = "hashes" + field[len("digests") :]
        raise PolicyError(exc.message, code=exc.code, field=field) from None
