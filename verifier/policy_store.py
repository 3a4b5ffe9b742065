"""Stored policies: named, versioned, kept once per content hash, compiled once per process.

Public API (every function works in the caller's session and transaction)::

    put_policy(session, name, kind, unverified_body, *, envelope=None, expect=None)
        -> PolicyVersion
    store_policy(...)   # the same, returning StoredPolicy(version, created)
    latest(session, name) -> PolicyVersion              # PolicyNotFound
    get(session, name, version) -> PolicyVersion        # PolicyNotFound
    list(session, *, kind=None) -> list[PolicyVersion]  # the latest version of each name
    versions(session, name) -> list[PolicyVersion]
    delete(session, name) -> int                        # PolicyNotFound, PolicyInUse
    content(session, content_hash) -> PolicyContent
    compiled(session, content_hash) -> CompiledPolicy   # process-wide cache by content hash
    verify_signed_policy(unverified_envelope, public_keys) -> SignedPolicy
    register_usage_check(check)

Uploading content that equals the latest version's content returns that version. Any other
content, an earlier version's included, becomes version ``latest + 1``. Versions are numbered
without gaps even under concurrent uploads of one name: a writer locks the name's row in
``policies`` before it reads the latest version.

A device refers to a policy by name, and the verifier loads the latest version at each
attestation. An update therefore reaches every device at its next attestation, and the store
never touches the verifier's per-device state.

Deleting a name that devices use raises PolicyInUse (``policy-in-use``). Two mechanisms
enforce that. Each table that refers to a policy name registers a check with
``register_usage_check`` that returns the ids of the devices using a name, so the error can
list them. Such a table also has a foreign key to ``policies.name`` without ON DELETE CASCADE,
so a delete that slips past the checks fails in the database and becomes the same error.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

from sqlalchemy import delete as sql_delete
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from policies.dsse import parse_envelope, verify_envelope
from policies.errors import DSSE_SIGNATURE_INVALID, PolicyError
from policies.runtime import cached_runtime_policy, load_runtime_policy
from policies.runtime.document import parse_json_object
from verifier.policy_models import (
    POLICY_KINDS,
    POLICY_NAME_MAX_LENGTH,
    Policy,
    PolicyContent,
    PolicyVersion,
)

log = logging.getLogger(__name__)

PolicyKind = Literal["runtime", "measured-boot", "pcr", "image-signature"]

# Compiled policies kept per process, other than runtime policies, which the runtime policy
# package caches itself. A fleet uses a handful of policies, and an evicted one is compiled
# again on its next use.
DEFAULT_COMPILED_CACHE_SIZE: Final = 64

_NAME_CHARACTERS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
)


# --- Errors -----------------------------------------------------------------------------------


class PolicyStoreError(Exception):
    """Base of the errors of the policy store; ``code`` is stable kebab-case."""

    default_code = "policy-store-error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field


class InvalidPolicyName(PolicyStoreError):
    """A name that is not 1-255 characters of letters, digits, '.', '_' and '-'."""

    default_code = "invalid-policy-name"


class UnknownPolicyKind(PolicyStoreError):
    """A kind other than runtime, measured-boot, pcr and image-signature."""

    default_code = "policy-kind-invalid"


class PolicyNotFound(PolicyStoreError):
    """No policy, or no such version of it, is stored under the name."""

    default_code = "policy-not-found"


class PolicyExists(PolicyStoreError):
    """A create request for a name that is already stored."""

    default_code = "policy-exists"


class PolicyKindConflict(PolicyStoreError):
    """An upload whose kind differs from the kind the name was created with."""

    default_code = "policy-kind-conflict"


class PolicyInUse(PolicyStoreError):
    """A delete of a name that devices still use."""

    default_code = "policy-in-use"

    def __init__(self, message: str, *, device_ids: Sequence[str] = ()):
        super().__init__(message)
        self.device_ids = tuple(device_ids)


class PolicyContentCorrupt(PolicyStoreError):
    """A stored body whose SHA-256 differs from the content hash it is stored under."""

    default_code = "policy-content-corrupt"


# --- Kinds ------------------------------------------------------------------------------------


class CompiledPolicy(Protocol):
    """A validated, immutable policy of any kind, as its loader returns it."""

    @property
    def content_hash(self) -> str: ...

    def canonical_json(self) -> bytes: ...


PolicyLoader = Callable[[Mapping[str, Any]], CompiledPolicy]


def loader_for(kind: str) -> PolicyLoader:
    """Return the function that validates and compiles a decoded policy of ``kind``."""
    # Imported here so that loading the store does not load every policy kind's module.
    if kind == "runtime":
        from policies.runtime import parse_runtime_policy

        return parse_runtime_policy
    if kind == "measured-boot":
        from policies.measured_boot import parse_measured_boot_policy

        return parse_measured_boot_policy
    if kind == "pcr":
        from policies.pcr import parse_pcr_policy

        return parse_pcr_policy
    if kind == "image-signature":
        from policies.image_signature import parse_image_signature_policy

        return parse_image_signature_policy
    raise UnknownPolicyKind(
        f"policy kind {kind!r} is not one of {', '.join(POLICY_KINDS)}", field="kind"
    )


def check_kind(unverified_kind: object) -> PolicyKind:
    """Return ``unverified_kind`` if it names a policy kind, else raise UnknownPolicyKind."""
    if not isinstance(unverified_kind, str) or unverified_kind not in POLICY_KINDS:
        raise UnknownPolicyKind(
            f"policy kind {unverified_kind!r} is not one of {', '.join(POLICY_KINDS)}",
            field="kind",
        )
    return unverified_kind  # type: ignore[return-value] # checked against POLICY_KINDS above


def check_name(unverified_name: str) -> str:
    """Return ``unverified_name`` if it is a valid policy name, else raise InvalidPolicyName."""
    if not 1 <= len(unverified_name) <= POLICY_NAME_MAX_LENGTH or not _NAME_CHARACTERS.issuperset(
        unverified_name
    ):
        raise InvalidPolicyName(
            f"policy name {unverified_name[:80]!r} is invalid; use 1-{POLICY_NAME_MAX_LENGTH} "
            "letters, digits, '.', '_' or '-'",
            field="name",
        )
    return unverified_name


# --- Signed uploads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedPolicy:
    """A policy taken from a DSSE envelope whose signature verified with a known key."""

    document: dict[str, Any]
    """The envelope's payload, decoded as a JSON object."""
    envelope: dict[str, Any]
    """The envelope as uploaded."""
    keyid: str
    """SHA-256 hex of the PEM public key whose signature verified."""


