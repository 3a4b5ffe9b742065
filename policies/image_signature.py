"""Image-signature policies: which cosign public keys may sign which container image repositories.

An image-signature policy is a JSON object::

    {"keys": {"donkeycar-release": "-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----\\n"},
     "rules": [{"repository": "registry.example/donkeycar/*", "keys": ["donkeycar-release"]},
               {"repository": "registry.example/tools/gate", "keys": ["donkeycar-release"]}]}

``keys`` names PEM public keys of the types cosign signs with: ECDSA on P-256, P-384 or
P-521, RSA of at least 2048 bits, and Ed25519. Each rule names a repository, which is a
registry host with an optional port and a path, without tag or digest. A rule may also name a
glob over repositories, where ``*`` matches within one path segment and ``**`` across
segments. An image may be signed by the keys of every rule
that matches its repository. A repository that no rule matches gets no key, so its images
are denied.

This module only returns which keys apply. Verifying a cosign signature with them is the
admission and gate code's work.

Public API::

    parse_image_signature_policy(unverified_document: bytes | str | Mapping[str, Any])
        -> ImageSignaturePolicy
    ImageSignaturePolicy.keys_for(repository: str) -> tuple[AllowedKey, ...]
    repository_of(image_reference: str) -> str
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from policies.errors import (
    POLICY_FIELD_INVALID,
    POLICY_FIELD_MISSING,
    POLICY_NOT_JSON,
    PolicyError,
)

# Code for a public key that cannot sign cosign signatures.
IMAGE_SIGNATURE_KEY_INVALID: Final = "image-signature-key-invalid"

CosignPublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

MIN_RSA_KEY_BITS: Final = 2048
_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

# A repository: host[:port] then one or more lowercase path components (the OCI distribution
# specification's repository name grammar), with * and ** allowed in a pattern.
_HOST: Final = r"[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?"
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY: Final = re.compile(rf"{_HOST}(?:/{_COMPONENT})+")
_PATTERN_COMPONENT: Final = r"(?:\*\*|[a-z0-9*](?:[a-z0-9._*-]*[a-z0-9*])?)"
_REPOSITORY_PATTERN: Final = re.compile(rf"(?:{_HOST}|\*)(?:/{_PATTERN_COMPONENT})+")


@dataclass(frozen=True, eq=False)
class AllowedKey:
    """A named public key that may sign images."""

    name: str
    pem: str
    """The key as PEM SubjectPublicKeyInfo, re-encoded from the policy."""
    key_id: str
    """SHA-256 hex of the DER SubjectPublicKeyInfo."""
    public_key: CosignPublicKey


@dataclass(frozen=True)
class RepositoryRule:
    """Repositories that match ``repository`` may be signed by the keys named in ``keys``."""

    repository: str
    keys: tuple[str, ...]
    matcher: re.Pattern[str]


@dataclass(frozen=True, eq=False)
class ImageSignaturePolicy:
    """A validated image-signature policy. Build it with ``parse_image_signature_policy``."""

    content_hash: str
    """SHA-256 hex of the canonical serialisation."""
    keys: Mapping[str, AllowedKey]
    rules: tuple[RepositoryRule, ...]

    def keys_for(self, repository: str) -> tuple[AllowedKey, ...]:
        """Return the keys that may sign images of ``repository``, or () to deny it.

        ``repository`` is a repository name without tag or digest (see ``repository_of``).
        """
        names: dict[str, None] = {}
        for rule in self.rules:
            if rule.matcher.fullmatch(repository):
                names.update(dict.fromkeys(rule.keys))
        return tuple(self.keys[name] for name in names)

    def to_document(self) -> dict[str, Any]:
        """Return the canonical document."""
        return {
            "keys": {name: key.pem for name, key in sorted(self.keys.items())},
            "rules": [{"repository": rule.repository, "keys": list(rule.keys)}
                      for rule in self.rules],
        }

    def canonical_json(self) -> bytes:
        """Return the canonical serialisation that ``content_hash`` is computed over."""
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True).encode()


def repository_of(image_reference: str) -> str:
    """Return the repository of an image reference, without its tag and digest.

    ``registry.example/donkeycar/car:4.5@sha256:ab...`` gives ``registry.example/donkeycar/car``.
    NOTE: Docker Hub short names (``nginx``) are not expanded to ``docker.io/library/nginx``;
    callers pass fully qualified references.
    """
    name = image_reference.split("@", 1)[0]
    last_slash = name.rfind("/")
    tag_colon = name.find(":", last_slash + 1)
    if tag_colon != -1:
        name = name[:tag_colon]
    return name


def parse_image_signature_policy(
    unverified_document: bytes | str | Mapping[str, Any],
) -> ImageSignaturePolicy:
    """Validate an image-signature policy. Raises PolicyError whose ``field`` is the JSON path
    of the value at fault, such as ``rules[1].repository``."""
    document = _decode(unverified_document)
    unknown = sorted(set(document) - {"keys", "rules"})
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r}; an image-signature policy has keys and "
                          "rules", code=POLICY_FIELD_INVALID, field=unknown[0])

    unverified_keys = _require(document, "keys", Mapping, "an object of PEM public keys by name")
    keys = {name: _parse_key(name, pem) for name, pem in unverified_keys.items()}

    unverified_rules = _require(document, "rules", list, "an array of rules")
    rules = tuple(_parse_rule(rule, f"rules[{i}]", keys) for i, rule in enumerate(unverified_rules))

    policy = ImageSignaturePolicy(content_hash="", keys=keys, rules=rules)
    return ImageSignaturePolicy(
        content_hash=hashlib.sha256(policy.canonical_json()).hexdigest(), keys=keys, rules=rules
    )


def _decode(unverified_document: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(unverified_document, Mapping):
        return unverified_document
    try:
        document = json.loads(unverified_document)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise PolicyError(f"image-signature policy is not valid JSON: {error}",
                          code=POLICY_NOT_JSON) from None
    if not isinstance(document, dict):
        raise PolicyError("image-signature policy must be a JSON object", code=POLICY_NOT_JSON)
    return document


def _require(document: Mapping[str, Any], key: str, expected: type, description: str) -> Any:
    if key not in document:
        raise PolicyError(f"{key!r} is required", code=POLICY_FIELD_MISSING, field=key)
    value = document[key]
    if not isinstance(value, expected):
        raise PolicyError(f"must be {description}", code=POLICY_FIELD_INVALID, field=key)
    return value


def _parse_key(name: str, unverified_pem: Any) -> AllowedKey:
    field = f'keys["{name}"]'
    if not name:
        raise PolicyError("a key name must not be empty", code=POLICY_FIELD_INVALID, field=field)
    if not isinstance(unverified_pem, str):
        raise PolicyError("must be a PEM public key string", code=IMAGE_SIGNATURE_KEY_INVALID,
                          field=field)
    try:
        public_key = serialization.load_pem_public_key(unverified_pem.encode())
    except (ValueError, UnsupportedAlgorithm) as error:
        raise PolicyError(f"not a PEM public key: {error}", code=IMAGE_SIGNATURE_KEY_INVALID,
                          field=field) from None

    checked = _check_key_type(public_key, field)
    der = checked.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = checked.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return AllowedKey(name=name, pem=pem, key_id=hashlib.sha256(der).hexdigest(),
                      public_key=checked)


def _check_key_type(public_key: object, field: str) -> CosignPublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _CURVES):
            raise PolicyError(f"ECDSA curve {public_key.curve.name} is not P-256, P-384 or P-521",
                              code=IMAGE_SIGNATURE_KEY_INVALID, field=field)
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_KEY_BITS:
            raise PolicyError(f"RSA key has {public_key.key_size} bits, fewer than "
                              f"{MIN_RSA_KEY_BITS}", code=IMAGE_SIGNATURE_KEY_INVALID, field=field)
        return public_key
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise PolicyError(f"{type(public_key).__name__} keys cannot sign cosign signatures; use "
                      "ECDSA, RSA or Ed25519", code=IMAGE_SIGNATURE_KEY_INVALID, field=field)


def _parse_rule(unverified: Any, field: str, keys: Mapping[str, AllowedKey]) -> RepositoryRule:
    if not isinstance(unverified, Mapping):
        raise PolicyError("must be an object with repository and keys", code=POLICY_FIELD_INVALID,
                          field=field)
    unknown = sorted(set(unverified) - {"repository", "keys"})
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r}", code=POLICY_FIELD_INVALID,
                          field=f"{field}.{unknown[0]}")

    repository = _require(unverified, "repository", str, "a repository or repository glob")
    if not _REPOSITORY_PATTERN.fullmatch(repository):
        raise PolicyError(
            f"{repository[:120]!r} is not a repository (host/path without tag or digest) or a "
            "glob of one", code=POLICY_FIELD_INVALID, field=f"{field}.repository",
        )

    names = _require(unverified, "keys", list, "an array of key names")
    if not names:
        raise PolicyError("must name at least one key", code=POLICY_FIELD_INVALID,
                          field=f"{field}.keys")
    for position, name in enumerate(names):
        if not isinstance(name, str) or name not in keys:
            raise PolicyError(f"{name!r} is not a key named in 'keys'", code=POLICY_FIELD_INVALID,
                              field=f"{field}.keys[{position}]")
    return RepositoryRule(repository, tuple(dict.fromkeys(names)), _glob_to_regex(repository))


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(".*")
        elif piece == "*":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def is_repository(name: str) -> bool:
    """Tell whether ``name`` is a repository name that ``keys_for`` can match."""
    return _REPOSITORY.fullmatch(name) is not None
