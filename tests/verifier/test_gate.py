"""The rollout gate: POST /v1/gate on a real app (SQLite and PostgreSQL) with a real registry,
and the ``edgetrust gate`` command against it over HTTP on 127.0.0.1."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from edgetrust.app import create_app
from edgetrust.cli import main
from edgetrust.db import make_session_factory
from tests.support.registry import (
    PrivateKey,
    Registry,
    closed_port,
    generate_key,
    policy_document,
    registry_available,
    running_registry,
)
from tests.support.server import serving
from tests.verifier.test_admission import CAR, Cluster, make_settings, store_policy
from verifier.verdicts import Reason

pytestmark = pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed")


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
    settings = make_settings(tmp_path, database_url, [registry.host], gate_timeout=10.0)
    app = create_app(settings, engine=migrated_engine)
    sessions = make_session_factory(migrated_engine)
    store_policy(sessions, policy_document({"release": release_key},
                                           {f"{registry.host}/donkeycar/*": ["release"]}))
    yield Cluster(app, app.test_client(), sessions, registry, release_key)


def gate(cluster: Cluster, image: str, selector: dict[str, Any],
         fraction: float = 1.0) -> dict[str, Any]:
    response = cluster.client.post("/v1/gate", json={
        "image": image, "selector": selector, "min_trusted_fraction": fraction})
    assert response.status_code == 200, response.get_json()
    decision = response.get_json()
    uuid.UUID(decision["decision_id"])
    return decision


def reason_codes(decision: dict[str, Any]) -> list[str]:
    return [reason["code"] for reason in decision["reasons"]]


# --- decisions ---


def test_signed_image_trusted_devices_allowed(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")
    cluster.add_device("car-2", "trusted")

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1", "car-2"]})

    assert decision["allowed"] is True
    assert decision["reasons"] == []
    assert decision["trusted"] == 2
    assert decision["matched"] == 2
    assert decision["image"]["allowed"] is True
    assert decision["image"]["digest"] == image.digest
    assert decision["image"]["key"] == "release"
    assert [d["device_id"] for d in decision["devices"]] == ["car-1", "car-2"]
    assert all(d["status"] == "trusted" for d in decision["devices"])


def test_fraction_at_minimum_allowed(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")
    cluster.add_device("car-2", "trusted")
    cluster.add_device("car-3", "untrusted")

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1", "car-2", "car-3"]}, 0.6)

    assert decision["allowed"] is True
    assert decision["trusted_fraction"] == pytest.approx(2 / 3)


def test_fraction_below_minimum_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")
    cluster.add_device("car-2", "trusted")
    cluster.add_device("car-3", "untrusted",
                       reasons=[Reason("quote-signature-invalid", "the quote does not verify")])

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1", "car-2", "car-3"]}, 0.7)

    assert decision["allowed"] is False
    assert reason_codes(decision) == ["trusted-fraction-too-low"]
    assert "not trusted: car-3" in decision["reasons"][0]["message"]
    untrusted = decision["devices"][2]
    assert untrusted["status"] == "untrusted"
    assert untrusted["reasons"] == [{"code": "quote-signature-invalid",
                                     "message": "the quote does not verify"}]


@pytest.mark.parametrize(("status", "code"), [("unknown", None), ("never", "not-attested-yet"),
                                              (None, "verifier-device-not-found")])
def test_not_attested_devices_unknown(cluster: Cluster, status: str | None,
                                      code: str | None) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", status)

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert decision["allowed"] is False
    assert decision["devices"][0]["status"] == "unknown"
    if code is not None:
        assert decision["devices"][0]["reasons"][0]["code"] == code


def test_unregistered_device_unknown(cluster: Cluster) -> None:
    image = cluster.signed_image()

    decision = gate(cluster, image.pinned, {"device_ids": ["ghost"]}, 0.0)

    assert decision["allowed"] is True
    assert decision["devices"][0]["status"] == "unknown"
    assert decision["devices"][0]["reasons"][0]["code"] == "verifier-device-not-found"


def test_expired_verdict_not_trusted(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted", expires_in=-1)

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert decision["allowed"] is False
    assert decision["devices"][0]["status"] == "unknown"
    assert decision["devices"][0]["reasons"][0]["code"] == "verdict-expired"


def test_inconsistent_stored_verdict_unknown(cluster: Cluster) -> None:
    from sqlalchemy import update

    from edgetrust.db import transaction
    from verifier.models import VerifierDevice

    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")
    with transaction(cluster.sessions) as session:
        session.execute(update(VerifierDevice).values(verdict_expires_at=None))

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert decision["allowed"] is False
    assert decision["devices"][0]["status"] == "unknown"
    assert decision["devices"][0]["reasons"][0]["code"] == "verdict-invalid"


def test_unsigned_image_denied(cluster: Cluster) -> None:
    image = cluster.registry.push_image(CAR)
    cluster.add_device("car-1", "trusted")

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert decision["allowed"] is False
    assert reason_codes(decision) == ["image-signature-missing"]
    assert decision["image"]["allowed"] is False
    assert decision["image"]["code"] == "image-signature-missing"


def test_tag_only_image_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")

    decision = gate(cluster, image.tagged, {"device_ids": ["car-1"]})

    assert reason_codes(decision) == ["image-not-pinned"]


def test_image_and_fraction_both_reported(cluster: Cluster) -> None:
    image = cluster.registry.push_image(CAR)
    cluster.add_device("car-1", "untrusted")

    decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert reason_codes(decision) == ["image-signature-missing", "trusted-fraction-too-low"]


def test_nodes_selector_maps_devices(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted", node="node-1")
    cluster.add_device("car-2", "trusted", node="node-2")

    decision = gate(cluster, image.pinned, {"nodes": ["node-2", "node-1", "node-9"]}, 0.5)

    assert decision["allowed"] is True
    assert [(d["node"], d["device_id"], d["status"]) for d in decision["devices"]] == [
        ("node-2", "car-2", "trusted"), ("node-1", "car-1", "trusted"),
        ("node-9", None, "unknown")]
    assert decision["devices"][2]["reasons"][0]["code"] == "node-not-mapped"


def test_labels_selector_matches_nodes(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted", node="node-1", labels={"fleet": "track", "zone": "a"})
    cluster.add_device("car-2", "untrusted", node="node-2", labels={"fleet": "track", "zone": "b"})
    cluster.add_device("car-3", "untrusted", node="node-3", labels={"fleet": "garage"})

    track = gate(cluster, image.pinned, {"labels": {"fleet": "track"}}, 0.5)
    zone_a = gate(cluster, image.pinned, {"labels": {"fleet": "track", "zone": "a"}})

    assert track["allowed"] is True
    assert [d["device_id"] for d in track["devices"]] == ["car-1", "car-2"]
    assert zone_a["allowed"] is True
    assert [d["device_id"] for d in zone_a["devices"]] == ["car-1"]


def test_no_matching_device_denied(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted", node="node-1", labels={"fleet": "track"})

    decision = gate(cluster, image.pinned, {"labels": {"fleet": "moon"}}, 0.0)

    assert decision["allowed"] is False
    assert reason_codes(decision) == ["no-devices-matched"]
    assert decision["devices"] == []


def test_decision_logged_with_id(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")

    with caplog.at_level(logging.INFO, logger="verifier.gate"):
        decision = gate(cluster, image.pinned, {"device_ids": ["car-1"]})

    assert f"decision_id={decision['decision_id']}" in caplog.text
    assert "gate allowed" in caplog.text


# --- invalid requests ---


@pytest.fixture
def client(tmp_path: Path) -> Any:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    return create_app(settings).test_client()


IMAGE = "registry.example/donkeycar/car@sha256:" + "a" * 64
VALID = {"image": IMAGE, "selector": {"device_ids": ["car-1"]}, "min_trusted_fraction": 0.5}


@pytest.mark.parametrize(("change", "field"), [
    ({"image": ""}, "image"),
    ({"image": 7}, "image"),
    ({"min_trusted_fraction": 1.5}, "min_trusted_fraction"),
    ({"min_trusted_fraction": -0.1}, "min_trusted_fraction"),
    ({"min_trusted_fraction": "0.5"}, "min_trusted_fraction"),
    ({"min_trusted_fraction": True}, "min_trusted_fraction"),
    ({"selector": None}, "selector"),
    ({"selector": {}}, "selector"),
    ({"selector": {"device_ids": ["a"], "nodes": ["b"]}}, "selector"),
    ({"selector": {"pods": ["a"]}}, "selector"),
    ({"selector": {"device_ids": []}}, "selector.device_ids"),
    ({"selector": {"device_ids": "car-1"}}, "selector.device_ids"),
    ({"selector": {"nodes": [""]}}, "selector.nodes"),
    ({"selector": {"labels": {}}}, "selector.labels"),
    ({"selector": {"labels": {"fleet": 1}}}, "selector.labels"),
])
def test_invalid_request_rejected(client: Any, change: dict[str, Any], field: str) -> None:
    response = client.post("/v1/gate", json={**VALID, **change})

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "gate-request-invalid"
    assert error["field"] == field


# --- the edgetrust gate command ---


def run_gate(*args: str) -> Any:
    return CliRunner().invoke(main, ["gate", *args])


def test_command_allowed_exits_zero(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")

    with serving(cluster.app) as server:
        result = run_gate("--server", server.url, "--image", image.pinned, "--device", "car-1",
                          "--min-trusted-fraction", "1.0", "--token", "unused")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("allowed: 1 of 1 targets trusted")
    assert "signed by key 'release'" in result.stdout


def test_command_denied_prints_reasons(cluster: Cluster) -> None:
    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted")
    cluster.add_device("car-2", "untrusted",
                       reasons=[Reason("ima-digest-not-allowed", "/usr/bin/evil is not allowed")])

    with serving(cluster.app) as server:
        result = run_gate("--server", server.url, "--image", image.pinned, "--device", "car-1",
                          "--device", "car-2", "--min-trusted-fraction", "0.9")

    assert result.exit_code == 1
    assert result.stdout.startswith("denied: 1 of 2 targets trusted")
    assert "trusted-fraction-too-low" in result.stdout
    assert ("device car-2 is untrusted: ima-digest-not-allowed: /usr/bin/evil is not allowed"
            in result.stdout)


def test_command_json_output(cluster: Cluster) -> None:
    import json

    image = cluster.signed_image()
    cluster.add_device("car-1", "trusted", node="node-1", labels={"fleet": "track"})

    with serving(cluster.app) as server:
        result = run_gate("--server", server.url, "--image", image.pinned, "--label",
                          "fleet=track", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["devices"][0]["node"] == "node-1"


def test_command_server_unreachable() -> None:
    result = run_gate("--server", f"http://127.0.0.1:{closed_port()}", "--image", IMAGE,
                      "--device", "car-1")

    assert result.exit_code == 2
    assert "cannot reach" in result.stderr


def test_command_bad_request_no_decision(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    with serving(create_app(settings)) as server:
        result = run_gate("--server", server.url, "--image", " ", "--device", "car-1")

    assert result.exit_code == 2
    assert "HTTP 400: gate-request-invalid" in result.stderr


@pytest.mark.parametrize("targets", [[], ["--device", "a", "--node", "b"], ["--label", "fleet"]])
def test_command_selector_usage_error(targets: list[str]) -> None:
    result = run_gate("--server", "http://127.0.0.1:1", "--image", "x", *targets)

    assert result.exit_code == 2
    assert "Error:" in result.output
