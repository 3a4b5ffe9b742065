"""A small fake of the Kubernetes API server's node routes, served on 127.0.0.1.

It serves the requests the node controller makes, as the ``kubernetes`` client sends them:

- ``GET /api/v1/nodes`` (a NodeList) and ``GET /api/v1/nodes/{name}``;
- ``PATCH /api/v1/nodes/{name}`` with a JSON patch (``application/json-patch+json``, RFC 6902:
  add, replace, remove, test) or a merge patch (``application/merge-patch+json``, RFC 7386).

Every change increments the node's ``metadata.resourceVersion``. A JSON patch whose ``test``
fails is answered 422 with a Status object. Requests need ``Authorization: Bearer <token>``
when a token is set. ``fail_next(count, status)`` makes the next requests fail, to test retries.
Strategic merge patches are not implemented, because the controller does not send them.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PREFIX = "/api/v1/nodes"


class PatchFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RecordedRequest:
    method: str
    path: str
    content_type: str | None
    body: Any


class FakeKubernetes:
    """Node objects and the requests made to them; thread-safe."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[RecordedRequest] = []
        self._nodes: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- test controls ---

    def add_node(self, name: str, labels: dict[str, str] | None = None,
                 taints: list[dict[str, Any]] | None = None) -> None:
        with self._lock:
            node: dict[str, Any] = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": self._next_version()},
                "spec": {},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
            if labels is not None:
                node["metadata"]["labels"] = dict(labels)
            if taints is not None:
                node["spec"]["taints"] = list(taints)
            self._nodes[name] = node

    def node(self, name: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._nodes[name])

    def set_taints(self, name: str, taints: list[dict[str, Any]]) -> None:
        """Change a node's taints as another client would, with a new resourceVersion."""
        with self._lock:
            self._nodes[name]["spec"]["taints"] = list(taints)
            self._nodes[name]["metadata"]["resourceVersion"] = self._next_version()

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def patches(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "PATCH"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # --- request handling ---

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def handle(self, method: str, path: str, headers: dict[str, str],
               raw: bytes) -> tuple[int, dict[str, Any]]:
        content_type = headers.get("content-type")
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(RecordedRequest(method, path, content_type, body))
            if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized")
            if self._failures:
                return _status(self._failures.pop(0), "injected failure")
            return self._route(method, path.split("?")[0], content_type, body)

    def _route(self, method: str, path: str, content_type: str | None,
               body: Any) -> tuple[int, dict[str, Any]]:
        if path == _PREFIX and method == "GET":
            items = [copy.deepcopy(node) for _, node in sorted(self._nodes.items())]
            return 200, {"apiVersion": "v1", "kind": "NodeList",
                         "metadata": {"resourceVersion": str(self._version)}, "items": items}
        if not path.startswith(_PREFIX + "/"):
            return _status(404, f"no route for {method} {path}")
        name = path[len(_PREFIX) + 1:]
        node = self._nodes.get(name)
        if node is None:
            return _status(404, f'nodes "{name}" not found')
        if method == "GET":
            return 200, copy.deepcopy(node)
        if method == "PATCH":
            return self._patch(node, content_type, body)
        return _status(405, f"method {method} not allowed")

    def _patch(self, node: dict[str, Any], content_type: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        try:
            if content_type == "application/json-patch+json":
                patched = apply_json_patch(node, body)
            elif content_type == "application/merge-patch+json":
                patched = apply_merge_patch(node, body)
            else:
                return _status(415, f"content type {content_type} is not supported by the fake")
        except PatchFailed as error:
            return _status(error.status, error.message)
        patched["metadata"]["resourceVersion"] = self._next_version()
        self._nodes[node["metadata"]["name"]] = patched
        return 200, copy.deepcopy(patched)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, body = fake.handle(self.command, self.path, headers, raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _serve  # noqa: N815 - http.server's handler names
            do_PATCH = _serve  # noqa: N815 - http.server's handler names

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
                pass

        return Handler


def _status(code: int, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message,
                  "reason": HTTPStatus(code).phrase.replace(" ", ""), "code": code}


# --- patches ------------------------------------------------------------------------------------


def _tokens(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise PatchFailed(422, f"invalid JSON pointer {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _parent(document: Any, tokens: list[str]) -> Any:
    target = document
    for token in tokens[:-1]:
        if isinstance(target, list):
            target = target[int(token)]
        elif isinstance(target, dict) and token in target:
            target = target[token]
        else:
            raise PatchFailed(422, f"path /{'/'.join(tokens)} does not exist")
    return target


def apply_json_patch(document: dict[str, Any], operations: Any) -> dict[str, Any]:
    """Apply an RFC 6902 JSON patch (add, replace, remove, test) to a copy of ``document``."""
    if not isinstance(operations, list):
        raise PatchFailed(400, "a JSON patch is a list of operations")
    result = copy.deepcopy(document)
    for operation in operations:
        tokens = _tokens(operation["path"])
        parent = _parent(result, tokens)
        key: Any = tokens[-1]
        if isinstance(parent, list):
            key = len(parent) if key == "-" else int(key)
        op = operation["op"]
        if op == "test":
            current = parent[key] if (isinstance(parent, dict) and key in parent) or \
                (isinstance(parent, list) and key < len(parent)) else None
            if current != operation.get("value"):
                raise PatchFailed(422, f"test of {operation['path']} failed: found {current!r}")
        elif op == "add":
            if isinstance(parent, list):
                parent.insert(key, operation["value"])
            else:
                parent[key] = operation["value"]
        elif op == "replace":
            if isinstance(parent, dict) and key not in parent:
                raise PatchFailed(422, f"path {operation['path']} does not exist")
            parent[key] = operation["value"]
        elif op == "remove":
            if isinstance(parent, dict) and key not in parent:
                raise PatchFailed(422, f"path {operation['path']} does not exist")
            del parent[key]
        else:
            raise PatchFailed(400, f"operation {op!r} is not supported by the fake")
    return result


def apply_merge_patch(document: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(document) if isinstance(document, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


@contextmanager
def fake_kubernetes(token: str | None = None) -> Iterator[FakeKubernetes]:
    """Serve a FakeKubernetes on 127.0.0.1 for the duration of the block."""
    fake = FakeKubernetes(token)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
