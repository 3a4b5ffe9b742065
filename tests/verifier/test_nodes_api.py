"""The node → device mapping routes, over HTTP on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine

from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction, upgrade
from edgetrust.settings import Settings
from tests.support.server import ServerThread, serving
from tests.verifier.test_trust_api import add_device, set_verdict
from verifier.tokens import Scope, create_token


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[ServerThread, dict[str, dict[str, str]]]]:
    engine: Engine = make_engine(database_url)
    upgrade(engine)
    settings = Settings(data_dir=tmp_path, database_url=database_url, verifier_poll_in_server=False)
    app = create_app(settings, engine=engine)
    sessions = make_session_factory(engine)
    headers = {}
    with transaction(sessions) as session:
        for scope in (Scope.ADMIN, Scope.READ):
            _, token = create_token(session, f"{scope.value}-{uuid.uuid4().hex[:6]}", scope,
                                    now=datetime.now(UTC))
            headers[scope.value] = {"Authorization": f"Bearer {token}"}
    add_device(sessions, "car-1")
    add_device(sessions, "car-2")
    set_verdict(sessions, "car-1", "untrusted", codes=("ima-digest-not-allowed",))
    with serving(app) as running:
        yield running, headers
    engine.dispose()


def test_map_show_list_delete(server: tuple[ServerThread, dict[str, dict[str, str]]]) -> None:
    running, headers = server
    admin = headers["admin"]

    put = requests.put(f"{running.url}/v1/nodes/donkeycar-1", headers=admin,
                       json={"device_id": "car-1", "labels": {"zone": "track"}}, timeout=10)
    shown = requests.get(f"{running.url}/v1/nodes/donkeycar-1", headers=admin, timeout=10)
    listed = requests.get(f"{running.url}/v1/nodes", headers=admin, timeout=10)
    deleted = requests.delete(f"{running.url}/v1/nodes/donkeycar-1", headers=admin, timeout=10)
    gone = requests.get(f"{running.url}/v1/nodes/donkeycar-1", headers=admin, timeout=10)

    assert put.status_code == 200
    assert put.json()["device_id"] == "car-1"
    assert shown.json()["labels"] == {"zone": "track"}
    assert [node["node"] for node in listed.json()["nodes"]] == ["donkeycar-1"]
    assert deleted.status_code == 200
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "node-not-found"


def test_mapping_feeds_batch_verdicts(server: tuple[ServerThread, dict[str, dict[str, str]]]) -> None:
    running, headers = server
    requests.put(f"{running.url}/v1/nodes/donkeycar-1", headers=headers["admin"],
                 json={"device_id": "car-1"}, timeout=10)

    batch = requests.post(f"{running.url}/v1/verdicts:batch", headers=headers["read"],
                          json={"nodes": ["donkeycar-1"]}, timeout=10)

    assert batch.status_code == 200
    assert "untrusted" in batch.text


@pytest.mark.parametrize(
    ("node", "body", "status", "code"),
    [
        ("Bad_Name", {"device_id": "car-1"}, 400, "node-name-invalid"),
        ("donkeycar-1", {}, 400, "missing-field"),
        ("donkeycar-1", {"device_id": "car-1", "labels": ["x"]}, 400, "invalid-field"),
        ("donkeycar-1", {"device_id": "nobody"}, 404, "device-not-found"),
    ],
)
def test_bad_mapping_rejected(server: tuple[ServerThread, dict[str, dict[str, str]]], node: str,
                              body: dict[str, object], status: int, code: str) -> None:
    running, headers = server

    response = requests.put(f"{running.url}/v1/nodes/{node}", headers=headers["admin"], json=body,
                            timeout=10)

    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_device_on_two_nodes_rejected(server: tuple[ServerThread, dict[str, dict[str, str]]]) -> None:
    running, headers = server
    admin = headers["admin"]
    requests.put(f"{running.url}/v1/nodes/donkeycar-1", headers=admin, json={"device_id": "car-1"},
                 timeout=10)

    response = requests.put(f"{running.url}/v1/nodes/donkeycar-2", headers=admin,
                            json={"device_id": "car-1"}, timeout=10)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "device-on-other-node"


def test_read_token_cannot_map(server: tuple[ServerThread, dict[str, dict[str, str]]]) -> None:
    running, headers = server

    response = requests.put(f"{running.url}/v1/nodes/donkeycar-1", headers=headers["read"],
                            json={"device_id": "car-1"}, timeout=10)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
