"""REST API of stored policies: upload, list, read and delete named, versioned policies.

Routes (JSON bodies; errors are ``{"error": {"code", "message", "field"}}``)::

    POST   /v1/policies/<name>             create: 201, or 409 policy-exists
    PUT    /v1/policies/<name>             new version: 201, or 200 when the content is unchanged
    GET    /v1/policies[?kind=K]           the latest version of every policy, without bodies
    GET    /v1/policies/<name>[?version=N] one version (default: the latest) with its body
    DELETE /v1/policies/<name>             every version; 409 policy-in-use while devices use it

An upload is ``{"kind": "<kind>", "policy": {...}}``, or for a signed policy
``{"kind": "<kind>", "envelope": {<DSSE envelope>}, "public_key": "<PEM>"}``. A validation
error is a 400 whose ``field`` is the JSON path of the value at fault from the request body's
top, such as ``policy.digests["/usr/bin/bash"][0]``, and nothing is stored.

Every route needs an API token with the admin scope; ``edgetrust.auth`` checks it before any
view runs.

Signed uploads are verified with the PEM public keys of the setting ``policy_signing_keys``,
which the server loads on start:

- A signed upload must verify with one of those keys, else it is rejected with 403
  ``dsse-signature-invalid`` (field ``envelope.signatures``).
- ``public_key`` may be left out. A request that sends it must send one of those keys, and
  the envelope is then verified with that key alone. Any other key is rejected with 403
  ``policy-signing-key-not-trusted`` (field ``public_key``).
- With ``policy_require_signature`` an unsigned ``policy`` is rejected with 403
  ``policy-not-signed``. Without it, unsigned policies are stored too, since every upload
  needs an admin token (unless the setting ``api_auth`` is false).

With no keys configured, the request must carry the public key to verify with, as Keylime's
verifier accepts ``runtime_policy_key``. The stored version then records which key signed it,
but such a key shows only that the policy is intact, not that its signer may set policies.
The server logs a warning about this on start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Blueprint, Flask, Response, request

from edgetrust.auth import current_identity
from edgetrust.context import AppServices, services
from edgetrust.db import transaction
from edgetrust.settings import Settings, SettingsError
from edgetrust.web import RequestError, json_body, require_str
from policies.dsse import key_id, load_public_key
from policies.errors import (
    DSSE_SIGNATURE_INVALID,
    POLICY_NOT_SIGNED,
    SIGNING_KEY_INVALID,
    PolicyError,
)
from verifier import policy_store
from verifier.policy_models import PolicyVersion
from verifier.policy_store import PolicyStoreError, SignedPolicy

log = logging.getLogger(__name__)

_EXTENSION_KEY: Final = "policies"
SIGNING_KEY_NOT_TRUSTED: Final = "policy-signing-key-not-trusted"
# Upload errors that may mean an attempt to set a policy without a trusted signature. The
# upload routes log them at WARNING.
_SIGNATURE_REJECTIONS: Final = frozenset(
    {DSSE_SIGNATURE_INVALID, POLICY_NOT_SIGNED, SIGNING_KEY_NOT_TRUSTED}
)

blueprint = Blueprint("policies", __name__)


@dataclass(frozen=True)
class PolicyApi:
    """Configuration of the policy routes beyond the database."""

    trusted_keys: tuple[bytes, ...] = ()
    """PEM public keys that may sign uploaded policies. Empty: the request names the key."""
    require_signature: bool = False
    """Whether unsigned uploads are rejected. The settings allow it only with ``trusted_keys``."""

    @cached_property
    def trusted_key_ids(self) -> dict[str, bytes]:
        """Each trusted PEM key by its DSSE key id, computed once instead of on every upload."""
        return {key_id(load_public_key(pem)): pem for pem in self.trusted_keys}


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Add the policy routes to ``app`` and return their error classes.

    Raises SettingsError when a key of ``policy_signing_keys`` cannot be loaded.
    """
    app_services.extras[_EXTENSION_KEY] = policy_api_from_settings(app_services.settings)
    app.register_blueprint(blueprint)
    return (PolicyError, PolicyStoreError)


