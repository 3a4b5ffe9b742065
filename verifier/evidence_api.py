"""Stateless evidence check: ``POST /v1/evidence:verify``.

The body carries everything the check needs, and the response is the verdict and the
findings of ``verifier.engine.verify``, the function the poller and push mode call. Nothing is written
to the database; only stored policies named in the request are read.

Request fields (JSON object):

- ``ak_tpm`` (required): base64 ``TPM2B_PUBLIC`` of the AK that signed the quote.
- ``ek_tpm``: base64 ``TPM2B_PUBLIC`` of the EK. With it the quote's qualifiedSigner must be
  the AK's qualified name under that EK; without it that check is skipped with a warning.
- ``nonce`` (required): the qualifying data sent to the device, 1 to 64 ASCII letters and
  digits, as in Keylime's quote request.
- ``mask``: hexadecimal PCR mask that was requested, such as ``0x10400``; PCR 16 is always
  added. Default: the PCRs the policies need, as the poller requests them.
- ``quote``, ``hash_alg``, ``ima_measurement_list``, ``ima_measurement_list_entry`` (0 or
  absent), ``mb_measurement_list``: as a Keylime agent returns them.
- ``policies``: ``{"runtime": P, "measured_boot": P, "pcr": P}``, each optional, where P is the
  name of a stored policy (its latest version applies) or a policy document inline.
- ``device_id``: a label for the verdict; default ``-``.

The response is 200 with ``{"verdict": {...}, "findings": [...]}`` whatever the verdict. A
malformed field is 400 with the field's name in ``error.field``.

There is no previous state: the quote is the device's first as far as this check knows, so
counters of earlier quotes are not compared, the IMA list must start at entry 0, and
freshness rests on the caller's nonce alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from flask import Blueprint, Flask, Response, jsonify
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.context import AppServices, services
from edgetrust.settings import Settings
from edgetrust.web import RequestError, json_body, require_b64, require_int, require_str
from evidence.errors import EvidenceError
from evidence.tpm import PublicArea, ak_qualified_name, parse_tpm2b_public
from policies.errors import PolicyError
from policies.measured_boot import MeasuredBootPolicy
from policies.pcr import PcrPolicy
from policies.runtime import RuntimePolicy, parse_runtime_policy
from verifier import policy_store
from verifier.engine import (
    KEYLIME_AGENT_PCR,
    Challenge,
    EngineOptions,
    Enrollment,
    Evidence,
    Loaded,
    PolicySet,
    VerificationResult,
    requested_pcrs,
    verify,
)
from verifier.errors import VerifierError
from verifier.poller import utc_now
from verifier.verdicts import AppliedPolicy

_EXTENSION_KEY: Final = "evidence-verify"
_NONCE: Final = re.compile(r"[A-Za-z0-9]{1,64}")
_MASK: Final = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,6})")
PCR_COUNT: Final = 24
UNNAMED_DEVICE: Final = "-"
# Request keys under "policies", with each one's policy kind and compiled type.
_POLICY_KINDS: Final[dict[str, tuple[str, type[Any]]]] = {
    "runtime": ("runtime", RuntimePolicy),
    "measured_boot": ("measured-boot", MeasuredBootPolicy),
    "pcr": ("pcr", PcrPolicy),
}
# Name and version in the verdict of a policy sent inline rather than stored.
INLINE_POLICY_NAME: Final = "inline"
INLINE_POLICY_VERSION: Final = 0

PolicyT = TypeVar("PolicyT")

blueprint = Blueprint("evidence_verify", __name__)


def engine_options(settings: Settings) -> EngineOptions:
    """Return the engine options that the verifier settings choose."""
    return EngineOptions(
        accepted_banks=tuple(settings.verifier_accepted_banks),
        verdict_lifetime_intervals=settings.verifier_verdict_lifetime_intervals,
        allow_ima_violations=settings.verifier_allow_ima_violations,
        allow_zero_boot_aggregate=settings.verifier_allow_zero_boot_aggregate,
    )


# --- Parsing -----------------------------------------------------------------------------------


def parse_quote_response(unverified: Mapping[str, Any]) -> Evidence:
    """Return the Keylime quote response fields of a request body, checked for form only."""
    quote = require_str(unverified, "quote")
    hash_alg = require_str(unverified, "hash_alg")
    assert quote is not None and hash_alg is not None  # required fields
    return Evidence(
        quote=quote,
        hash_alg=hash_alg,
        ima_measurement_list=require_str(unverified, "ima_measurement_list", optional=True),
        ima_start_index=require_int(unverified, "ima_measurement_list_entry", optional=True, minimum=0) or 0,
        mb_measurement_list=require_b64(unverified, "mb_measurement_list", optional=True),
        boottime=require_int(unverified, "boottime", optional=True, minimum=0),
    )


def parse_nonce(unverified: Mapping[str, Any]) -> bytes:
    nonce = require_str(unverified, "nonce") or ""
    if not _NONCE.fullmatch(nonce):
        raise RequestError("invalid-field", f"field 'nonce' is {nonce[:80]!r}; expected 1 to 64 ASCII "
                           "letters and digits", field="nonce")
    return nonce.encode("ascii")


def parse_mask(unverified: Mapping[str, Any]) -> frozenset[int] | None:
    """Return the PCRs of the ``mask`` field with PCR 16, or None when the field is absent."""
    text = require_str(unverified, "mask", optional=True)
    if text is None:
        return None
    match = _MASK.fullmatch(text)
    if not match or int(match.group(1), 16) >> PCR_COUNT:
        raise RequestError("invalid-field", f"field 'mask' is {text[:40]!r}; expected a hexadecimal "
                           f"bitmask of PCRs 0-{PCR_COUNT - 1}, such as 0x10400", field="mask")
    bits = int(match.group(1), 16)
    return frozenset({KEYLIME_AGENT_PCR, *(index for index in range(PCR_COUNT) if bits >> index & 1)})


def parse_enrollment(unverified: Mapping[str, Any], device_id: str) -> Enrollment:
    """Return the AK (and the qualified name under the EK, when given) of the request."""
    ak_bytes = require_b64(unverified, "ak_tpm")
    assert ak_bytes is not None  # a required field
    ak = _public_area(ak_bytes, "ak_tpm")
    ek_bytes = require_b64(unverified, "ek_tpm", optional=True)
    qualified_name = None
    if ek_bytes is not None:
        qualified_name = ak_qualified_name(_public_area(ek_bytes, "ek_tpm"), ak)
    return Enrollment(device_id, ak, qualified_name)


def _public_area(data: bytes, field: str) -> PublicArea:
    try:
        return parse_tpm2b_public(data)
    except EvidenceError as error:
        raise RequestError("invalid-field", f"field {field!r} is not a TPM2B_PUBLIC: {error.message}",
                           field=field) from None


def parse_device_label(unverified: Mapping[str, Any]) -> str:
    label = require_str(unverified, "device_id", optional=True)
    if label is None:
        return UNNAMED_DEVICE
    if not 1 <= len(label) <= 255:
        raise RequestError("invalid-field", "field 'device_id' must have 1 to 255 characters",
                           field="device_id")
    return label


def policy_fields(unverified: Mapping[str, Any]) -> dict[str, str | dict[str, Any]]:
    """Return the entries of the ``policies`` field: each a stored policy's name or a document."""
    value = unverified.get("policies")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError("invalid-field", "field 'policies' must be an object with the keys "
                           "runtime, measured_boot and pcr", field="policies")
    unknown = sorted(set(value) - set(_POLICY_KINDS))
    if unknown:
        raise RequestError("invalid-field", f"field 'policies' has the unknown key {unknown[0]!r}; "
                           "use runtime, measured_boot and pcr", field=f"policies.{unknown[0]}")
    for key, entry in value.items():
        if not isinstance(entry, str | dict):
            raise RequestError("invalid-field", f"field 'policies.{key}' must be a stored policy's name "
                               "or a policy document", field=f"policies.{key}")
    return dict(value)


