"""API authentication: one ``before_request`` hook checks the bearer token against a route table.

Every request passes through :meth:`Authorizer.authorize_request`, so no view of any package
checks credentials itself. The route table :data:`ROUTE_SCOPES` maps a method and a path to
the scope it needs:

- open, because agents prove themselves with the TPM: ``GET /healthz``, ``GET /version``,
  Keylime agent registration and activation (``POST`` and ``PUT /v{version}/agents/{id}``,
  ``POST /v{version}/agents/{id}/activate``), and push-mode challenges and evidence
  (``POST /v1/push/{id}/challenge``, ``POST /v1/push/{id}/evidence``);
- ``read``: ``GET /v1/devices/{id}/verdict``, ``POST /v1/verdicts:batch``,
  ``GET /v1/verdicts/stream``, ``GET /v1/keys``, ``POST /v1/admission``, ``POST /v1/gate``;
- ``admin``: everything else, including routes that do not exist.

A request without a usable token gets 401 ``unauthorized``; a token whose scope is too small
gets 403 ``forbidden``. Unknown routes need ``admin``, so a route added later is closed until
it is listed here, and an unauthenticated client cannot tell which routes exist.

The admission webhook is called by the Kubernetes API server. When ``admission_client_cns``
lists client-certificate common names, a request whose verified client certificate has one of
them may call ``POST /v1/admission`` without a token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from flask import Flask, Response, g, request
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.context import AppServices
from edgetrust.web import error_response
from verifier.tokens import Scope, TokenError, TokenIdentity, authenticate

log = logging.getLogger(__name__)

# WSGI environ key in which mod_wsgi-style servers put the verified client certificate's CN.
CLIENT_CN_ENVIRON_KEY: Final = "SSL_CLIENT_S_DN_CN"
ADMISSION_PATH: Final = "/v1/admission"
# Any API version, so that the registrar itself rejects an agent using an unsupported one.
_AGENT_PREFIX: Final = r"/v[0-9]+(?:\.[0-9]+)?/agents/[^/]+"


@dataclass(frozen=True)
class RouteScope:
    """The scope a method and a path need; ``scope`` None means the route is open."""

    methods: frozenset[str]
    path: re.Pattern[str]
    scope: Scope | None


def _route(methods: Iterable[str], path: str, scope: Scope | None) -> RouteScope:
    return RouteScope(frozenset(methods), re.compile(path), scope)


# Paths are matched whole against the decoded request path. HEAD is checked as GET.
ROUTE_SCOPES: Final = (
    _route({"GET"}, r"/healthz", None),
    _route({"GET"}, r"/version", None),
    _route({"POST", "PUT"}, _AGENT_PREFIX + r"/?", None),
    _route({"POST"}, _AGENT_PREFIX + r"/activate/?", None),
    # Push mode: the evidence is authenticated by the quote over the challenge's nonce.
    _route({"POST"}, r"/v1/push/[^/]+/(?:challenge|evidence)", None),
    _route({"GET"}, r"/v1/devices/[^/]+/verdict", Scope.READ),
    _route({"POST"}, r"/v1/verdicts:batch", Scope.READ),
    _route({"GET"}, r"/v1/verdicts/stream", Scope.READ),
    _route({"GET"}, r"/v1/keys", Scope.READ),
    _route({"POST"}, re.escape(ADMISSION_PATH), Scope.READ),
    _route({"POST"}, r"/v1/gate", Scope.READ),
)


def required_scope(method: str, path: str) -> Scope | None:
    """Return the scope a request needs, None for an open route, admin for anything unlisted."""
    method = "GET" if method == "HEAD" else method
    for route in ROUTE_SCOPES:
        if method in route.methods and route.path.fullmatch(path):
            return route.scope
    return Scope.ADMIN


class Authorizer:
    """Check the bearer token of each request against :data:`ROUTE_SCOPES`."""

    def __init__(self, sessions: sessionmaker[Session], *, admission_client_cns: Iterable[str] = (),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._sessions = sessions
        self._admission_client_cns = frozenset(admission_client_cns)
        self._clock = clock

    def authorize_request(self) -> Response | None:
        """Return an error response for a request that may not proceed, None for one that may."""
        needed = required_scope(request.method, request.path)
        if needed is None:
            return None
        if request.path == ADMISSION_PATH and self._admission_client_allowed():
            return None

        unverified_token = _bearer_token()
        if unverified_token is None:
            return _unauthorized("this route needs an API token: send 'Authorization: Bearer <token>'",
                                 error=None)
        try:
            with self._sessions() as session:
                identity = authenticate(session, unverified_token, now=self._clock())
        except TokenError as error:
            log.info("rejected API token on %s %s: %s", request.method, request.path, error.code)
            return _unauthorized(f"{error.message}; create a token with `edgetrust token create`",
                                 error="invalid_token")

        if not identity.scope.allows(needed):
            log.info("API token %r with scope %s denied %s %s, which needs %s", identity.name,
                     identity.scope.value, request.method, request.path, needed.value)
            return _forbidden(identity, needed)
        g.api_token = identity
        return None

    def _admission_client_allowed(self) -> bool:
        # TODO: the gunicorn server of `edgetrust serve` does not terminate mutual TLS or put
        # the client certificate into the environ. Until a TLS front end that does so is set
        # up, CLIENT_CN_ENVIRON_KEY is absent and the admission route needs a read token.
        if not self._admission_client_cns:
            return False
        common_name = request.environ.get(CLIENT_CN_ENVIRON_KEY)
        return isinstance(common_name, str) and common_name in self._admission_client_cns


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Guard every route of ``app`` with API tokens, unless the setting api_auth is false."""
    settings = app_services.settings
    if not settings.api_auth:
        log.warning("API authentication is off (setting api_auth = false): every route, including "
                    "the admin routes, is open to anyone who can reach the server")
        return ()

    authorizer = Authorizer(app_services.sessions, admission_client_cns=settings.admission_client_cns)
    app.before_request(authorizer.authorize_request)
    return ()


def current_identity() -> TokenIdentity | None:
    """Return the token identity of the current request; None on open routes or without auth."""
    identity = g.get("api_token")
    return identity if isinstance(identity, TokenIdentity) else None


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _unauthorized(message: str, *, error: str | None) -> Response:
    response = error_response(401, "unauthorized", message)
    challenge = 'Bearer realm="edgetrust"'
    if error is not None:
        challenge += f', error="{error}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def _forbidden(identity: TokenIdentity, needed: Scope) -> Response:
    response = error_response(
        403, "forbidden",
        f"API token {identity.name!r} has scope {identity.scope.value}; {request.method} "
        f"{request.path} needs scope {needed.value}",
    )
    response.headers["WWW-Authenticate"] = (
        f'Bearer realm="edgetrust", error="insufficient_scope", scope="{needed.value}"'
    )
    return response