def policy_api_from_settings(settings: Settings) -> PolicyApi:
    """Build the policy API configuration and load each key of ``policy_signing_keys``.

    Raises SettingsError, naming the file at fault, for a key that cannot be used.
    """
    keys = tuple(load_trusted_key(Path(path).expanduser()) for path in settings.policy_signing_keys)

    if settings.policy_require_signature and not keys:
        raise SettingsError("setting policy_require_signature is true but policy_signing_keys "
                            "is empty; list the PEM public keys that may sign policies")

    api = PolicyApi(trusted_keys=keys, require_signature=settings.policy_require_signature)
    if keys:
        log.info("policy uploads are verified with %d trusted key(s): %s", len(keys),
                 ", ".join(api.trusted_key_ids))
    else:
        log.warning("setting policy_signing_keys is empty: a signed policy upload is verified "
                    "with the public key sent in the same request, which shows that the policy "
                    "is intact but not who signed it")
    return api


def load_trusted_key(path: Path) -> bytes:
    """Read one key of ``policy_signing_keys`` and return it as PEM SubjectPublicKeyInfo."""
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise SettingsError(f"cannot read the policy signing key {path}: {error.strerror} "
                            "(setting policy_signing_keys)") from None

    if b"PRIVATE KEY-----" in pem:
        raise SettingsError(f"the policy signing key {path} is a private key; give its public "
                            "key, such as the output of `openssl ec -pubout` "
                            "(setting policy_signing_keys)")
    try:
        public_key = load_public_key(pem)
    except PolicyError as error:
        reason = error.message.splitlines()[0] if error.message else error.code
        raise SettingsError(f"the policy signing key {path} cannot be used: {reason} "
                            "(setting policy_signing_keys)") from None
    return _spki_pem(public_key)


def _spki_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _api() -> PolicyApi:
    api = services().extras[_EXTENSION_KEY]
    assert isinstance(api, PolicyApi)
    return api


# --- Parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A policy upload whose shape is checked; its body is validated by the store."""

    kind: str
    unverified_document: dict[str, Any]
    signed: SignedPolicy | None


def parse_upload(unverified_body: Mapping[str, Any], api: PolicyApi) -> Upload:
    """Check an upload's fields and verify its DSSE envelope if it has one.

    Raises RequestError for a malformed request or a ``public_key`` that is not trusted, and
    PolicyStoreError for an unknown kind. Raises PolicyError for an invalid ``public_key``, an
    unsigned policy that ``api`` requires to be signed, or an envelope that does not verify
    (field prefixed ``envelope``).
    """
    kind = policy_store.check_kind(require_str(unverified_body, "kind"))
    has_policy = "policy" in unverified_body
    has_envelope = "envelope" in unverified_body
    if has_policy == has_envelope:
        raise RequestError(
            "missing-field" if not has_policy else "invalid-field",
            "send the policy either as 'policy' (a JSON object) or as 'envelope' (a DSSE "
            "envelope), not both", field="policy",
        )

    if has_policy:
        if "public_key" in unverified_body:
            raise RequestError("invalid-field", "'public_key' verifies an 'envelope'; an "
                               "unsigned 'policy' has nothing to verify", field="public_key")
        if api.require_signature:
            raise PolicyError("this server stores only signed policies (setting "
                              "policy_require_signature); send the policy as 'envelope', a DSSE "
                              "envelope signed with a key of policy_signing_keys",
                              code=POLICY_NOT_SIGNED, field="policy")
        document = unverified_body["policy"]
        if not isinstance(document, dict):
            raise RequestError("invalid-field", "'policy' must be a JSON object", field="policy")
        return Upload(kind, document, None)

    envelope = unverified_body["envelope"]
    if not isinstance(envelope, dict):
        raise RequestError("invalid-field", "'envelope' must be a DSSE envelope object",
                           field="envelope")
    keys = _verification_keys(unverified_body, api)
    try:
        signed = policy_store.verify_signed_policy(envelope, keys)
    except PolicyError as error:
        if error.code == DSSE_SIGNATURE_INVALID and api.trusted_keys:
            error = PolicyError(f"{error.message}; sign the policy with a key of the server's "
                                "setting policy_signing_keys", code=error.code, field=error.field)
        raise _in_field("envelope", error) from None
    return Upload(kind, signed.document, signed)


