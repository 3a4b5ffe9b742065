"""Admission decisions for Kubernetes pods: may this workload start on this node now?

The validating webhook (``POST /v1/admission``) receives AdmissionReview v1 objects for:

| resource | operation | what is checked |
|---|---|---|
| ``pods`` | CREATE | every image; the node too when ``spec.nodeName`` is set |
| ``pods`` | UPDATE | the images that changed, and then the node |
| ``pods/binding`` | CREATE | the node in ``target.name`` |
| ``pods/ephemeralcontainers`` | UPDATE | the new ephemeral containers' images, and then the node |

An image passes when it is pinned by digest and carries a cosign signature from a key that
the image-signature policy allows for its repository (``verifier.cosign``). A node passes
when it is mapped to a device whose effective verdict is trusted; untrusted, unknown and
expired verdicts and unmapped nodes are denied.

A pod created without ``spec.nodeName`` (the usual case, and always the case for a pod from
``generateName``) has no node yet. Its images are checked at CREATE and its node when the
scheduler binds it, because every pod the scheduler places goes through ``pods/binding``. A
pod created with ``spec.nodeName`` skips the scheduler and the binding, so its node is
checked at CREATE. The binding request carries no pod spec, so images are never re-checked
there.

An UPDATE that starts no new container (a label or annotation change, a finalizer removal)
is allowed without checks, so that controllers can still manage pods on a node that lost its
trust. Stopping those pods is the device guard's and the node controller's work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from policies.image_signature import ImageSignaturePolicy
from verifier import nodes, policy_store
from verifier.cosign import (
    ImageResult,
    ImageSignatureChecker,
    ImageSignatureError,
    SignaturePolicy,
    VerifiedImage,
    failure_json,
)
from verifier.registry import Deadline
from verifier.verdicts import VerdictStatus

log = logging.getLogger(__name__)

ADMISSION_API_VERSION: Final = "admission.k8s.io/v1"
ADMISSION_KIND: Final = "AdmissionReview"
# Share of the webhook's timeoutSeconds the decision may take, leaving the rest for the
# network and the API server, so that a slow registry ends in a denial rather than a timeout.
TIME_BUDGET_FRACTION: Final = 0.7

# Error code of a request body that is not a usable AdmissionReview (returned as HTTP 400).
ADMISSION_REVIEW_INVALID: Final = "admission-review-invalid"
# Denial codes besides those of verifier.cosign and verifier.registry.
NODE_NOT_MAPPED: Final = nodes.NODE_NOT_MAPPED
DEVICE_NOT_TRUSTED: Final = "device-not-trusted"
IMAGE_SIGNATURE_POLICY_NOT_FOUND: Final = "image-signature-policy-not-found"

_CONTAINER_LISTS: Final = ("initContainers", "containers", "ephemeralContainers")


class AdmissionReviewInvalid(Exception):
    """A request body that is not an AdmissionReview v1 this webhook can decide."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.code = ADMISSION_REVIEW_INVALID
        self.message = message
        self.field = field


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of an AdmissionReview request that a decision needs."""

    uid: str
    operation: str
    resource: str
    """``pods``, ``pods/binding`` or ``pods/ephemeralcontainers``."""
    namespace: str
    pod: str
    """The pod's name, or its generateName followed by ``*`` when it has no name yet."""
    node: str | None
    """The node the pod runs on or is being bound to; None before scheduling."""
    images: tuple[str, ...]
    """Images of containers that this request would start."""
    check_node: bool
    """Whether the node must be checked now (False while no node is known, and for updates
    that start no container)."""