# --- Policies ----------------------------------------------------------------------------------


def load_policies(session: Session, entries: Mapping[str, str | dict[str, Any]]) -> PolicySet:
    """Load each policy named or sent inline; raise RequestError naming the field at fault."""
    return PolicySet(
        runtime=_load(session, entries, "runtime", RuntimePolicy),
        measured_boot=_load(session, entries, "measured_boot", MeasuredBootPolicy),
        pcr=_load(session, entries, "pcr", PcrPolicy),
    )


def _load(session: Session, entries: Mapping[str, str | dict[str, Any]], key: str,
          compiled_type: type[PolicyT]) -> Loaded[PolicyT] | None:
    entry = entries.get(key)
    if entry is None:
        return None
    kind = _POLICY_KINDS[key][0]
    field = f"policies.{key}"
    try:
        if isinstance(entry, str):
            version = policy_store.latest(session, policy_store.check_name(entry))
            applied = AppliedPolicy(version.kind, version.name, version.version, version.content_hash)
            compiled: Any = policy_store.compiled(session, version.content_hash)
        else:
            compiled = _compile_inline(kind, entry)
            applied = AppliedPolicy(kind, INLINE_POLICY_NAME, INLINE_POLICY_VERSION, compiled.content_hash)
    except policy_store.PolicyStoreError as error:
        raise RequestError(error.code, f"field {field!r}: {error.message}", field=field) from None
    except PolicyError as error:
        inner = f" at {error.field}" if error.field else ""
        raise RequestError(error.code, f"field {field!r}{inner}: {error.message}", field=field) from None
    if applied.kind != kind or not isinstance(compiled, compiled_type):
        raise RequestError("invalid-field", f"field {field!r}: policy {applied.name!r} is a "
                           f"{applied.kind} policy, expected a {kind} policy", field=field)
    return Loaded(applied, compiled)


