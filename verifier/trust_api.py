"""Trust API: verdicts for many devices or nodes, a stream of verdict changes, signed verdicts.

    POST /v1/verdicts:batch              {"device_ids": [...]} or {"nodes": [...]}: current verdicts
    GET  /v1/verdicts/stream             server-sent events of verdict changes (verifier.events);
                                         ?device_ids=a,b or ?nodes=n1,n2, else every device
    GET  /v1/keys                        the JWKS with the verdict signing key
    GET  /v1/devices/{id}/verdict?format=jws   (or Accept: application/jose) the verdict as a
                                         compact JWS signed with ES256 (verifier.jws)

The single-device route belongs to ``verifier.api``. This module wraps its view, so the JSON
form stays the verifier's and the JWS signs exactly that JSON. A device or node that is
not found reads as an unknown verdict, not as an error, so a gate asking about a fleet gets an
answer for every member. Scopes are enforced by ``edgetrust.auth``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from flask import Blueprint, Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.context import AppServices, services
from edgetrust.settings import SettingsError
from edgetrust.web import RequestError, json_body
from verifier import jws
from verifier.api import parse_device_id
from verifier.events import StreamOptions, Targets, VerdictStream, current_verdicts
from verifier.nodes import NodeError, check_node_name

log = logging.getLogger(__name__)

_EXTENSION_KEY: Final = "trust"
# Endpoint of the single-device verdict view in verifier.api.
VERDICT_ENDPOINT: Final = "verifier.get_verdict"
SIGNING_KEY_FILE_NAME: Final = "jws-signing-key.pem"

blueprint = Blueprint("trust", __name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class TrustService:
    """State shared by the trust routes: sessions, the verdict signer, stream options, a clock."""

    sessions: sessionmaker[Session]
    signer: jws.VerdictSigner
    stream_options: StreamOptions
    batch_max_items: int
    clock: Callable[[], datetime] = _utc_now


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Load or generate the signing key, add the trust routes and sign the verifier's verdict view.

    Must run after ``verifier.api.install``, whose verdict view it wraps.
    """
    settings = app_services.settings
    key_path = settings.jws_signing_key or settings.data_dir / SIGNING_KEY_FILE_NAME
    try:
        signing_key = jws.load_or_create_signing_key(key_path)
    except jws.JwsError as error:
        raise SettingsError(error.message) from None
    signer = jws.VerdictSigner(signing_key, settings.jws_issuer)
    app_services.extras[_EXTENSION_KEY] = TrustService(
        sessions=app_services.sessions,
        signer=signer,
        stream_options=StreamOptions(poll_interval=settings.trust_stream_poll_interval,
                                     heartbeat=settings.trust_stream_heartbeat,
                                     max_seconds=settings.trust_stream_max_seconds),
        batch_max_items=settings.trust_batch_max_items,
    )
    app.register_blueprint(blueprint)

    verdict_view = app.view_functions.get(VERDICT_ENDPOINT)
    if verdict_view is None:
        raise RuntimeError(f"view {VERDICT_ENDPOINT} is not registered; install verifier.api first")
    app.view_functions[VERDICT_ENDPOINT] = _signable(verdict_view)
    log.info("verdict signing key %s (kid %s)", key_path, signer.kid)
    return (jws.JwsError,)


def _service() -> TrustService:
    service = services().extras[_EXTENSION_KEY]
    assert isinstance(service, TrustService)
    return service


# --- request parsing --------------------------------------------------------------------------


def parse_targets(unverified: Mapping[str, Any], max_items: int) -> Targets:
    """Check a batch body: exactly one of ``device_ids`` and ``nodes``, a list of valid names."""
    fields = [name for name in ("device_ids", "nodes") if name in unverified]
    if len(fields) != 1:
        raise RequestError("invalid-field", "send exactly one of the fields 'device_ids' and 'nodes'")
    field = fields[0]
    values = unverified[field]
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise RequestError("invalid-field", f"field {field!r} must be a list of strings", field=field)
    return _targets(field, values, max_items)


def _targets(field: str, values: list[str], max_items: int) -> Targets:
    if len(values) > max_items:
        raise RequestError("invalid-field", f"field {field!r} has {len(values)} items, more than the "
                           f"{max_items} one request may name (setting trust_batch_max_items)", field=field)
    unique = tuple(dict.fromkeys(values))
    if field == "device_ids":
        return Targets(device_ids=tuple(parse_device_id(value) for value in unique))
    try:
        return Targets(nodes=tuple(check_node_name(value) for value in unique))
    except NodeError as error:
        raise RequestError("invalid-field", error.message, field=field) from None


def parse_stream_targets(args: Mapping[str, Any], max_items: int) -> Targets:
    """Read ``device_ids`` or ``nodes`` from the query string; neither means every device."""
    given = {name: _split(args.getlist(name)) for name in ("device_ids", "nodes")  # type: ignore[attr-defined] # MultiDict
             if name in args}
    if not given:
        return Targets()
    if len(given) > 1:
        raise RequestError("invalid-field",
                           "send at most one of the query parameters 'device_ids' and 'nodes'")
    field, values = next(iter(given.items()))
    return _targets(field, values, max_items)


def _split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_last_event_id() -> int | None:
    text = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 18:
        raise RequestError("invalid-field", f"Last-Event-ID {text[:40]!r} is not a verdict-change "
                           "sequence number", field="Last-Event-ID")
    return int(text)


def wants_jws() -> bool:
    if request.args.get("format") == "jws":
        return True
    best = request.accept_mimetypes.best_match(["application/json", jws.MEDIA_TYPE])
    return best == jws.MEDIA_TYPE


# --- routes -----------------------------------------------------------------------------------


@blueprint.post("/v1/verdicts:batch")
def batch_verdicts() -> Response:
    service = _service()
    targets = parse_targets(json_body(), service.batch_max_items)

    at = service.clock()
    with service.sessions() as session:
        verdicts = current_verdicts(session, targets, at)

    return jsonify({"evaluated_at": at.isoformat(), "verdicts": verdicts})


@blueprint.get("/v1/verdicts/stream")
def stream_verdicts() -> Response:
    service = _service()
    targets = parse_stream_targets(request.args, service.batch_max_items)
    last_event_id = parse_last_event_id()

    # NOTE: the token is checked when the stream opens. A stream whose token is revoked later
    # runs on until trust_stream_max_seconds, and the reconnection is then rejected.
    stream = VerdictStream(service.sessions, targets, last_event_id=last_event_id,
                           options=service.stream_options, clock=service.clock)

    return Response(stream.events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@blueprint.get("/v1/keys")
def signing_keys() -> Response:
    return jsonify(_service().signer.jwks())


def _signable(view: Callable[..., Any]) -> Callable[..., ResponseReturnValue]:
    """Wrap the verdict view so that it returns a compact JWS of its JSON when one is requested."""

    @functools.wraps(view)
    def verdict_view(**kwargs: Any) -> ResponseReturnValue:
        if not wants_jws():
            return view(**kwargs)
        response = view(**kwargs)
        if not isinstance(response, Response) or response.status_code != 200:
            return response
        service = _service()
        token = service.signer.sign_verdict(response.get_json(), service.clock())
        return Response(token, mimetype=jws.MEDIA_TYPE, headers={"Cache-Control": "no-store"})

    return verdict_view
