"""The rollout gate: may this image be rolled out to these devices now?

A CI/CD pipeline (a Tekton task, an Argo Rollouts analysis) names an image pinned by digest,
the target devices (by device id, node name or node labels) and the minimum fraction of them
that must be trusted. The gate allows the rollout only if

1. the image is pinned and carries a cosign signature from a key the image-signature policy
   allows for its repository (the same check as admission), and
2. at least one target matched, and trusted targets / matched targets >= the minimum.

A named node without a device mapping, and a named device the verifier does not attest,
count as matched targets whose status is unknown.

Every decision gets a random ``decision_id`` and one INFO log line with it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from sqlalchemy.orm import Session, sessionmaker

from verifier import nodes
from verifier.admission import Problem, image_result_json, load_signature_policy
from verifier.cosign import ImageResult, ImageSignatureChecker, ImageSignatureError, SignaturePolicy
from verifier.registry import Deadline
from verifier.verdicts import Verdict, VerdictStatus, unknown_verdict

log = logging.getLogger(__name__)

GATE_REQUEST_INVALID: Final = "gate-request-invalid"
NO_DEVICES_MATCHED: Final = "no-devices-matched"
TRUSTED_FRACTION_TOO_LOW: Final = "trusted-fraction-too-low"
# Maximum number of device ids, node names or labels in one request.
MAX_SELECTOR_ITEMS: Final = 10_000

SelectorKind = Literal["device_ids", "nodes", "labels"]


class GateRequestInvalid(Exception):
    """A gate request body that cannot be decided; ``field`` names the member at fault."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.code = GATE_REQUEST_INVALID
        self.message = message
        self.field = field


@dataclass(frozen=True)
class GateRequest:
    image: str
    selector_kind: SelectorKind
    device_ids: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    labels: Mapping[str, str] | None = None
    min_trusted_fraction: float = 1.0


@dataclass(frozen=True)
class Target:
    """One matched target: a device, possibly found through a node, and its verdict."""

    device_id: str | None
    node: str | None
    status: VerdictStatus
    reasons: tuple[Problem, ...]

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "node": self.node, "status": self.status.value,
                "reasons": [reason.to_json() for reason in self.reasons]}


@dataclass(frozen=True)
class GateDecision:
    decision_id: uuid.UUID
    request: GateRequest
    image: ImageResult
    targets: tuple[Target, ...]
    problems: tuple[Problem, ...]

    @property
    def allowed(self) -> bool:
        return not self.problems

    @property
    def trusted(self) -> int:
        return sum(1 for target in self.targets if target.status is VerdictStatus.TRUSTED)

    @property
    def trusted_fraction(self) -> float:
        return self.trusted / len(self.targets) if self.targets else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "decision_id": str(self.decision_id),
            "image": image_result_json(self.image),
            "devices": [target.to_json() for target in self.targets],
            "matched": len(self.targets),
            "trusted": self.trusted,
            "trusted_fraction": self.trusted_fraction,
            "min_trusted_fraction": self.request.min_trusted_fraction,
            "reasons": [problem.to_json() for problem in self.problems],
        }


# --- parsing ----------------------------------------------------------------------------------


def parse_gate_request(unverified: Mapping[str, Any]) -> GateRequest:
    """Check a gate request body. Raises GateRequestInvalid naming the field at fault."""
    image = unverified.get("image")
    if not isinstance(image, str) or not image.strip():
        raise GateRequestInvalid("image must be an image reference such as "
                                 "registry.example/donkeycar/car@sha256:<digest>", field="image")

    fraction = unverified.get("min_trusted_fraction", 1.0)
    if (not isinstance(fraction, int | float) or isinstance(fraction, bool)
            or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0):
        raise GateRequestInvalid(f"min_trusted_fraction is {fraction!r}; expected a number from "
                                 "0.0 to 1.0", field="min_trusted_fraction")

    selector = unverified.get("selector")
    if not isinstance(selector, Mapping) or len(selector) != 1:
        raise GateRequestInvalid("selector must be an object with exactly one of device_ids, "
                                 "nodes or labels", field="selector")
    kind, value = next(iter(selector.items()))
    return _with_selector(image.strip(), float(fraction), kind, value)


def _with_selector(image: str, fraction: float, kind: object, value: object) -> GateRequest:
    if kind == "device_ids":
        return GateRequest(image, "device_ids", device_ids=_names(value, "selector.device_ids"),
                           min_trusted_fraction=fraction)
    if kind == "nodes":
        return GateRequest(image, "nodes", nodes=_names(value, "selector.nodes"),
                           min_trusted_fraction=fraction)
    if kind == "labels":
        return GateRequest(image, "labels", labels=_labels(value), min_trusted_fraction=fraction)
    raise GateRequestInvalid(f"selector {kind!r} is unknown; use device_ids, nodes or labels",
                             field="selector")