def _compile_inline(kind: str, document: Mapping[str, Any]) -> Any:
    # Inline runtime policies skip the process-wide cache, so requests cannot fill it.
    if kind == "runtime":
        return parse_runtime_policy(document)
    return policy_store.loader_for(kind)(document)


# --- The check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceCheck:
    """A request to ``POST /v1/evidence:verify``, checked for form."""

    enrollment: Enrollment
    evidence: Evidence
    nonce: bytes
    pcrs: frozenset[int] | None
    policies: dict[str, str | dict[str, Any]]


def parse_check(unverified: Mapping[str, Any]) -> EvidenceCheck:
    """Check the form of every field; raise RequestError naming the first one at fault."""
    evidence = parse_quote_response(unverified)
    if evidence.ima_start_index != 0:
        raise RequestError("invalid-field", f"field 'ima_measurement_list_entry' is "
                           f"{evidence.ima_start_index}; a stateless check replays the IMA list from "
                           "entry 0", field="ima_measurement_list_entry")
    return EvidenceCheck(
        enrollment=parse_enrollment(unverified, parse_device_label(unverified)),
        evidence=evidence,
        nonce=parse_nonce(unverified),
        pcrs=parse_mask(unverified),
        policies=policy_fields(unverified),
    )


class EvidenceChecker:
    """Run ``engine.verify`` on evidence sent in a request, with no previous state."""

    def __init__(self, sessions: sessionmaker[Session], options: EngineOptions, poll_interval: float,
                 *, clock: Callable[[], datetime] = utc_now) -> None:
        self._sessions = sessions
        self._options = options
        self._poll_interval = poll_interval
        self.clock = clock

    def check(self, request: EvidenceCheck) -> VerificationResult:
        with self._sessions() as session:
            policies = load_policies(session, request.policies)
        now = self.clock()
        pcrs = request.pcrs if request.pcrs is not None else requested_pcrs(policies)
        challenge = Challenge(request.nonce, pcrs, 0, now)
        return verify(request.evidence, request.enrollment, policies, None, challenge=challenge, now=now,
                      poll_interval=self._poll_interval, options=self._options)


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Add ``POST /v1/evidence:verify`` to ``app``."""
    settings = app_services.settings
    app_services.extras[_EXTENSION_KEY] = EvidenceChecker(
        app_services.sessions, engine_options(settings), settings.verifier_poll_interval)
    app.register_blueprint(blueprint)
    return (VerifierError,)


@blueprint.post("/v1/evidence:verify")
def verify_evidence() -> Response:
    check = parse_check(json_body())

    checker = services().extras[_EXTENSION_KEY]
    assert isinstance(checker, EvidenceChecker)
    result = checker.check(check)

    return jsonify({"verdict": result.verdict.to_json(),
                    "findings": [finding.to_json() for finding in result.findings]})