def verify_signed_policy(
    unverified_envelope: Mapping[str, Any], public_keys: Sequence[bytes]
) -> SignedPolicy:
    """Verify a DSSE envelope with any of ``public_keys`` (PEM) and decode its payload.

    Raises PolicyError: ``dsse-envelope-invalid`` for a malformed envelope,
    ``dsse-signature-invalid`` when no key verifies a signature, ``policy-not-json`` when the
    payload is not a JSON object.
    """
    envelope = parse_envelope(unverified_envelope)
    if not public_keys:
        raise PolicyError(
            "no public key to verify the DSSE envelope with", code=DSSE_SIGNATURE_INVALID,
            field="signatures",
        )

    verified = None
    for public_key in public_keys:
        try:
            verified = verify_envelope(unverified_envelope, public_key)
        except PolicyError as error:
            if error.code != DSSE_SIGNATURE_INVALID:
                raise
            continue
        break
    if verified is None:
        raise PolicyError(
            f"no signature of the DSSE envelope verifies with any of the {len(public_keys)} "
            f"trusted key(s) ({len(envelope.signatures)} signature(s) tried)",
            code=DSSE_SIGNATURE_INVALID,
            field="signatures",
        )

    document = parse_json_object(verified.payload, what="DSSE payload")
    return SignedPolicy(document=document, envelope=dict(unverified_envelope), keyid=verified.keyid)


# --- Writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredPolicy:
    """The version an upload resulted in, and whether the upload created it."""

    version: PolicyVersion
    created: bool


# Functions that return the ids of the devices that use a policy name; see register_usage_check.
UsageCheck = Callable[[Session, str], Sequence[str]]
_usage_checks: builtins.list[UsageCheck] = []