def _names(value: object, field: str) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value or len(value) > MAX_SELECTOR_ITEMS
            or not all(isinstance(name, str) and name for name in value)):
        raise GateRequestInvalid(f"{field} must be a list of 1 to {MAX_SELECTOR_ITEMS} non-empty "
                                 "strings", field=field)
    return tuple(dict.fromkeys(value))


def _labels(value: object) -> dict[str, str]:
    if (not isinstance(value, Mapping) or not value or len(value) > MAX_SELECTOR_ITEMS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise GateRequestInvalid("selector.labels must be a non-empty object of label names to "
                                 "string values", field="selector.labels")
    return dict(value)


# --- deciding ---------------------------------------------------------------------------------


class RolloutGate:
    """Rollout gate decisions of one server process. Thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], checker: ImageSignatureChecker, *,
                 policy_name: str, timeout: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self._sessions = sessions
        self._checker = checker
        self._policy_name = policy_name
        self._clock = clock
        self.timeout = timeout

    def decide(self, request: GateRequest, deadline: Deadline) -> GateDecision:
        """1. Read the effective verdict of every target.
        2. Check the image signature.
        3. Allow only if the image passed, a target matched and enough targets are trusted."""
        with self._sessions() as session:
            targets = self._targets(session, request)
            policy = self._policy(session, request.image)

        image = policy if isinstance(policy, ImageSignatureError) else (
            self._checker.check([request.image], policy, deadline)[request.image])

        problems = []
        if isinstance(image, ImageSignatureError):
            problems.append(Problem(image.code, image.message))
        problems.extend(_fraction_problems(request, targets))

        decision = GateDecision(uuid.uuid4(), request, image, tuple(targets), tuple(problems))
        log.info("gate %s: decision_id=%s image=%s selector=%s matched=%d trusted=%d "
                 "min_trusted_fraction=%s codes=%s", "allowed" if decision.allowed else "denied",
                 decision.decision_id, request.image, request.selector_kind, len(targets),
                 decision.trusted, request.min_trusted_fraction,
                 ",".join(problem.code for problem in problems) or "-")
        return decision

    def _policy(self, session: Session, image: str) -> SignaturePolicy | ImageSignatureError:
        try:
            return load_signature_policy(session, self._policy_name)
        except ImageSignatureError as error:
            return ImageSignatureError(error.code, error.message, image=image)

    def _targets(self, session: Session, request: GateRequest) -> list[Target]:
        at = self._clock()
        if request.selector_kind == "device_ids":
            verdicts = nodes.device_verdicts(session, request.device_ids, at)
            return [_target(device_id, None, verdicts[device_id]) for device_id in request.device_ids]

        if request.selector_kind == "nodes":
            found = nodes.nodes_named(session, request.nodes)
        else:
            assert request.labels is not None
            found = {node.node_name: node for node in nodes.nodes_with_labels(session, request.labels)}
        names = request.nodes if request.selector_kind == "nodes" else tuple(found)
        verdicts = nodes.device_verdicts(session, [node.device_id for node in found.values()], at)

        targets = []
        for name in names:
            node = found.get(name)
            if node is None:
                verdict = unknown_verdict(name, nodes.NODE_NOT_MAPPED,
                                          f"node {name} is not mapped to a device", issued_at=at)
                targets.append(_target(None, name, verdict))
            else:
                targets.append(_target(node.device_id, name, verdicts[node.device_id]))
        return targets


def _target(device_id: str | None, node: str | None, verdict: Verdict) -> Target:
    reasons = tuple(Problem(reason.code, reason.message) for reason in verdict.reasons)
    return Target(device_id, node, verdict.status, reasons)


def _fraction_problems(request: GateRequest, targets: list[Target]) -> list[Problem]:
    if not targets:
        return [Problem(NO_DEVICES_MATCHED, f"the {request.selector_kind} selector matched no "
                        "device, so the rollout has no target")]
    trusted = sum(1 for target in targets if target.status is VerdictStatus.TRUSTED)
    fraction = trusted / len(targets)
    if fraction >= request.min_trusted_fraction:
        return []
    not_trusted = [target.device_id or target.node or "?" for target in targets
                   if target.status is not VerdictStatus.TRUSTED]
    listed = ", ".join(not_trusted[:10]) + (", ..." if len(not_trusted) > 10 else "")
    return [Problem(TRUSTED_FRACTION_TOO_LOW,
                    f"{trusted} of {len(targets)} targets are trusted ({fraction:.2f}), below the "
                    f"minimum {request.min_trusted_fraction:.2f}; not trusted: {listed}")]
