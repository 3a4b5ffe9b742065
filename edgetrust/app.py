"""Flask application factory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flask import Flask, Response, jsonify
from sqlalchemy import Engine

from edgetrust import __version__
from edgetrust.context import AppServices
from edgetrust.db import make_engine, make_session_factory
from edgetrust.settings import Settings
from edgetrust.web import register_error_handlers

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024


def create_app(settings: Settings, *, engine: Engine | None = None) -> Flask:
    """Build the app. The caller checks the schema first (the ``serve`` command does)."""
    engine = engine or make_engine(settings.effective_database_url)
    app = Flask("edgetrust")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    # Keep fields in the order the views build them, as Keylime clients print them.
    app.json.sort_keys = False  # type: ignore[attr-defined] # DefaultJSONProvider has it

    services = AppServices(settings=settings, engine=engine,
                           sessions=make_session_factory(engine))
    app.extensions["edgetrust"] = services

    domain_errors: list[type[Exception]] = []
    for install in _installers():
        domain_errors.extend(install(app, services))
    register_error_handlers(app, tuple(domain_errors))

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "version": __version__})

    return app


Installer = Callable[[Flask, AppServices], Iterable[type[Exception]]]


def _installers() -> list[Installer]:
    """Return each package's ``install(app, services) -> domain error classes`` function."""
    from edgetrust.auth import install as install_auth
    from registrar.api import install as install_registrar
    from verifier.admission_api import install as install_admission
    from verifier.api import install as install_verifier
    from verifier.evidence_api import install as install_evidence_verify
    from verifier.gate_api import install as install_gate
    from verifier.nodes_api import install as install_nodes
    from verifier.notify import install as install_webhooks
    from verifier.policy_api import install as install_policies
    from verifier.push_api import install as install_push
    from verifier.trust_api import install as install_trust

    return [install_auth, install_registrar, install_policies, install_verifier, install_admission,
            install_gate, install_trust, install_nodes, install_webhooks,
            install_push, install_evidence_verify]
