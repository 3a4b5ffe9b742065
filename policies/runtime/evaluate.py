"""Evaluate IMA measurement list entries against a compiled runtime policy.

For each entry, in order:

1. A violation (template hash all zeros: the kernel saw a file opened for writing while it was
   measured, or a time-of-measure/time-of-use race) fails unless violations are allowed.
2. ``boot_aggregate``, when the caller passes the values recomputed from the quoted PCRs,
   must equal one of them. All zeros (no TPM at boot) passes only where the policy lists an
   all-zero digest for it or the caller allows it.
3. An entry whose path matches an exclude passes.
4. ``ima`` and ``ima-ng``: the digest must be listed for the path.
5. ``ima-sig``: a signature that verifies with a policy verification key or a learned key
   passes the entry. Without one, the digest must be listed for the path.
6. ``ima-buf`` whose buffer is a certificate or public key (named after a keyring): passes if
   the keyring is ignored, or if the digest is listed under ``keyrings[<name>]``, and then the
   key is learned for later ``ima-sig`` entries. Any other ``ima-buf`` (``kernel_version``...):
   the digest must be listed under ``ima-buf[<name>]``. An ``ima-buf`` digest must also be the
   hash of its buffer.

Each failing entry gives one ERROR finding whose context names the entry index, path and
digest. Evaluation needs no state beyond the learned keys (``KeyringState``), so a verifier
can evaluate only the entries that are new since its last attestation.

Differences from Keylime 7.14.3 (``keylime.ima.ima``), on purpose:

- An excluded keyring entry passes, but its key is not learned; Keylime learns it.
- An ``ima-buf`` entry whose digest is not the hash of its buffer fails; Keylime does not
  compare them, so a listed digest beside another certificate would teach it a foreign key.
- With recomputed boot aggregates, a ``boot_aggregate`` that differs from them fails even when
  the policy lists it; Keylime accepts either.
- A violation is reported with its own code and decided by ``allow_violations``; Keylime reads
  its ``ignore_tomtou_errors`` setting and, without a configuration file, fails the list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from evidence.findings import Finding, Severity
from evidence.ima import native
from evidence.ima.entry import ImaEntry
from policies.errors import PolicyError
from policies.imasig import (
    VerificationKey,
    parse_ima_signature,
    try_load_buffer_key,
    verify_ima_signature,
)
from policies.runtime.compiled import ReadOnlyDigestTable, RuntimePolicy, digest_allowed
from policies.runtime.keyrings import EMPTY_KEYRING_STATE, KeyringState, LearnedKey

# Finding codes.
DIGEST_NOT_ALLOWED = "ima-digest-not-allowed"
PATH_NOT_IN_POLICY = "ima-path-not-in-policy"
SIGNATURE_INVALID = "ima-signature-invalid"
SIGNATURE_KEY_UNKNOWN = "ima-signature-key-unknown"
BUF_NOT_ALLOWED = "ima-buf-not-allowed"
BUF_DIGEST_MISMATCH = "ima-buf-digest-mismatch"
KEYRING_KEY_NOT_ALLOWED = "ima-keyring-key-not-allowed"
KEYRING_KEY_UNSUPPORTED = "ima-keyring-key-unsupported"
VIOLATION = "ima-violation"
BOOT_AGGREGATE_MISMATCH = "ima-boot-aggregate-mismatch"
TEMPLATE_UNSUPPORTED = "ima-template-unsupported"

BOOT_AGGREGATE = "boot_aggregate"
ALL_KEYRINGS = "*"

_ZERO_TEMPLATE_HASHES = frozenset(bytes(size) for size in (20, 32, 48, 64))


class MeasuredEntry(Protocol):
    """The attributes of an IMA measurement list entry that evaluation reads."""

    @property
    def index(self) -> int: ...
    @property
    def template_hash(self) -> bytes: ...
    @property
    def template(self) -> str: ...
    @property
    def digest_algorithm(self) -> str: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def path(self) -> str: ...
    @property
    def signature(self) -> bytes | None: ...
    @property
    def buffer(self) -> bytes | None: ...


@dataclass(frozen=True)
class RuntimeEvaluation:
    """Findings of one evaluation and the learned keys to carry into the next one."""

    findings: list[Finding]
    keyring_state: KeyringState


def evaluate(
    entries: Iterable[MeasuredEntry],
    policy: RuntimePolicy,
    *,
    allow_violations: bool = False,
    boot_aggregates: Mapping[str, bytes] | None = None,
    allow_zero_boot_aggregate: bool = False,
    keyring_state: KeyringState = EMPTY_KEYRING_STATE,
) -> list[Finding]:
    """Evaluate entries against a runtime policy and return the findings.

    ``boot_aggregates`` maps a digest algorithm (``sha1``, ``sha256``) to the boot aggregate
    recomputed from the quoted PCRs. ``allow_zero_boot_aggregate`` accepts an all-zero
    ``boot_aggregate`` that the policy does not list. ``keyring_state`` contains the keys learned from earlier
    entries of the same boot. ``evaluate_incremental`` also returns the updated state.
    """
    return evaluate_incremental(
        entries,
        policy,
        allow_violations=allow_violations,
        boot_aggregates=boot_aggregates,
        allow_zero_boot_aggregate=allow_zero_boot_aggregate,
        keyring_state=keyring_state,
    ).findings


def evaluate_incremental(
    entries: Iterable[MeasuredEntry],
    policy: RuntimePolicy,
    *,
    allow_violations: bool = False,
    boot_aggregates: Mapping[str, bytes] | None = None,
    allow_zero_boot_aggregate: bool = False,
    keyring_state: KeyringState = EMPTY_KEYRING_STATE,
) -> RuntimeEvaluation:
    """Evaluate entries and return the findings with the keyring state after them."""
    evaluator = _Evaluator(
        policy, allow_violations, boot_aggregates, allow_zero_boot_aggregate, keyring_state
    )
    findings = evaluator.findings
    digests = policy.digests
    excluded = policy.exclude_matcher.matches
    check_boot_aggregate = boot_aggregates is not None

    accel = native.accel
    native_table = type(digests) in (dict, ReadOnlyDigestTable)
    if accel is not None and native_table and isinstance(entries, (list, tuple)):
        # The native loop skips the listed entries, and the loop below checks the rest again.
        boot_aggregate_name = BOOT_AGGREGATE if check_boot_aggregate else None
        entries = accel.unlisted_entries(
            entries, ImaEntry, digests, _ZERO_TEMPLATE_HASHES, boot_aggregate_name
        )
    for entry in entries:
        template = entry.template
        # Fast path for the bulk of a list: a file entry whose digest is listed for its path.
        if (template == "ima-ng" or template == "ima") and entry.template_hash not in _ZERO_TEMPLATE_HASHES:
            path = entry.path
            if not (check_boot_aggregate and path == BOOT_AGGREGATE):
                allowed = digests.get(path)
                if allowed is not None and (
                    allowed == entry.digest if type(allowed) is bytes else entry.digest in allowed
                ):
                    continue
                if excluded(path):
                    continue
        evaluator.check(entry)

    return RuntimeEvaluation(findings, evaluator.keyring_state())


class _Evaluator:
    """Per-call state of an evaluation: the findings so far and the keys learned so far."""

    def __init__(
        self,
        policy: RuntimePolicy,
        allow_violations: bool,
        boot_aggregates: Mapping[str, bytes] | None,
        allow_zero_boot_aggregate: bool,
        keyring_state: KeyringState,
    ) -> None:
        self.policy = policy
        self.allow_violations = allow_violations
        self.boot_aggregates = boot_aggregates
        self.allow_zero_boot_aggregate = allow_zero_boot_aggregate
        self.findings: list[Finding] = []
        self._initial_state = keyring_state
        self._learned: list[LearnedKey] = []
        self._keys_by_id: dict[int, list[VerificationKey]] = {}
        for key in policy.verification_keys:
            self._keys_by_id.setdefault(key.key_id, []).append(key)
        for learned in keyring_state.keys:
            self._keys_by_id.setdefault(learned.key.key_id, []).append(learned.key)

    def keyring_state(self) -> KeyringState:
        if not self._learned:
            return self._initial_state
        return self._initial_state.with_keys(self._learned)

    def check(self, entry: MeasuredEntry) -> None:
        """Evaluate one entry on the full path and record any finding."""
        if entry.template_hash in _ZERO_TEMPLATE_HASHES:
            self._check_violation(entry)
            return

        if self.boot_aggregates is not None and entry.path == BOOT_AGGREGATE and entry.template != "ima-buf":
            if not self.policy.exclude_matcher.matches(entry.path):
                self._check_boot_aggregate(entry)
            return

        if self.policy.exclude_matcher.matches(entry.path):
            return

        if entry.template in ("ima", "ima-ng"):
            self._check_file_digest(entry)
        elif entry.template == "ima-sig":
            self._check_signed_file(entry)
        elif entry.template == "ima-buf":
            self._check_buffer(entry)
        else:
            self._fail(entry, TEMPLATE_UNSUPPORTED, f"template {entry.template!r} is not supported")

    def _check_violation(self, entry: MeasuredEntry) -> None:
        if self.allow_violations:
            self._add(entry, VIOLATION, Severity.WARNING, "IMA violation (allowed by setting)")
        else:
            self._fail(
                entry,
                VIOLATION,
                "IMA violation: the file was measured while open for writing or changed "
                "between measurement and use",
            )

    def _check_boot_aggregate(self, entry: MeasuredEntry) -> None:
        assert self.boot_aggregates is not None
        expected = self.boot_aggregates.get(entry.digest_algorithm)
        if expected is not None and entry.digest == expected:
            return
        if not any(entry.digest) and (
            self.allow_zero_boot_aggregate
            or digest_allowed(self.policy.digests, BOOT_AGGREGATE, entry.digest)
        ):
            return
        expected_text = ", ".join(
            f"{algorithm}:{digest.hex()}" for algorithm, digest in sorted(self.boot_aggregates.items())
        )
        self._fail(
            entry,
            BOOT_AGGREGATE_MISMATCH,
            f"boot_aggregate {_digest_text(entry)} does not match the value recomputed from "
            f"the quoted PCRs ({expected_text or 'none given'})",
        )

    def _check_file_digest(self, entry: MeasuredEntry) -> None:
        listed = digest_allowed(self.policy.digests, entry.path, entry.digest)
        if listed:
            return
        self._fail_digest(entry, listed)

    def _check_signed_file(self, entry: MeasuredEntry) -> None:
        signature_failure = self._signature_failure(entry)
        if signature_failure is None:
            return

        code, reason = signature_failure
        listed = digest_allowed(self.policy.digests, entry.path, entry.digest)
        if listed:
            if code == SIGNATURE_INVALID:
                self._add(
                    entry,
                    SIGNATURE_INVALID,
                    Severity.WARNING,
                    f"{reason}; the entry passes because its digest is listed",
                )
            return

        if not code or not self._keys_by_id:
            # No signature, or no key to verify one with: the digest decides.
            self._fail_digest(entry, listed, extra={"signature": reason} if reason else None)
            return
        self._fail(
            entry,
            code,
            f"{reason}, and {_digest_problem(entry, listed)}",
            extra={"listed": _listed_state(listed)},
        )

    def _signature_failure(self, entry: MeasuredEntry) -> tuple[str, str] | None:
        """Return None if the entry's signature verifies, else a finding code and reason.

        The code is empty when the entry carries no signature.
        """
        if not entry.signature:
            return "", ""
        try:
            signature = parse_ima_signature(entry.signature)
        except PolicyError as exc:
            return SIGNATURE_INVALID, f"signature cannot be parsed: {exc.message}"

        keys = self._keys_by_id.get(signature.key_id)
        if not keys:
            return SIGNATURE_KEY_UNKNOWN, f"signature key id {signature.key_id:08x} is not a known key"

        reason = ""
        for key in keys:
            try:
                verify_ima_signature(signature, entry.digest, entry.digest_algorithm, key)
            except PolicyError as exc:
                reason = exc.message
                continue
            return None
        return SIGNATURE_INVALID, reason

    def _check_buffer(self, entry: MeasuredEntry) -> None:
        buffer = entry.buffer or b""
        if not buffer_digest_matches(entry.digest_algorithm, entry.digest, buffer):
            self._fail(
                entry,
                BUF_DIGEST_MISMATCH,
                f"buffer digest {_digest_text(entry)} is not the {entry.digest_algorithm} "
                "hash of the logged buffer",
            )
            return

        try:
            key = try_load_buffer_key(buffer)
        except PolicyError as exc:
            if not self._keyring_ignored(entry.path):
                self._fail(entry, KEYRING_KEY_UNSUPPORTED, f"key in keyring {entry.path}: {exc.message}")
            return

        if key is None:
            listed = digest_allowed(self.policy.ima_buf, entry.path, entry.digest)
            if not listed:
                self._fail(
                    entry,
                    BUF_NOT_ALLOWED,
                    f"ima-buf {entry.path} with digest {_digest_text(entry)} is not allowed: "
                    + (
                        "the name is not in the policy's ima-buf table"
                        if listed is None
                        else "the digest is not listed for it"
                    ),
                    extra={"listed": _listed_state(listed)},
                )
            return

        self._check_keyring_key(entry, key)

    def _check_keyring_key(self, entry: MeasuredEntry, key: VerificationKey) -> None:
        if self._keyring_ignored(entry.path):
            return
        listed = digest_allowed(self.policy.keyrings, entry.path, entry.digest)
        if not listed:
            self._fail(
                entry,
                KEYRING_KEY_NOT_ALLOWED,
                f"key {key.key_id:08x} measured into keyring {entry.path} with digest "
                f"{_digest_text(entry)} is not allowed: "
                + (
                    "the keyring is not in the policy"
                    if listed is None
                    else "the digest is not listed for the keyring"
                ),
                extra={"key_id": f"{key.key_id:08x}", "listed": _listed_state(listed)},
            )
            return
        self._learned.append(LearnedKey(entry.path, key))
        self._keys_by_id.setdefault(key.key_id, []).append(key)

    def _keyring_ignored(self, keyring: str) -> bool:
        ignored = self.policy.ignored_keyrings
        return ALL_KEYRINGS in ignored or keyring in ignored

    def _fail_digest(
        self, entry: MeasuredEntry, listed: bool | None, *, extra: Mapping[str, str] | None = None
    ) -> None:
        code = PATH_NOT_IN_POLICY if listed is None else DIGEST_NOT_ALLOWED
        self._fail(entry, code, _digest_problem(entry, listed), extra=extra)

    def _fail(
        self, entry: MeasuredEntry, code: str, message: str, *, extra: Mapping[str, str] | None = None
    ) -> None:
        self._add(entry, code, Severity.ERROR, message, extra=extra)

    def _add(
        self,
        entry: MeasuredEntry,
        code: str,
        severity: Severity,
        message: str,
        *,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        context: dict[str, object] = {
            "index": entry.index,
            "path": entry.path,
            "digest": _digest_text(entry),
            "template": entry.template,
        }
        if extra:
            context.update(extra)
        self.findings.append(Finding(code, severity, f"entry {entry.index}: {message}", context))


def buffer_digest_matches(algorithm: str, digest: bytes, buffer: bytes) -> bool:
    """Tell whether ``digest`` is the ``algorithm`` hash of ``buffer``.

    An algorithm that hashlib lacks counts as a mismatch: a digest that cannot be checked must
    not vouch for the buffer beside it.
    """
    try:
        return hashlib.new(algorithm, buffer).digest() == digest
    except ValueError:
        return False


def _digest_text(entry: MeasuredEntry) -> str:
    return f"{entry.digest_algorithm}:{entry.digest.hex()}"


def _digest_problem(entry: MeasuredEntry, listed: bool | None) -> str:
    if listed is None:
        return f"{entry.path} is not in the policy"
    return f"digest {_digest_text(entry)} is not allowed for {entry.path}"


def _listed_state(listed: bool | None) -> str:
    return "name-not-in-policy" if listed is None else "digest-not-listed"
