"""The compiled runtime policy: parsed once, immutable, shared by every device that uses it.

A policy of 200,000 digests takes about half a second to parse and validate, so the verifier
must not do it per attestation or hold a copy per device. ``load_runtime_policy`` returns one
``RuntimePolicy`` per content hash from a bounded, thread-safe cache; devices that share a
policy share that object.

The content hash is the SHA-256 of the policy's canonical serialisation: the normalised
document as JSON with sorted keys, no white space and ASCII escapes. Two files that differ only
in formatting, key order, digest order or duplicate digests therefore have one hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from policies.dsse import is_envelope, verify_envelope
from policies.errors import DSSE_KEY_REQUIRED, POLICY_NOT_SIGNED, PolicyError
from policies.imasig import VerificationKey
from policies.runtime.document import (
    normalize_policy_document,
    parse_json_object,
    parse_verification_keys,
)

# Digests allowed for one name: a single digest as bytes, several as a tuple. Most paths have
# one digest, and a bare bytes object takes a fifth of the memory of a one-element frozenset.
AllowedDigests: TypeAlias = bytes | tuple[bytes, ...]
DigestTable: TypeAlias = Mapping[str, AllowedDigests]

DEFAULT_CACHE_SIZE = 16


class ReadOnlyDigestTable(dict[str, AllowedDigests]):
    """A dict that refuses changes once built.

    A MappingProxyType would do the same, but its ``get`` costs several times a dict's, and
    evaluation calls ``get`` once per entry.
    """

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a compiled runtime policy cannot be changed")

    # The signatures differ from dict's on purpose: every mutator raises whatever it is given.
    __setitem__ = _read_only
    __delitem__ = _read_only
    __ior__ = _read_only  # type: ignore[assignment]
    clear = _read_only
    pop = _read_only  # type: ignore[assignment]
    popitem = _read_only  # type: ignore[assignment]
    setdefault = _read_only  # type: ignore[assignment]
    update = _read_only


class ExcludeMatcher:
    """The exclude regular expressions of a policy, matched from the start of a path.

    Excludes without groups are joined into one alternation, compiled once. An exclude with
    groups stays a pattern of its own, because joined into the alternation its
    backreferences would point at another exclude's groups.
    """

    __slots__ = ("_combined", "_separate")

    def __init__(self, excludes: tuple[str, ...]) -> None:
        simple = [pattern for pattern in excludes if re.compile(pattern).groups == 0]
        separate = [re.compile(pattern) for pattern in excludes if pattern not in simple]
        self._combined: re.Pattern[str] | None = None
        if simple:
            try:
                self._combined = re.compile("|".join(f"(?:{pattern})" for pattern in simple))
            except re.error:
                # Inline global flags such as (?i) are valid only at the start of a pattern.
                separate.extend(re.compile(pattern) for pattern in simple)
        self._separate = tuple(separate)

    def matches(self, path: str) -> bool:
        """Tell whether an exclude matches ``path`` from its start."""
        if self._combined is not None and self._combined.match(path):
            return True
        return any(pattern.match(path) for pattern in self._separate)


@dataclass(frozen=True, eq=False)
class RuntimePolicy:
    """A validated, compiled runtime policy. Build it with ``load_runtime_policy``."""

    content_hash: str
    """SHA-256 hex of the canonical serialisation."""
    generator: int
    timestamp: str | None
    release: int
    digests: DigestTable
    excludes: tuple[str, ...]
    exclude_matcher: ExcludeMatcher
    keyrings: DigestTable
    ignored_keyrings: frozenset[str]
    log_hash_alg: str
    ima_buf: DigestTable
    verification_keys: tuple[VerificationKey, ...]
    verification_keys_text: str

    def to_document(self) -> dict[str, Any]:
        """Return the canonical document: the policy as Keylime's JSON format."""
        meta: dict[str, Any] = {"version": 1, "generator": self.generator}
        if self.timestamp is not None:
            meta["timestamp"] = self.timestamp
        return {
            "meta": meta,
            "release": self.release,
            "digests": _table_to_hex(self.digests),
            "excludes": list(self.excludes),
            "keyrings": _table_to_hex(self.keyrings),
            "ima": {
                "ignored_keyrings": sorted(self.ignored_keyrings),
                "log_hash_alg": self.log_hash_alg,
                "dm_policy": None,
            },
            "ima-buf": _table_to_hex(self.ima_buf),
            "verification-keys": self.verification_keys_text,
        }

    def canonical_json(self) -> bytes:
        """Return the canonical serialisation that ``content_hash`` is computed over."""
        return canonical_json(self.to_document())


def digest_allowed(table: DigestTable, name: str, digest: bytes) -> bool | None:
    """Tell whether ``digest`` is listed for ``name``; None when ``name`` is not listed."""
    allowed = table.get(name)
    if allowed is None:
        return None
    if isinstance(allowed, bytes):
        return allowed == digest
    return digest in allowed


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Serialise a normalised document canonically: sorted keys, no white space, ASCII."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compile_policy(document: Mapping[str, Any]) -> RuntimePolicy:
    """Compile a normalised document (from ``normalize_policy_document``)."""
    meta = document["meta"]
    excludes = tuple(document["excludes"])
    return RuntimePolicy(
        content_hash=hashlib.sha256(canonical_json(document)).hexdigest(),
        generator=meta["generator"],
        timestamp=meta.get("timestamp"),
        release=document["release"],
        digests=_compile_table(document["digests"]),
        excludes=excludes,
        exclude_matcher=ExcludeMatcher(excludes),
        keyrings=_compile_table(document["keyrings"]),
        ignored_keyrings=frozenset(document["ima"]["ignored_keyrings"]),
        log_hash_alg=document["ima"]["log_hash_alg"],
        ima_buf=_compile_table(document["ima-buf"]),
        verification_keys=parse_verification_keys(document["verification-keys"]),
        verification_keys_text=document["verification-keys"],
    )