@dataclass(frozen=True)
class Problem:
    """One reason for a denial: a stable code and a message naming the node or image."""

    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class AdmissionDecision:
    request: AdmissionRequest
    decision_id: uuid.UUID
    problems: tuple[Problem, ...]
    node: nodes.DeviceTrust | None
    images: Mapping[str, ImageResult] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return not self.problems

    def review_response(self) -> dict[str, Any]:
        """Return the AdmissionReview v1 response to the request."""
        response: dict[str, Any] = {"uid": self.request.uid, "allowed": self.allowed}
        if not self.allowed:
            response["status"] = {"code": 403, "reason": "Forbidden", "message": self.message()}
        response["auditAnnotations"] = self._audit_annotations()
        return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}

    def message(self) -> str:
        pod = f"{self.request.namespace}/{self.request.pod}"
        details = "; ".join(f"{problem.code}: {problem.message}" for problem in self.problems)
        return f"edgetrust denied {self.request.resource} {self.request.operation} of pod {pod}: {details}"

    def _audit_annotations(self) -> dict[str, str]:
        annotations = {"decision-id": str(self.decision_id),
                       "decision": "allow" if self.allowed else "deny"}
        if self.problems:
            annotations["codes"] = ",".join(sorted({problem.code for problem in self.problems}))
        if self.request.node is None and self.request.images:
            annotations["node-check"] = "deferred-to-binding"
        if self.node is not None:
            annotations["device-id"] = self.node.device_id
            annotations["verdict-id"] = str(self.node.verdict.verdict_id)
        return annotations


# --- parsing ----------------------------------------------------------------------------------


def parse_admission_review(unverified_review: Mapping[str, Any]) -> AdmissionRequest:
    """Check an AdmissionReview v1 and return what the decision needs.

    Raises AdmissionReviewInvalid for anything that is not a pods, pods/binding or
    pods/ephemeralcontainers review this webhook is registered for.
    """
    _expect(unverified_review.get("apiVersion") == ADMISSION_API_VERSION,
            f"apiVersion is {unverified_review.get('apiVersion')!r}; expected "
            f"{ADMISSION_API_VERSION!r}", "apiVersion")
    _expect(unverified_review.get("kind") == ADMISSION_KIND,
            f"kind is {unverified_review.get('kind')!r}; expected {ADMISSION_KIND!r}", "kind")
    request = _mapping(unverified_review.get("request"), "request")
    uid = request.get("uid")
    _expect(isinstance(uid, str) and bool(uid), "request.uid must be a non-empty string",
            "request.uid")

    resource = _resource(request)
    operation = request.get("operation")
    namespace = request.get("namespace")
    namespace = namespace if isinstance(namespace, str) else ""
    unverified_object = _mapping(request.get("object"), "request.object")

    if resource == "pods/binding":
        _expect(operation == "CREATE", f"pods/binding operation is {operation!r}; expected "
                "CREATE", "request.operation")
        return _binding_request(str(uid), namespace, request, unverified_object)
    if resource == "pods/ephemeralcontainers":
        _expect(operation == "UPDATE", f"pods/ephemeralcontainers operation is {operation!r}; "
                "expected UPDATE", "request.operation")
        return _pod_request(str(uid), "UPDATE", resource, namespace, request, unverified_object)
    _expect(operation in ("CREATE", "UPDATE"), f"pods operation is {operation!r}; expected "
            "CREATE or UPDATE", "request.operation")
    return _pod_request(str(uid), str(operation), resource, namespace, request, unverified_object)


def _resource(request: Mapping[str, Any]) -> str:
    resource = _mapping(request.get("resource"), "request.resource")
    group = resource.get("group", "")
    name = resource.get("resource")
    sub_resource = request.get("subResource") or ""
    _expect(group == "" and name == "pods",
            f"resource is {group!r}/{name!r}; this webhook handles core pods only",
            "request.resource")
    _expect(sub_resource in ("", "binding", "ephemeralcontainers"),
            f"subResource is {sub_resource!r}; expected none, binding or ephemeralcontainers",
            "request.subResource")
    return "pods" if not sub_resource else f"pods/{sub_resource}"