def register_usage_check(check: UsageCheck) -> None:
    """Add a function that ``delete`` calls to find the devices that use a policy name.

    A module whose table refers to policy names registers one when it is imported.
    """
    if check not in _usage_checks:
        _usage_checks.append(check)


def put_policy(
    session: Session,
    name: str,
    kind: str,
    unverified_body: Mapping[str, Any],
    *,
    envelope: SignedPolicy | None = None,
    expect: Literal["new", "existing"] | None = None,
) -> PolicyVersion:
    """Validate a policy and store it as the next version of ``name``; see ``store_policy``."""
    return store_policy(
        session, name, kind, unverified_body, envelope=envelope, expect=expect
    ).version


def store_policy(
    session: Session,
    name: str,
    kind: str,
    unverified_body: Mapping[str, Any],
    *,
    envelope: SignedPolicy | None = None,
    expect: Literal["new", "existing"] | None = None,
) -> StoredPolicy:
    """Validate a policy and store it as the next version of ``name``.

    Steps:

    1. Check the name and kind, then validate and compile the body with the kind's loader.
       Nothing is written unless the whole body is valid.
    2. Store the canonical body under its content hash unless it is stored already.
    3. Lock the name's row, creating it for a new name. ``expect="new"`` rejects a stored
       name and ``expect="existing"`` a missing one.
    4. Return the latest version unchanged if its content and signer are the same.
    5. Else add version ``latest + 1``.

    With ``envelope`` the body must be the envelope's verified payload; the version records
    the envelope and the key id that verified it. Raises PolicyError for an invalid body and
    PolicyStoreError (InvalidPolicyName, UnknownPolicyKind, PolicyExists, PolicyNotFound,
    PolicyKindConflict). On an error the caller must roll back the transaction.
    """
    name = check_name(name)
    kind = check_kind(kind)
    if envelope is not None and envelope.document != unverified_body:
        raise ValueError("the policy body must be the payload of the envelope given with it")
    policy = loader_for(kind)(unverified_body)
    content_hash = policy.content_hash
    body = policy.canonical_json()
    if hashlib.sha256(body).hexdigest() != content_hash:
        raise AssertionError(f"the {kind} loader's content hash is not the SHA-256 of its JSON")
    now = datetime.now(UTC)

    _insert_content(session, content_hash, kind, body, now)

    row = _lock_name(session, name, kind, now, expect)

    newest = _latest_version(session, name)
    signed_by = None if envelope is None else envelope.keyid
    if newest is not None and newest.content_hash == content_hash and newest.signed_by == signed_by:
        return StoredPolicy(newest, created=False)

    row.latest_version += 1
    row.updated_at = now
    version = PolicyVersion(
        name=name,
        kind=kind,
        version=row.latest_version,
        content_hash=content_hash,
        created_at=now,
        envelope=None if envelope is None else envelope.envelope,
        signed_by=signed_by,
    )
    session.add(version)
    session.flush()
    log.info("stored policy %s version %d (%s, content %s)", name, version.version, kind,
             content_hash)
    return StoredPolicy(version, created=True)


def _insert_content(session: Session, content_hash: str, kind: str, body: bytes,
                    now: datetime) -> None:
    values = {"content_hash": content_hash, "kind": kind, "body": body, "created_at": now}
    _insert_ignoring_duplicates(session, PolicyContent, values)

    stored_kind = session.scalar(
        select(PolicyContent.kind).where(PolicyContent.content_hash == content_hash)
    )
    if stored_kind != kind:
        raise PolicyKindConflict(
            f"the same content is stored as a {stored_kind} policy, not as {kind}", field="kind"
        )


