"""The admission webhook end to end: AdmissionReview v1 requests to POST /v1/admission of a real
app on SQLite and PostgreSQL, with images in a real registry on 127.0.0.1.

Also the helpers the rollout gate tests share: devices with stored verdicts, node mappings,
and an app wired to the registry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import make_session_factory, transaction
from edgetrust.settings import Settings, setting_fields
from registrar.models import RegisteredDevice
from tests.support.registry import (
    HangingServer,
    PrivateKey,
    PushedImage,
    Registry,
    closed_port,
    generate_key,
    policy_document,
    registry_available,
    running_registry,
)
from tests.support.server import serving
from verifier import nodes, policy_store
from verifier.models import VerifierDevice
from verifier.verdicts import Reason, VerdictStatus, new_verdict

pytestmark = pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed")

POLICY_NAME = "image-signature"
CAR = "donkeycar/car"


# --- helpers shared with the gate tests -------------------------------------------------------


def add_device(session: Session, device_id: str, status: str | None, *, node: str | None = None,
               expires_in: float = 300.0, reasons: Sequence[Reason] = (),
               labels: dict[str, str] | None = None) -> None:
    """Register a device and give it a verdict: ``status`` trusted, untrusted or unknown,
    "never" for a device the verifier has not attested yet, None for one it does not attest.
    A trusted verdict expires ``expires_in`` seconds from now (negative: already expired)."""
    now = datetime.now(UTC)
    session.add(RegisteredDevice(device_id=device_id, aik_tpm=b"ak", regcount=1, active=True,
                                 failed_activations=0, created_at=now, registered_at=now))
    session.flush()
    if status is not None:
        session.add(_verifier_row(device_id, status, now, expires_in, reasons))
    if node is not None:
        nodes.set_node(session, node, device_id, labels)
    session.flush()


def _verifier_row(device_id: str, status: str, now: datetime, expires_in: float,
                  reasons: Sequence[Reason]) -> VerifierDevice:
    row = VerifierDevice(device_id=device_id, ip="127.0.0.1", port=9002, poll_interval=10.0,
                         paused=False, next_poll_at=now, consecutive_failures=0,
                         verdict_status="unknown", verdict_reasons=[], verdict_policies=[],
                         created_at=now, updated_at=now)
    if status == "never":
        return row
    attested_at = now - timedelta(seconds=10)
    verdict = new_verdict(device_id, VerdictStatus(status), reasons, issued_at=attested_at,
                          attested_at=attested_at,
                          expires_at=now + timedelta(seconds=expires_in))
    row.verdict_id = str(verdict.verdict_id)
    row.verdict_status = verdict.status.value
    row.verdict_reasons = [reason.to_json() for reason in verdict.reasons]
    row.verdict_issued_at = verdict.issued_at
    row.verdict_attested_at = verdict.attested_at
    row.verdict_expires_at = verdict.expires_at
    return row


def make_settings(tmp_path: Path, database_url: str, plain_http: list[str],
                  **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path, "database_url": database_url, "registry_plain_http": plain_http,
        "image_signature_policy": POLICY_NAME, "verifier_poll_in_server": False,
    }
    # API tokens are tested with the authentication code; these tests call the routes directly.
    if "api_auth" in {f.name for f in setting_fields()}:
        values["api_auth"] = False
    values.update(changes)
    return Settings(**values)


def store_policy(sessions: sessionmaker[Session], document: dict[str, Any]) -> None:
    with transaction(sessions) as session:
        policy_store.put_policy(session, POLICY_NAME, "image-signature", document)


@dataclass
class Cluster:
    """An app, its database and a registry of signed images."""

    app: Flask
    client: FlaskClient
    sessions: sessionmaker[Session]
    registry: Registry
    key: PrivateKey

    def add_device(self, device_id: str, status: str | None, **options: Any) -> None:
        with transaction(self.sessions) as session:
            add_device(session, device_id, status, **options)

    def signed_image(self, path: str = CAR) -> PushedImage:
        image = self.registry.push_image(path)
        self.registry.sign_simple(image, self.key)
        return image


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with running_registry() as registry:
        yield registry


@pytest.fixture(scope="module")
def release_key() -> PrivateKey:
    return generate_key()


@pytest.fixture
def cluster(migrated_engine: Engine, database_url: str, tmp_path: Path, registry: Registry,
            release_key: PrivateKey) -> Iterator[Cluster]:
    settings = make_settings(tmp_path, database_url, [registry.host], admission_timeout=10.0)
    app = create_app(settings, engine=migrated_engine)
    sessions = make_session_factory(migrated_engine)
    store_policy(sessions, policy_document({"release": release_key},
                                           {f"{registry.host}/donkeycar/*": ["release"]}))
    yield Cluster(app, app.test_client(), sessions, registry, release_key)


# --- AdmissionReview builders -----------------------------------------------------------------


def review(request: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "namespace": "donkeycar", **request}}


def pod(images: Sequence[str] = (), *, node: str | None = None, init: Sequence[str] = (),
        ephemeral: Sequence[str] = (), name: str | None = "car-0",
        generate_name: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": "donkeycar",
                                "labels": {"app.kubernetes.io/part-of": "donkeycar"}}
    if name is not None:
        metadata["name"] = name
    if generate_name is not None:
        metadata["generateName"] = generate_name
    spec: dict[str, Any] = {
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
    }
    if init:
        spec["initContainers"] = [{"name": f"i{i}", "image": image} for i, image in enumerate(init)]
    if ephemeral:
        spec["ephemeralContainers"] = [{"name": f"e{i}", "image": image}
                                       for i, image in enumerate(ephemeral)]
    if node is not None:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def pod_review(images: Sequence[str], *, operation: str = "CREATE", node: str | None = None,
               old: dict[str, Any] | None = None, **pod_options: Any) -> dict[str, Any]:
    new = pod(images, node=node, **pod_options)
    request: dict[str, Any] = {
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": operation, "object": new,
    }
    if new["metadata"].get("name"):
        request["name"] = new["metadata"]["name"]
    if old is not None:
        request["oldObject"] = old
    return review(request)


def binding_review(node: str, pod_name: str = "car-0") -> dict[str, Any]:
    return review({
        "kind": {"group": "", "version": "v1", "kind": "Binding"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": "binding", "name": pod_name, "operation": "CREATE",
        "object": {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": pod_name, "namespace": "donkeycar"},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}},
    })


def ephemeral_review(images: Sequence[str], added: Sequence[str], node: str) -> dict[str, Any]:
    return review({
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": "ephemeralcontainers", "name": "car-0", "operation": "UPDATE",
        "object": pod(images, node=node, ephemeral=added),
        "oldObject": pod(images, node=node),
    })


def admit(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    response = cluster.client.post("/v1/admission", json=body)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    return answer["response"]


def denial(cluster: Cluster, body: dict[str, Any]) -> str:
    response = admit(cluster, body)
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    return str(response["status"]["message"])


# --- pods -------------------------------------------------------------------------------------


def test_signed_pod_on_trusted_node_allowed(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", "trusted", node="node-7")

    response = admit(cluster, pod_review([image.pinned], node="node-7"))

    assert response["allowed"] is True
    assert "status" not in response
    assert response["auditAnnotations"]["decision"] == "allow"
    assert response["auditAnnotations"]["device-id"] == "car-7"
    uuid.UUID(response["auditAnnotations"]["verdict-id"])


def test_generate_name_pod_defers_node(cluster: Cluster) -> None:
    image = cluster.signed_image()

    response = admit(cluster, pod_review([image.pinned], name=None, generate_name="car-"))

    assert response["allowed"] is True
    assert response["auditAnnotations"]["node-check"] == "deferred-to-binding"


def test_generate_name_pod_unsigned_denied(cluster: Cluster) -> None:
    image = cluster.registry.push_image(CAR)

    message = denial(cluster, pod_review([image.pinned], name=None, generate_name="car-"))

    assert "image-signature-missing" in message
    assert "donkeycar/car-*" in message
    assert image.pinned in message


@pytest.mark.parametrize("status", ["untrusted", "unknown", "never"])
def test_pod_on_untrusted_node_denied(cluster: Cluster, status: str) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", status, node="node-7",
                       reasons=[Reason("ima-digest-not-allowed", "/usr/bin/evil is not allowed")])

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "device-not-trusted" in message
    assert "node node-7" in message
    assert "car-7" in message
    assert f"verdict is {'unknown' if status == 'never' else status}" in message


def test_untrusted_node_reason_named(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", "untrusted", node="node-7",
                       reasons=[Reason("ima-digest-not-allowed", "/usr/bin/evil is not allowed")])

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "ima-digest-not-allowed: /usr/bin/evil is not allowed" in message


def test_expired_verdict_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", "trusted", node="node-7", expires_in=-1)

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "verdict is unknown" in message
    assert "verdict-expired" in message


def test_device_not_in_verifier_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", None, node="node-7")

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "verifier-device-not-found" in message


def test_unmapped_node_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()

    message = denial(cluster, pod_review([image.pinned], node="node-unknown"))

    assert "node-not-mapped: node node-unknown" in message


def test_tag_only_image_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, pod_review([image.tagged], node="node-7"))

    assert f"image-not-pinned: image {image.tagged} is not pinned by digest" in message


def test_wrongly_signed_image_denied(cluster: Cluster) -> None:
    image = cluster.registry.push_image(CAR)
    cluster.registry.sign_simple(image, cluster.key, claimed_digest="sha256:" + "7" * 64)
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "image-signature-digest-mismatch" in message


def test_unlisted_key_image_denied(cluster: Cluster) -> None:
    image = cluster.registry.push_image(CAR)
    cluster.registry.sign_simple(image, generate_key())
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "image-signature-invalid" in message
    assert "'release'" in message


def test_repository_without_key_denied(cluster: Cluster) -> None:
    image = cluster.registry.push_image("tools/debug")
    cluster.registry.sign_simple(image, cluster.key)
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, pod_review([image.pinned], node="node-7"))

    assert "image-signature-key-not-allowed" in message


def test_init_container_image_checked(cluster: Cluster) -> None:
    signed = cluster.signed_image()
    unsigned = cluster.registry.push_image(CAR)

    message = denial(cluster, pod_review([signed.pinned], init=[unsigned.pinned]))

    assert unsigned.pinned in message
    assert signed.pinned not in message


def test_every_failing_image_named(cluster: Cluster) -> None:
    unsigned = cluster.registry.push_image(CAR)
    tagged = cluster.signed_image()

    response = admit(cluster, pod_review([unsigned.pinned, tagged.tagged]))

    assert response["allowed"] is False
    assert response["auditAnnotations"]["codes"] == "image-not-pinned,image-signature-missing"


def test_missing_policy_denies_images(cluster: Cluster) -> None:
    image = cluster.signed_image()
    with transaction(cluster.sessions) as session:
        policy_store.delete(session, POLICY_NAME)

    message = denial(cluster, pod_review([image.pinned]))

    assert "image-signature-policy-not-found" in message


# --- updates and ephemeral containers ---------------------------------------------------------


def test_update_changing_image_checks_it(cluster: Cluster) -> None:
    old_image = cluster.signed_image()
    new_image = cluster.registry.push_image(CAR)
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, pod_review([new_image.pinned], operation="UPDATE", node="node-7",
                                         old=pod([old_image.pinned], node="node-7")))

    assert "image-signature-missing" in message
    assert new_image.pinned in message


def test_update_changing_image_checks_node(cluster: Cluster) -> None:
    old_image = cluster.signed_image()
    new_image = cluster.signed_image()
    cluster.add_device("car-7", "untrusted", node="node-7")

    message = denial(cluster, pod_review([new_image.pinned], operation="UPDATE", node="node-7",
                                         old=pod([old_image.pinned], node="node-7")))

    assert "device-not-trusted" in message


def test_update_without_new_container_allowed(cluster: Cluster) -> None:
    unsigned = cluster.registry.push_image(CAR)
    cluster.add_device("car-7", "untrusted", node="node-7")

    response = admit(cluster, pod_review([unsigned.pinned], operation="UPDATE", node="node-7",
                                         old=pod([unsigned.pinned], node="node-7")))

    assert response["allowed"] is True


def test_update_signed_image_on_trusted_node(cluster: Cluster) -> None:
    old_image = cluster.signed_image()
    new_image = cluster.signed_image()
    cluster.add_device("car-7", "trusted", node="node-7")

    response = admit(cluster, pod_review([new_image.pinned], operation="UPDATE", node="node-7",
                                         old=pod([old_image.pinned], node="node-7")))

    assert response["allowed"] is True


def test_ephemeral_container_unsigned_denied(cluster: Cluster) -> None:
    running = cluster.registry.push_image(CAR)
    debug = cluster.registry.push_image(CAR)
    cluster.add_device("car-7", "trusted", node="node-7")

    message = denial(cluster, ephemeral_review([running.pinned], [debug.pinned], "node-7"))

    assert debug.pinned in message
    assert running.pinned not in message


def test_ephemeral_container_signed_allowed(cluster: Cluster) -> None:
    running = cluster.signed_image()
    debug = cluster.signed_image()
    cluster.add_device("car-7", "trusted", node="node-7")

    response = admit(cluster, ephemeral_review([running.pinned], [debug.pinned], "node-7"))

    assert response["allowed"] is True


def test_ephemeral_container_untrusted_node(cluster: Cluster) -> None:
    running = cluster.signed_image()
    debug = cluster.signed_image()
    cluster.add_device("car-7", "unknown", node="node-7")

    message = denial(cluster, ephemeral_review([running.pinned], [debug.pinned], "node-7"))

    assert "device-not-trusted" in message


# --- bindings ---------------------------------------------------------------------------------


def test_binding_to_trusted_node_allowed(cluster: Cluster) -> None:
    cluster.add_device("car-7", "trusted", node="node-7")

    response = admit(cluster, binding_review("node-7"))

    assert response["allowed"] is True


@pytest.mark.parametrize("status", ["untrusted", "unknown", "expired"])
def test_binding_to_untrusted_node_denied(cluster: Cluster, status: str) -> None:
    if status == "expired":
        cluster.add_device("car-7", "trusted", node="node-7", expires_in=-5)
    else:
        cluster.add_device("car-7", status, node="node-7")

    message = denial(cluster, binding_review("node-7", pod_name="car-abcde"))

    assert "edgetrust denied pods/binding CREATE of pod donkeycar/car-abcde" in message
    assert "node node-7 runs device car-7" in message


def test_binding_to_unmapped_node_denied(cluster: Cluster) -> None:
    message = denial(cluster, binding_review("node-9"))

    assert "node-not-mapped" in message


def test_binding_makes_no_registry_request(cluster: Cluster) -> None:
    cluster.add_device("car-7", "trusted", node="node-7")
    before = cluster.registry.requests_for("donkeycar")

    admit(cluster, binding_review("node-7"))

    assert cluster.registry.requests_for("donkeycar") == before


# --- cache ------------------------------------------------------------------------------------


def test_second_admission_uses_cache(cluster: Cluster) -> None:
    image = cluster.signed_image("donkeycar/cached")
    cluster.add_device("car-7", "trusted", node="node-7")
    assert admit(cluster, pod_review([image.pinned], node="node-7"))["allowed"] is True
    before = cluster.registry.requests_for("donkeycar/cached")

    response = admit(cluster, pod_review([image.pinned], node="node-7"))

    assert response["allowed"] is True
    assert cluster.registry.requests_for("donkeycar/cached") == before


def test_denial_not_cached(cluster: Cluster) -> None:
    image = cluster.registry.push_image("donkeycar/late")
    assert admit(cluster, pod_review([image.pinned]))["allowed"] is False
    cluster.registry.sign_simple(image, cluster.key)

    response = admit(cluster, pod_review([image.pinned]))

    assert response["allowed"] is True


# --- malformed reviews ------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    """An app on an empty SQLite file: malformed reviews are rejected before any query."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    return create_app(settings).test_client()


