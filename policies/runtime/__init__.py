"""Runtime (IMA) policies in Keylime's format version 1: load, validate, compile, evaluate.

Public API::

    load_runtime_policy(unverified_document: bytes | str, *, cache: PolicyCache | None = None)
        -> RuntimePolicy
    cached_runtime_policy(content_hash: str, *, cache: PolicyCache | None = None)
        -> RuntimePolicy | None
    load_runtime_policy_file(unverified_data: bytes, *, public_key_pem: bytes | None = None,
                             cache: PolicyCache | None = None) -> RuntimePolicy
    parse_runtime_policy(unverified_document: bytes | str | Mapping[str, Any]) -> RuntimePolicy
    evaluate(entries, policy, *, allow_violations=False, boot_aggregates=None,
             keyring_state=EMPTY_KEYRING_STATE) -> list[Finding]
    evaluate_incremental(...) -> RuntimeEvaluation   # findings and the next KeyringState
    import_allowlist(unverified_text: str, *, excludes: str | None = None) -> dict[str, Any]
    parse_exclude_list(unverified_text: str) -> list[str]

Finding codes of ``evaluate`` (ERROR unless noted): ``ima-digest-not-allowed``,
``ima-path-not-in-policy``, ``ima-signature-invalid`` (WARNING when the digest is listed),
``ima-signature-key-unknown``, ``ima-buf-not-allowed``, ``ima-buf-digest-mismatch``,
``ima-keyring-key-not-allowed``, ``ima-keyring-key-unsupported``, ``ima-violation`` (WARNING
with ``allow_violations``), ``ima-boot-aggregate-mismatch`` and ``ima-template-unsupported``.
Each finding's context names the entry ``index``, ``path``, ``digest`` and ``template``.
"""

from policies.runtime.compiled import (
    DEFAULT_POLICY_CACHE,
    PolicyCache,
    RuntimePolicy,
    cached_runtime_policy,
    load_runtime_policy,
    load_runtime_policy_file,
    parse_runtime_policy,
)
from policies.runtime.document import empty_policy_document, normalize_policy_document
from policies.runtime.evaluate import RuntimeEvaluation, evaluate, evaluate_incremental
from policies.runtime.keyrings import EMPTY_KEYRING_STATE, KeyringState, LearnedKey
from policies.runtime.legacy import import_allowlist, parse_exclude_list

__all__ = [
    "DEFAULT_POLICY_CACHE",
    "EMPTY_KEYRING_STATE",
    "KeyringState",
    "LearnedKey",
    "PolicyCache",
    "RuntimeEvaluation",
    "RuntimePolicy",
    "cached_runtime_policy",
    "empty_policy_document",
    "evaluate",
    "evaluate_incremental",
    "import_allowlist",
    "load_runtime_policy",
    "load_runtime_policy_file",
    "normalize_policy_document",
    "parse_exclude_list",
    "parse_runtime_policy",
]