def _lock_name(session: Session, name: str, kind: str, now: datetime,
               expect: Literal["new", "existing"] | None) -> Policy:
    """Lock the row of ``name`` for this transaction, creating it if allowed.

    On PostgreSQL, SELECT ... FOR UPDATE holds the row lock, and a concurrent insert of the
    same new name waits for this transaction and then inserts nothing. On SQLite, the insert
    statement takes the database's write lock, which it holds until the transaction ends.
    """
    if expect != "existing":
        values = {"name": name, "kind": kind, "latest_version": 0, "created_at": now,
                  "updated_at": now}
        inserted = _insert_ignoring_duplicates(session, Policy, values)
        if expect == "new" and not inserted:
            raise PolicyExists(
                f"policy {name!r} already exists; upload a new version with PUT", field="name"
            )
    else:
        # A write that changes nothing, to take the write lock on SQLite before reading.
        session.execute(update(Policy).where(Policy.name == name).values(kind=Policy.kind))

    row = session.scalars(
        select(Policy).where(Policy.name == name).with_for_update().execution_options(
            populate_existing=True
        )
    ).one_or_none()
    if row is None:
        raise PolicyNotFound(f"policy {name!r} not found; create it with POST first",
                             field="name")
    if row.kind != kind:
        raise PolicyKindConflict(
            f"policy {name!r} is a {row.kind} policy; an upload of kind {kind} cannot be a "
            "version of it", field="kind",
        )
    return row