def parse_runtime_policy(unverified_document: bytes | str | Mapping[str, Any]) -> RuntimePolicy:
    """Validate and compile a runtime policy without the cache.

    Accepts JSON text or an already decoded object. A DSSE envelope is rejected here: verify
    it with ``policies.dsse.verify_envelope`` and pass the payload. Raises PolicyError.
    """
    if isinstance(unverified_document, Mapping):
        unverified_policy: Mapping[str, Any] = unverified_document
    else:
        unverified_policy = parse_json_object(unverified_document)
    if is_envelope(unverified_policy):
        raise PolicyError(
            "runtime policy is signed (a DSSE envelope); give the public key to verify it",
            code=DSSE_KEY_REQUIRED,
        )
    return compile_policy(normalize_policy_document(unverified_policy))


class PolicyCache:
    """A bounded least-recently-used cache of compiled policies, safe to share across threads.

    It maps content hashes to policies, and the SHA-256 of raw policy text to the content
    hash, so that loading text seen before costs one hash over it.
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"cache size must be at least 1, got {max_size}")
        self.max_size = max_size
        self._by_content: OrderedDict[str, RuntimePolicy] = OrderedDict()
        self._content_by_raw: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, content_hash: str) -> RuntimePolicy | None:
        """Return the policy with this content hash if it is cached."""
        with self._lock:
            policy = self._by_content.get(content_hash)
            if policy is not None:
                self._by_content.move_to_end(content_hash)
            return policy

    def load(self, unverified_document: bytes | str) -> RuntimePolicy:
        """Return the compiled policy for JSON text, compiling it only on a cache miss."""
        raw = unverified_document.encode() if isinstance(unverified_document, str) else unverified_document
        raw_hash = hashlib.sha256(raw).hexdigest()
        with self._lock:
            content_hash = self._content_by_raw.get(raw_hash)
        if content_hash is not None:
            policy = self.get(content_hash)
            if policy is not None:
                return policy

        compiled = parse_runtime_policy(raw)
        return self._insert(raw_hash, compiled)

    def _insert(self, raw_hash: str, compiled: RuntimePolicy) -> RuntimePolicy:
        with self._lock:
            # Another thread may have compiled the same content meanwhile; keep its object so
            # that every device keeps sharing one.
            policy = self._by_content.setdefault(compiled.content_hash, compiled)
            self._by_content.move_to_end(compiled.content_hash)
            self._content_by_raw[raw_hash] = compiled.content_hash
            self._content_by_raw.move_to_end(raw_hash)
            while len(self._by_content) > self.max_size:
                self._by_content.popitem(last=False)
            while len(self._content_by_raw) > 4 * self.max_size:
                self._content_by_raw.popitem(last=False)
            return policy

    def clear(self) -> None:
        with self._lock:
            self._by_content.clear()
            self._content_by_raw.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_content)


DEFAULT_POLICY_CACHE = PolicyCache()


def load_runtime_policy(
    unverified_document: bytes | str, *, cache: PolicyCache | None = None
) -> RuntimePolicy:
    """Validate and compile runtime policy JSON text once per content, through a cache.

    Uses the module's shared cache unless ``cache`` is given. Raises PolicyError.
    """
    return (DEFAULT_POLICY_CACHE if cache is None else cache).load(unverified_document)


def load_runtime_policy_file(
    unverified_data: bytes,
    *,
    public_key_pem: bytes | None = None,
    cache: PolicyCache | None = None,
) -> RuntimePolicy:
    """Load a runtime policy that may be wrapped in a DSSE envelope.

    With ``public_key_pem`` the data must be an envelope with a signature from that ECDSA
    key, and the policy is its payload. Without it the data must be a plain policy. Raises
    PolicyError: ``dsse-key-required`` for an envelope without a key, ``policy-not-signed``
    for a plain policy with a key, and the codes of ``verify_envelope`` and
    ``load_runtime_policy``.
    """
    if public_key_pem is None:
        return load_runtime_policy(unverified_data, cache=cache)

    unverified_document = parse_json_object(unverified_data)
    if not is_envelope(unverified_document):
        raise PolicyError(
            "runtime policy is not signed (not a DSSE envelope) but a key was given to verify it",
            code=POLICY_NOT_SIGNED,
        )
    verified = verify_envelope(unverified_document, public_key_pem)
    return load_runtime_policy(verified.payload, cache=cache)


def cached_runtime_policy(content_hash: str, *, cache: PolicyCache | None = None) -> RuntimePolicy | None:
    """Return the compiled policy with this content hash if the cache contains it."""
    return (DEFAULT_POLICY_CACHE if cache is None else cache).get(content_hash)


def _compile_table(table: Mapping[str, list[str]]) -> DigestTable:
    compiled: dict[str, AllowedDigests] = {}
    fromhex = bytes.fromhex
    for name, digests in table.items():
        if len(digests) == 1:
            compiled[name] = fromhex(digests[0])
        else:
            compiled[name] = tuple(fromhex(digest) for digest in digests)
    return ReadOnlyDigestTable(compiled)


def _table_to_hex(table: DigestTable) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for name, allowed in table.items():
        if isinstance(allowed, bytes):
            result[name] = [allowed.hex()]
        else:
            result[name] = [digest.hex() for digest in allowed]
    return result
