"""Admin routes for the Kubernetes node → device mapping that admission and the trust API use.

``PUT /v1/nodes/{name}`` with ``{"device_id": ..., "labels": {...}}`` maps a node,
``GET /v1/nodes`` and ``GET /v1/nodes/{name}`` show mappings, ``DELETE /v1/nodes/{name}``
removes one. edgetrust.auth requires the admin scope for all of them.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, jsonify
from sqlalchemy import select

from edgetrust.context import AppServices, services
from edgetrust.db import transaction
from edgetrust.web import RequestError, json_body, require_str
from verifier.nodes import Node, NodeError, check_node_name, delete_node, set_node

blueprint = Blueprint("nodes", __name__)


def install(app: Flask, _services: AppServices) -> tuple[type[Exception], ...]:
    """Add the node mapping routes to ``app`` and return their error classes."""
    app.register_blueprint(blueprint)
    return (NodeError,)


def _node_json(node: Node) -> dict[str, Any]:
    return {
        "node": node.node_name,
        "device_id": node.device_id,
        "labels": dict(node.labels),
        "created_at": node.created_at.isoformat(),
        "updated_at": node.updated_at.isoformat(),
    }


@blueprint.put("/v1/nodes/<name>")
def put_node(name: str) -> Response:
    node_name = check_node_name(name)
    body = json_body()
    device_id = require_str(body, "device_id")
    assert device_id is not None
    labels = body.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in labels.items()
    ):
        raise RequestError("invalid-field", "field 'labels' must be an object of strings",
                           field="labels")

    with transaction(services().sessions) as session:
        node = set_node(session, node_name, device_id, labels)
        result = _node_json(node)

    return jsonify(result)


@blueprint.get("/v1/nodes")
def list_nodes() -> Response:
    with services().sessions() as session:
        nodes = session.scalars(select(Node).order_by(Node.node_name)).all()
        return jsonify({"nodes": [_node_json(node) for node in nodes]})


@blueprint.get("/v1/nodes/<name>")
def show_node(name: str) -> Response:
    node_name = check_node_name(name)
    with services().sessions() as session:
        node = session.get(Node, node_name)
        if node is None:
            raise NodeError(f"node {node_name!r} is not mapped to a device", code="node-not-found",
                            field="node")
        return jsonify(_node_json(node))


@blueprint.delete("/v1/nodes/<name>")
def remove_node(name: str) -> Response:
    node_name = check_node_name(name)
    with transaction(services().sessions) as session:
        removed = delete_node(session, node_name)
    if not removed:
        raise NodeError(f"node {node_name!r} is not mapped to a device", code="node-not-found",
                        field="node")
    return jsonify({"node": node_name, "deleted": True})