def _verification_keys(unverified_body: Mapping[str, Any], api: PolicyApi) -> tuple[bytes, ...]:
    """Return the PEM keys to verify an envelope with.

    That is the request's ``public_key`` if it is given (and trusted, when the server has
    trusted keys), else every trusted key.
    """
    unverified_pem = require_str(unverified_body, "public_key", optional=True)
    if unverified_pem is None:
        if api.trusted_keys:
            return api.trusted_keys
        raise RequestError("missing-field", "a signed policy needs 'public_key', the PEM public "
                           "key to verify its envelope with", field="public_key")

    try:
        public_key = load_public_key(unverified_pem.encode("utf-8"))
    except UnicodeEncodeError:
        raise PolicyError("public key is not a PEM public key: it contains a lone surrogate",
                          code=SIGNING_KEY_INVALID, field="public_key") from None
    except PolicyError as error:
        raise PolicyError(error.message, code=SIGNING_KEY_INVALID, field="public_key") from None
    if not api.trusted_keys:
        return (_spki_pem(public_key),)

    request_key_id = key_id(public_key)
    trusted = api.trusted_key_ids.get(request_key_id)
    if trusted is None:
        raise RequestError(
            SIGNING_KEY_NOT_TRUSTED,
            f"public key {request_key_id} is not one of the {len(api.trusted_keys)} keys "
            "of the server's setting policy_signing_keys; sign the policy with one of them, or "
            "leave out 'public_key' to verify with all of them", field="public_key",
        )
    return (trusted,)


def _in_field(prefix: str, error: PolicyError) -> PolicyError:
    """Return ``error`` with its field given from the top of the request body."""
    if error.field is None:
        field = prefix
    elif error.field.startswith("["):
        field = prefix + error.field
    else:
        field = f"{prefix}.{error.field}"
    return PolicyError(error.message, code=error.code, field=field)


def parse_version(unverified: str | None) -> int | None:
    if unverified is None:
        return None
    if not unverified.isascii() or not unverified.isdigit() or int(unverified) < 1:
        raise RequestError("invalid-field", f"version must be a positive integer, got "
                           f"{unverified[:40]!r}", field="version")
    return int(unverified)


# --- Responses --------------------------------------------------------------------------------


def version_summary(version: PolicyVersion) -> dict[str, Any]:
    return {
        "name": version.name,
        "kind": version.kind,
        "version": version.version,
        "content_hash": version.content_hash,
        "created_at": _utc(version.created_at).isoformat(),
        "signed_by": version.signed_by,
    }


def _utc(moment: datetime) -> datetime:
    # SQLite returns stored times without their offset; the store writes them in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _json_response(document: Mapping[str, Any], status: int) -> Response:
    return Response(json.dumps(document), status=status, mimetype="application/json")


# --- Routes -----------------------------------------------------------------------------------

@blueprint.post("/v1/policies/<name>")
def create_policy(name: str) -> Response:
    return _store(name, expect="new")


@blueprint.put("/v1/policies/<name>")
def update_policy(name: str) -> Response:
    return _store(name, expect="existing")


def _store(name: str, *, expect: Any) -> Response:
    try:
        upload = parse_upload(json_body(), _api())
    except (PolicyError, RequestError) as error:
        if error.code in _SIGNATURE_REJECTIONS:
            identity = current_identity()
            log.warning("rejected the upload of policy %r by token %s: %s: %s", name[:80],
                        identity.name if identity else "(none)", error.code, error.message)
        raise

    try:
        with transaction(services().sessions) as session:
            stored = policy_store.store_policy(
                session, name, upload.kind, upload.unverified_document,
                envelope=upload.signed, expect=expect,
            )
    except PolicyError as error:
        raise _in_field("envelope.payload" if upload.signed else "policy", error) from None

    body = {**version_summary(stored.version), "created": stored.created}
    return _json_response(body, 201 if stored.created else 200)


@blueprint.get("/v1/policies")
def list_policies() -> Response:
    kind = request.args.get("kind")

    with services().sessions() as session:
        versions = policy_store.list(session, kind=kind)

    return _json_response({"policies": [version_summary(v) for v in versions]}, 200)


@blueprint.get("/v1/policies/<name>")
def get_policy(name: str) -> Response:
    number = parse_version(request.args.get("version"))

    with services().sessions() as session:
        if number is None:
            version = policy_store.latest(session, name)
        else:
            version = policy_store.get(session, name, number)
        body = policy_store.content(session, version.content_hash).body

    # The stored body is canonical JSON already; splice it in rather than decoding it.
    summary = version_summary(version)
    if version.envelope is not None:
        summary["envelope"] = version.envelope
    text = json.dumps(summary)[:-1] + ', "policy": ' + body.decode() + "}"
    return Response(text, status=200, mimetype="application/json")


@blueprint.delete("/v1/policies/<name>")
def delete_policy(name: str) -> Response:
    with transaction(services().sessions) as session:
        count = policy_store.delete(session, name)

    return _json_response({"name": name, "deleted_versions": count}, 200)
