"""``POST /v1/gate``: the rollout gate for CI/CD pipelines.

Request::

    {"image": "registry.example/donkeycar/car@sha256:<digest>",
     "selector": {"device_ids": ["car-7"]} | {"nodes": ["car-7"]} | {"labels": {"fleet": "a"}},
     "min_trusted_fraction": 0.9}

The response is HTTP 200 whether or not the rollout is allowed; ``allowed`` decides. A body that
cannot be decided gets HTTP 400 with ``{"error": {"code": "gate-request-invalid", ...}}``.
"""

from __future__ import annotations

from typing import Final

from flask import Blueprint, Flask, Response, jsonify

from edgetrust.context import AppServices, services
from edgetrust.web import json_body
from verifier.admission_api import image_checker
from verifier.gate import GateRequestInvalid, RolloutGate, parse_gate_request
from verifier.registry import Deadline

_GATE_KEY: Final = "rollout-gate"

blueprint = Blueprint("gate", __name__)


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Build the rollout gate, add its route to ``app`` and return its error classes."""
    settings = app_services.settings
    app_services.extras[_GATE_KEY] = RolloutGate(
        app_services.sessions, image_checker(app_services),
        policy_name=settings.image_signature_policy, timeout=settings.gate_timeout,
    )
    app.register_blueprint(blueprint)
    return (GateRequestInvalid,)


def _gate() -> RolloutGate:
    gate = services().extras[_GATE_KEY]
    assert isinstance(gate, RolloutGate)
    return gate


@blueprint.post("/v1/gate")
def gate() -> Response:
    # edgetrust.auth has checked the API token (scope read) before this view runs.
    rollout_gate = _gate()
    deadline = Deadline.after(rollout_gate.timeout)

    request = parse_gate_request(json_body())

    decision = rollout_gate.decide(request, deadline)

    return jsonify(decision.to_json())