def _binding_request(uid: str, namespace: str, request: Mapping[str, Any],
                     unverified_binding: Mapping[str, Any]) -> AdmissionRequest:
    target = _mapping(unverified_binding.get("target"), "request.object.target")
    node = target.get("name")
    _expect(isinstance(node, str) and bool(node), "request.object.target.name must name a node",
            "request.object.target.name")
    kind = target.get("kind", "Node")
    _expect(kind == "Node", f"binding target kind is {kind!r}; expected 'Node'",
            "request.object.target.kind")
    metadata = unverified_binding.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    pod = request.get("name") or name or "?"
    return AdmissionRequest(uid=uid, operation="CREATE", resource="pods/binding",
                            namespace=namespace, pod=str(pod), node=str(node), images=(),
                            check_node=True)


def _pod_request(uid: str, operation: str, resource: str, namespace: str,
                 request: Mapping[str, Any], unverified_pod: Mapping[str, Any]) -> AdmissionRequest:
    spec = _mapping(unverified_pod.get("spec"), "request.object.spec")
    containers = _containers(spec, "request.object.spec")
    node = spec.get("nodeName") or None
    _expect(node is None or isinstance(node, str), "spec.nodeName must be a string",
            "request.object.spec.nodeName")

    if operation == "UPDATE":
        unverified_old = request.get("oldObject")
        old_containers: set[tuple[str, str, str]] = set()
        if isinstance(unverified_old, Mapping) and isinstance(unverified_old.get("spec"), Mapping):
            old_containers = set(_containers(unverified_old["spec"], "request.oldObject.spec"))
        started = [entry for entry in containers if entry not in old_containers]
    else:
        started = containers

    images = tuple(dict.fromkeys(image for _, _, image in started))
    return AdmissionRequest(uid=uid, operation=operation, resource=resource, namespace=namespace,
                            pod=_pod_name(request, unverified_pod), node=node, images=images,
                            check_node=node is not None and bool(started))


def _containers(spec: Mapping[str, Any], where: str) -> list[tuple[str, str, str]]:
    """Return (list name, container name, image) of every container of a pod spec."""
    found = []
    for list_name in _CONTAINER_LISTS:
        entries = spec.get(list_name) or []
        _expect(isinstance(entries, list), f"{where}.{list_name} must be a list",
                f"{where}.{list_name}")
        for position, container in enumerate(entries):
            path = f"{where}.{list_name}[{position}]"
            container = _mapping(container, path)
            image = container.get("image")
            if not isinstance(image, str) or not image.strip():
                raise AdmissionReviewInvalid(f"{path}.image must be a non-empty string",
                                             field=f"{path}.image")
            found.append((list_name, str(container.get("name", position)), image.strip()))
    _expect(bool(found), f"{where} has no containers", f"{where}.containers")
    return found


def _pod_name(request: Mapping[str, Any], unverified_pod: Mapping[str, Any]) -> str:
    metadata = unverified_pod.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    name = request.get("name") or metadata.get("name")
    if isinstance(name, str) and name:
        return name
    generate_name = metadata.get("generateName")
    if isinstance(generate_name, str) and generate_name:
        return f"{generate_name}*"
    return "?"


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise AdmissionReviewInvalid(f"{where} must be a JSON object", field=where)
    return value


def _expect(condition: bool, message: str, where: str) -> None:
    if not condition:
        raise AdmissionReviewInvalid(message, field=where)


# --- deciding ---------------------------------------------------------------------------------


def load_signature_policy(session: Session, name: str) -> SignaturePolicy:
    """Return the newest version of the image-signature policy ``name``. Raises
    ImageSignatureError ``image-signature-policy-not-found`` if there is none of that kind."""
    try:
        version = policy_store.latest(session, name)
        compiled = policy_store.compiled(session, version.content_hash)
    except policy_store.PolicyStoreError as error:
        raise ImageSignatureError(
            IMAGE_SIGNATURE_POLICY_NOT_FOUND,
            f"image-signature policy {name!r} cannot be loaded ({error.message}); upload it with "
            "`edgetrust policy` or set image_signature_policy", image="*",
        ) from None
    if not isinstance(compiled, ImageSignaturePolicy):
        raise ImageSignatureError(
            IMAGE_SIGNATURE_POLICY_NOT_FOUND,
            f"policy {name!r} is a {version.kind} policy, not an image-signature policy",
            image="*",
        )
    return SignaturePolicy(name=name, version=version.version, policy=compiled)


