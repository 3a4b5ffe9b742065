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

Signed uploads are verified with the keys the ``PolicyApi`` was built with. With none, the
request must carry the public key to verify with, as Keylime's verifier accepts
``runtime_policy_key``. The stored version then records which key signed it, but such a key
shows only that the policy is intact, not that its signer may set policies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from flask import Blueprint, Flask, Response, request

from edgetrust.context import AppServices, services
from edgetrust.db import transaction
from edgetrust.web import RequestError, json_body, require_str
from policies.errors import PolicyError
from verifier import policy_store
from verifier.policy_models import PolicyVersion
from verifier.policy_store import PolicyStoreError, SignedPolicy

log = logging.getLogger(__name__)

_EXTENSION_KEY: Final = "policies"

blueprint = Blueprint("policies", __name__)


@dataclass(frozen=True)
class PolicyApi:
    """Configuration of the policy routes beyond the database."""

    trusted_keys: tuple[bytes, ...] = ()
    """PEM public keys that may sign uploaded policies. Empty: the request names the key."""


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Add the policy routes to ``app`` and return their error classes."""
    # TODO: no setting lists the keys allowed to sign policies yet. Until one does, signed
    # uploads are verified with the public key sent in the same request.
    app_services.extras[_EXTENSION_KEY] = PolicyApi(trusted_keys=())
    app.register_blueprint(blueprint)
    return (PolicyError, PolicyStoreError)


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


def parse_upload(unverified_body: Mapping[str, Any], trusted_keys: tuple[bytes, ...]) -> Upload:
    """Check an upload's fields and verify its DSSE envelope if it has one.

    Raises RequestError for a malformed request, PolicyStoreError for an unknown kind and
    PolicyError (field prefixed ``envelope``) for an envelope that does not verify.
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
        document = unverified_body["policy"]
        if not isinstance(document, dict):
            raise RequestError("invalid-field", "'policy' must be a JSON object", field="policy")
        return Upload(kind, document, None)

    envelope = unverified_body["envelope"]
    if not isinstance(envelope, dict):
        raise RequestError("invalid-field", "'envelope' must be a DSSE envelope object",
                           field="envelope")
    keys = _verification_keys(unverified_body, trusted_keys)
    try:
        signed = policy_store.verify_signed_policy(envelope, keys)
    except PolicyError as error:
        raise _in_field("envelope", error) from None
    return Upload(kind, signed.document, signed)


def _verification_keys(unverified_body: Mapping[str, Any],
                       trusted_keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    public_key = require_str(unverified_body, "public_key", optional=True)
    if trusted_keys:
        if public_key is not None:
            raise RequestError("invalid-field", "this server verifies signed policies with its "
                               "configured keys; leave out 'public_key'", field="public_key")
        return trusted_keys
    if public_key is None:
        raise RequestError("missing-field", "a signed policy needs 'public_key', the PEM public "
                           "key to verify its envelope with", field="public_key")
    return (public_key.encode(),)


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
    upload = parse_upload(json_body(), _api().trusted_keys)

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