def _insert_ignoring_duplicates(session: Session, table: type[Policy] | type[PolicyContent],
                                values: Mapping[str, Any]) -> bool:
    """Insert a row unless its primary key exists. Returns whether a row was inserted."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = postgresql_insert(table).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(table).values(**values).on_conflict_do_nothing()
    else:
        raise NotImplementedError(f"the policy store supports SQLite and PostgreSQL, not {dialect}")
    key = table.__mapper__.primary_key[0]
    inserted = session.execute(statement.returning(key)).scalar_one_or_none()
    return inserted is not None


def delete(session: Session, name: str) -> int:
    """Delete every version of ``name``, and contents no other version uses.

    Returns the number of versions deleted. Raises PolicyNotFound, or PolicyInUse while a
    usage check or a foreign key reports devices that use the name.
    """
    name = check_name(name)
    session.execute(update(Policy).where(Policy.name == name).values(kind=Policy.kind))
    row = session.get(Policy, name, with_for_update=True, populate_existing=True)
    if row is None:
        raise PolicyNotFound(f"policy {name!r} not found", field="name")

    device_ids = sorted({device for check in _usage_checks for device in check(session, name)})
    if device_ids:
        first_ids = ", ".join(device_ids[:10]) + (" ..." if len(device_ids) > 10 else "")
        raise PolicyInUse(
            f"policy {name!r} is used by {len(device_ids)} device(s) ({first_ids}); assign them "
            "another policy first", device_ids=device_ids,
        )

    hashes = set(session.scalars(
        select(PolicyVersion.content_hash).where(PolicyVersion.name == name)
    ))
    count = session.execute(
        sql_delete(PolicyVersion).where(PolicyVersion.name == name)
    ).rowcount  # type: ignore[attr-defined] # CursorResult of a DELETE
    try:
        with session.begin_nested():
            session.execute(sql_delete(Policy).where(Policy.name == name))
    except IntegrityError:
        raise PolicyInUse(
            f"policy {name!r} is still referenced by another table; assign its devices "
            "another policy first"
        ) from None

    still_used = set(session.scalars(
        select(PolicyVersion.content_hash).where(PolicyVersion.content_hash.in_(hashes))
    ))
    orphans = hashes - still_used
    if orphans:
        session.execute(sql_delete(PolicyContent).where(PolicyContent.content_hash.in_(orphans)))
    session.expunge(row)
    log.info("deleted policy %s (%d versions, %d contents no longer used)", name, count,
             len(orphans))
    return int(count)


# --- Reading ----------------------------------------------------------------------------------


def latest(session: Session, name: str) -> PolicyVersion:
    """Return the newest version of ``name``. Raises PolicyNotFound."""
    version = _latest_version(session, check_name(name))
    if version is None:
        raise PolicyNotFound(f"policy {name!r} not found", field="name")
    return version


def get(session: Session, name: str, version: int) -> PolicyVersion:
    """Return version ``version`` of ``name``. Raises PolicyNotFound."""
    found = session.scalars(
        select(PolicyVersion).where(
            PolicyVersion.name == check_name(name), PolicyVersion.version == version
        )
    ).one_or_none()
    if found is None:
        raise PolicyNotFound(f"policy {name!r} has no version {version}", field="version")
    return found


def list(session: Session, *, kind: str | None = None) -> builtins.list[PolicyVersion]:
    """Return the latest version of every stored name, ordered by name."""
    query = (
        select(PolicyVersion)
        .join(Policy, (Policy.name == PolicyVersion.name)
              & (Policy.latest_version == PolicyVersion.version))
        .order_by(PolicyVersion.name)
    )
    if kind is not None:
        query = query.where(PolicyVersion.kind == check_kind(kind))
    return builtins.list(session.scalars(query))


def versions(session: Session, name: str) -> builtins.list[PolicyVersion]:
    """Return every version of ``name``, oldest first. Raises PolicyNotFound."""
    found = builtins.list(session.scalars(
        select(PolicyVersion).where(PolicyVersion.name == check_name(name))
        .order_by(PolicyVersion.version)
    ))
    if not found:
        raise PolicyNotFound(f"policy {name!r} not found", field="name")
    return found


def content(session: Session, content_hash: str) -> PolicyContent:
    """Return the stored body with this content hash. Raises PolicyNotFound."""
    found = session.get(PolicyContent, content_hash)
    if found is None:
        raise PolicyNotFound(f"no policy content with hash {content_hash}")
    return found


def _latest_version(session: Session, name: str) -> PolicyVersion | None:
    return session.scalars(
        select(PolicyVersion).where(PolicyVersion.name == name)
        .order_by(PolicyVersion.version.desc()).limit(1)
    ).one_or_none()


# --- Compiled policies ------------------------------------------------------------------------


class CompiledPolicyCache:
    """A bounded least-recently-used map from content hash to compiled policy, thread-safe.

    Every caller that asks for one content hash gets the same object while it is cached.
    """

    def __init__(self, max_size: int = DEFAULT_COMPILED_CACHE_SIZE) -> None:
        if max_size < 1:
            raise ValueError(f"cache size must be at least 1, got {max_size}")
        self.max_size = max_size
        self._policies: OrderedDict[str, CompiledPolicy] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, content_hash: str) -> CompiledPolicy | None:
        with self._lock:
            policy = self._policies.get(content_hash)
            if policy is not None:
                self._policies.move_to_end(content_hash)
            return policy

    def insert(self, content_hash: str, policy: CompiledPolicy) -> CompiledPolicy:
        """Cache ``policy`` unless another thread cached one first; return the cached one."""
        with self._lock:
            cached = self._policies.setdefault(content_hash, policy)
            self._policies.move_to_end(content_hash)
            while len(self._policies) > self.max_size:
                self._policies.popitem(last=False)
            return cached

    def clear(self) -> None:
        with self._lock:
            self._policies.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._policies)


COMPILED_POLICIES = CompiledPolicyCache()


def compiled(session: Session, content_hash: str) -> CompiledPolicy:
    """Return the compiled policy stored under ``content_hash``, shared by every caller.

    The body is read and compiled only on a cache miss. Runtime policies live in the runtime
    policy package's cache, other kinds in ``COMPILED_POLICIES``. Raises PolicyNotFound, and
    PolicyContentCorrupt when the stored body does not hash to ``content_hash``.
    """
    cached = cached_runtime_policy(content_hash) or COMPILED_POLICIES.get(content_hash)
    if cached is not None:
        return cached

    stored = content(session, content_hash)
    if hashlib.sha256(stored.body).hexdigest() != content_hash:
        raise PolicyContentCorrupt(
            f"stored policy content {content_hash} does not hash to its key; restore it from "
            "a backup or upload the policy again"
        )

    if stored.kind == "runtime":
        return load_runtime_policy(stored.body)
    policy = loader_for(stored.kind)(parse_json_object(stored.body, what=f"{stored.kind} policy"))
    if policy.content_hash != content_hash:
        log.warning("policy content %s compiles to content hash %s; this release validates "
                    "%s policies differently from the one that stored it", content_hash,
                    policy.content_hash, stored.kind)
    return COMPILED_POLICIES.insert(content_hash, policy)
