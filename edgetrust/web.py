"""HTTP plumbing shared by every API: request parsing, JSON errors and the Keylime envelope.

Domain packages raise their own errors with stable kebab-case codes; this module is the one
place that maps those codes to HTTP statuses. Two error shapes exist:

- edgetrust's own APIs return ``{"error": {"code", "message", "field"}}``;
- Keylime-compatible routes (``/v2.x/...``, ``/version``) answer Keylime's envelope
  ``{"code": <status>, "status": <message>, "results": {"error": {...}}}`` so that Keylime
  clients read the message where they expect it.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from evidence.errors import EvidenceError, ParseError

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server cannot act on; ``code`` decides the HTTP status."""

    def __init__(self, code: str, message: str, *, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# Codes whose HTTP status differs from their class default. Everything an unverified client
# sends that is malformed is 400; security checks that reject well-formed input are 403.
STATUS_BY_CODE: dict[str, int] = {
    "not-found": 404,
    "device-not-found": 404,
    "node-not-found": 404,
    "device-on-other-node": 409,
    "method-not-allowed": 405,
    "conflict": 409,
    "registration-in-progress": 409,
    "verifier-device-not-found": 404,
    "device-already-added": 409,
    "device-not-active": 409,
    "payload-too-large": 413,
    "unsupported-media-type": 415,
    "identity-mismatch": 403,
    "activation-failed": 403,
    "ek-certificate-missing": 403,
    "ek-certificate-untrusted": 403,
    "ek-certificate-signature-invalid": 403,
    "ek-certificate-expired": 403,
    "ek-certificate-not-yet-valid": 403,
    "ek-certificate-key-mismatch": 403,
    "ek-certificate-extension-unsupported": 403,
    "ak-attributes-invalid": 403,
    "ak-algorithm-not-allowed": 403,
    "ak-attribute-decrypt-set": 403,
    "ek-certificate-algorithm-unsupported": 403,
    "ek-not-storage-key": 403,
    "challenge-not-pending": 409,
    "unauthorized": 401,
    "forbidden": 403,
    "database-unavailable": 503,
    "policy-not-found": 404,
    "policy-exists": 409,
    "policy-kind-conflict": 409,
    "policy-in-use": 409,
    "policy-content-corrupt": 500,
    "dsse-signature-invalid": 403,
    "policy-not-signed": 403,
    "policy-signing-key-not-trusted": 403,
    "device-not-in-push-mode": 409,
    "device-paused": 409,
    "enrollment-invalid": 409,
    "push-challenge-not-found": 404,
    "push-challenge-used": 409,
    "push-challenge-expired": 410,
    "push-evidence-not-authenticated": 403,
    "policy-unavailable": 503,
    "webhook-not-found": 404,
    "webhook-exists": 409,
}


def status_for(error: Exception) -> int:
    code = getattr(error, "code", None)
    if isinstance(code, str) and code in STATUS_BY_CODE:
        return STATUS_BY_CODE[code]
    if isinstance(error, ParseError):
        return 400
    if isinstance(error, EvidenceError):
        return 403
    return 400


def is_keylime_route() -> bool:
    path = request.path
    return path.startswith("/v2.") or path.startswith("/v3") or path == "/version"


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if is_keylime_route():
        body: dict[str, Any] = {"code": status, "status": message, "results": {"error": error}}
    else:
        body = {"error": error}
    response = jsonify(body)
    response.status_code = status
    return response


def keylime_response(results: Mapping[str, Any], status: int = 200, text: str = "Success") -> Response:
    response = jsonify({"code": status, "status": text, "results": dict(results)})
    response.status_code = status
    return response


def register_error_handlers(app: Flask, domain_errors: tuple[type[Exception], ...]) -> None:
    """Return every error as JSON: domain errors with their code, anything unexpected as a 500
    after logging it with its traceback."""

    @app.errorhandler(RequestError)
    def _request_error(error: RequestError) -> Response:
        return error_response(status_for(error), error.code, error.message, error.field)

    error_classes: tuple[type[Exception], ...] = (EvidenceError, *domain_errors)
    for error_class in error_classes:
        app.register_error_handler(error_class, _domain_error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large",
                415: "unsupported-media-type"}.get(status, "http-error")
        message = error.description or error.name
        if status == 404:
            message = f"no route for {request.method} {request.path}"
        return error_response(status, code, message)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal-error",
                              "internal error; the server log has the details")


def _domain_error(error: Exception) -> Response:
    code = getattr(error, "code", "invalid-request")
    message = getattr(error, "message", str(error))
    field = getattr(error, "field", None)
    return error_response(status_for(error), code, message, field)


def json_body() -> dict[str, Any]:
    """Return the request's JSON object, or raise RequestError saying what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw:
        raise RequestError("invalid-json", "request body is empty; send a JSON object")
    try:
        data = request.get_json(force=True, silent=True)
    except RecursionError:
        raise RequestError("invalid-json", "request body nests JSON arrays or objects too deeply "
                           "to decode; send a flatter document") from None
    if data is None:
        raise RequestError("invalid-json", "request body is not valid JSON")
    if not isinstance(data, dict):
        raise RequestError(
            "invalid-json", f"request body must be a JSON object, got {type(data).__name__}"
        )
    return data


def require_str(data: Mapping[str, Any], field: str, *, optional: bool = False) -> str | None:
    value = data.get(field)
    if value is None:
        if optional:
            return None
        raise RequestError("missing-field", f"field {field!r} is required", field=field)
    if not isinstance(value, str):
        raise RequestError(
            "invalid-field", f"field {field!r} must be a string, got {type(value).__name__}",
            field=field,
        )
    return value


def require_b64(data: Mapping[str, Any], field: str, *, optional: bool = False) -> bytes | None:
    """Decode a standard base64 field strictly (no stray characters, correct padding)."""
    text = require_str(data, field, optional=optional)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            "invalid-base64", f"field {field!r} is not valid base64", field=field
        ) from None


def require_int(data: Mapping[str, Any], field: str, *, optional: bool = False,
                minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = data.get(field)
    if value is None:
        if optional:
            return None
        raise RequestError("missing-field", f"field {field!r} is required", field=field)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError("invalid-field", f"field {field!r} must be an integer", field=field)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise RequestError(
            "invalid-field", f"field {field!r} is {value}, outside {minimum}..{maximum}", field=field
        )
    return value
