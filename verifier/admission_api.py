"""``POST /v1/admission``: the Kubernetes validating admission webhook.

The body is an AdmissionReview v1 and so is the response, with the request's uid echoed. A
denial is HTTP 200 with ``allowed: false`` and a status message naming the node and its
verdict, or the image and its signature problem. A body that is not a usable AdmissionReview
gets HTTP 400 with ``{"error": {"code": "admission-review-invalid", ...}}``; the API server
treats any response other than a 200 review as a failed call, which the webhook configuration's
``failurePolicy: Fail`` turns into a rejection.

The decision takes at most 70% of ``admission_timeout``. Image checks still running then are
denied with ``registry-timeout``.
"""

from __future__ import annotations

from typing import Final

from flask import Blueprint, Flask, Response, jsonify

from edgetrust.context import AppServices, services
from edgetrust.settings import Settings, SettingsError
from edgetrust.web import json_body
from verifier.admission import AdmissionController, AdmissionReviewInvalid, parse_admission_review
from verifier.cosign import CosignVerifier, ImageSignatureChecker, SignatureCache
from verifier.registry import Deadline, RegistryClient

_CONTROLLER_KEY: Final = "admission"
_CHECKER_KEY: Final = "image-signature-checker"
# Kubernetes accepts a webhook timeoutSeconds from 1 to 30.
_TIMEOUT_RANGE: Final = (1.0, 30.0)

blueprint = Blueprint("admission", __name__)


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Build the admission controller, add its route to ``app`` and return its error classes."""
    settings = app_services.settings
    low, high = _TIMEOUT_RANGE
    if not low <= settings.admission_timeout <= high:
        raise SettingsError(f"setting admission_timeout is {settings.admission_timeout}; "
                            f"Kubernetes accepts a webhook timeout of {low:g} to {high:g} seconds")

    app_services.extras[_CONTROLLER_KEY] = AdmissionController(
        app_services.sessions, image_checker(app_services),
        policy_name=settings.image_signature_policy, timeout=settings.admission_timeout,
    )
    app.register_blueprint(blueprint)
    return (AdmissionReviewInvalid,)


def image_checker(app_services: AppServices) -> ImageSignatureChecker:
    """Return the process's image signature checker, building it on first use, so that the
    admission webhook and the rollout gate share one registry client and one cache."""
    checker = app_services.extras.get(_CHECKER_KEY)
    if checker is None:
        checker = image_checker_from_settings(app_services.settings)
        app_services.extras[_CHECKER_KEY] = checker
    assert isinstance(checker, ImageSignatureChecker)
    return checker


def image_checker_from_settings(settings: Settings) -> ImageSignatureChecker:
    client = RegistryClient(plain_http_registries=settings.registry_plain_http,
                            ca_bundle=settings.registry_ca_bundle,
                            request_timeout=settings.registry_request_timeout,
                            pool_size=settings.image_check_threads)
    cache = SignatureCache(max_entries=settings.image_signature_cache_size,
                           ttl=settings.image_signature_cache_seconds)
    return ImageSignatureChecker(CosignVerifier(client, cache), threads=settings.image_check_threads)


def _controller() -> AdmissionController:
    controller = services().extras[_CONTROLLER_KEY]
    assert isinstance(controller, AdmissionController)
    return controller


@blueprint.post("/v1/admission")
def admission() -> Response:
    # edgetrust.auth has checked the API token (scope read) or the API server's client
    # certificate before this view runs.
    controller = _controller()
    deadline = Deadline.after(controller.budget)

    request = parse_admission_review(json_body())

    decision = controller.review(request, deadline)

    return jsonify(decision.review_response())