def image_problems(results: Mapping[str, ImageResult]) -> list[Problem]:
    """Return one problem per image that failed its check."""
    return [Problem(result.code, result.message) for result in results.values()
            if isinstance(result, ImageSignatureError)]


def image_result_json(result: ImageResult) -> dict[str, Any]:
    if isinstance(result, VerifiedImage):
        return result.to_json()
    return failure_json(result)


def node_problem(node: str, trust: nodes.DeviceTrust | None) -> Problem | None:
    """Return why ``node`` may not run the workload, or None if its device is trusted."""
    if trust is None:
        return Problem(NODE_NOT_MAPPED,
                       f"node {node} is not mapped to an attested device, so its integrity is "
                       "unknown")
    if trust.status is VerdictStatus.TRUSTED:
        return None
    reasons = "; ".join(f"{reason.code}: {reason.message}" for reason in trust.verdict.reasons)
    return Problem(DEVICE_NOT_TRUSTED,
                   f"node {node} runs device {trust.device_id} whose verdict is "
                   f"{trust.status.value} ({reasons or 'no reason recorded'})")


class AdmissionController:
    """Admission decisions of one server process. Thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], checker: ImageSignatureChecker, *,
                 policy_name: str, timeout: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self._sessions = sessions
        self._checker = checker
        self._policy_name = policy_name
        self._clock = clock
        self.budget = timeout * TIME_BUDGET_FRACTION

    def review(self, request: AdmissionRequest, deadline: Deadline) -> AdmissionDecision:
        """Decide ``request`` by ``deadline``:

        1. Check the node's device, when the request places or starts containers on a node.
        2. Unless the node failed, check every image the request would start.
        3. Allow only if nothing failed.
        """
        started = time.monotonic()

        trust, problems = self._check_node(request)

        results: dict[str, ImageResult] = {}
        if not problems and request.images:
            results, image_failures = self._check_images(request.images, deadline)
            problems.extend(image_failures)

        decision = AdmissionDecision(request=request, decision_id=uuid.uuid4(),
                                     problems=tuple(problems), node=trust, images=results)
        self._log(decision, time.monotonic() - started)
        return decision

    def _check_node(self, request: AdmissionRequest) -> tuple[nodes.DeviceTrust | None, list[Problem]]:
        if not request.check_node or request.node is None:
            return None, []
        with self._sessions() as session:
            trust = nodes.node_trust(session, request.node, self._clock())
        problem = node_problem(request.node, trust)
        return trust, [problem] if problem is not None else []

    def _check_images(self, images: Sequence[str],
                      deadline: Deadline) -> tuple[dict[str, ImageResult], list[Problem]]:
        try:
            with self._sessions() as session:
                policy = load_signature_policy(session, self._policy_name)
        except ImageSignatureError as error:
            return {}, [Problem(error.code, error.message)]
        results = self._checker.check(images, policy, deadline)
        return results, image_problems(results)

    @staticmethod
    def _log(decision: AdmissionDecision, elapsed: float) -> None:
        request = decision.request
        log.info(
            "admission %s: uid=%s decision_id=%s %s %s pod=%s/%s node=%s images=%d codes=%s "
            "elapsed_ms=%.0f", "allowed" if decision.allowed else "denied", request.uid,
            decision.decision_id, request.resource, request.operation, request.namespace,
            request.pod, request.node or "-", len(request.images),
            ",".join(problem.code for problem in decision.problems) or "-", elapsed * 1000,
        )