MALFORMED = [
    ({"kind": "AdmissionReview", "request": {}}, "apiVersion"),
    ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}, "apiVersion"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}, "kind"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
     "request.uid"),
]


@pytest.mark.parametrize(("body", "field"), MALFORMED)
def test_malformed_review_rejected(client: FlaskClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/admission", json=body)

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "admission-review-invalid"
    assert error["field"] == field


@pytest.mark.parametrize(("change", "field"), [
    ({"resource": {"group": "apps", "version": "v1", "resource": "deployments"}}, "request.resource"),
    ({"subResource": "status"}, "request.subResource"),
    ({"operation": "DELETE"}, "request.operation"),
    ({"object": None}, "request.object"),
    ({"object": {"kind": "Pod", "spec": {"containers": []}}}, "request.object.spec.containers"),
    ({"object": {"kind": "Pod", "spec": {"containers": [{"name": "c"}]}}},
     "request.object.spec.containers[0].image"),
    ({"object": {"kind": "Pod", "spec": {"containers": "x"}}}, "request.object.spec.containers"),
])
def test_malformed_pod_review_rejected(client: FlaskClient, change: dict[str, Any],
                                       field: str) -> None:
    body = pod_review(["registry.example/donkeycar/car@sha256:" + "a" * 64])
    body["request"].update(change)

    response = client.post("/v1/admission", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == field


def test_binding_without_node_rejected(client: FlaskClient) -> None:
    body = binding_review("node-7")
    del body["request"]["object"]["target"]["name"]

    response = client.post("/v1/admission", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "request.object.target.name"


def test_non_json_body_rejected(client: FlaskClient) -> None:
    response = client.post("/v1/admission", data=b"not json", content_type="application/json")

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid-json"


def test_timeout_outside_kubernetes_range(tmp_path: Path) -> None:
    from edgetrust.settings import SettingsError

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", [],
                             admission_timeout=31.0)

    with pytest.raises(SettingsError, match="admission_timeout is 31.0"):
        create_app(settings)


# --- registry failures within the deadline ----------------------------------------------------


TIMEOUT = 3.0


@pytest.mark.parametrize("failure", ["hangs", "down"])
def test_registry_failure_denied_before_timeout(migrated_engine: Engine, database_url: str,
                                                tmp_path: Path, release_key: PrivateKey,
                                                failure: str) -> None:
    with HangingServer() as hanging:
        host = hanging.host if failure == "hangs" else f"127.0.0.1:{closed_port()}"
        settings = make_settings(tmp_path, database_url, [host], admission_timeout=TIMEOUT)
        app = create_app(settings, engine=migrated_engine)
        store_policy(make_session_factory(migrated_engine), policy_document(
            {"release": release_key}, {f"{host}/donkeycar/*": ["release"]}))
        body = pod_review([f"{host}/donkeycar/car@sha256:{'8' * 64}"])

        with serving(app) as server:
            started = time.monotonic()
            response = requests.post(f"{server.url}/v1/admission", json=body, timeout=TIMEOUT * 2)
            elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT
    assert response.status_code == 200
    answer = response.json()["response"]
    assert answer["uid"] == body["request"]["uid"]
    assert answer["allowed"] is False
    expected = "registry-timeout" if failure == "hangs" else "registry-unavailable"
    assert expected in answer["status"]["message"]
    assert answer["auditAnnotations"]["codes"] == expected
