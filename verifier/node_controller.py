"""Node controller: keep each mapped Kubernetes node's trust label and taint in line with verdicts.

For every node the trust API maps to a device, the controller keeps

- the label ``node-restriction.kubernetes.io/edgetrust-trusted`` at ``"true"`` or ``"false"``
  (kubelets cannot set labels under ``node-restriction.kubernetes.io/``, so a compromised
  node cannot mark itself trusted), and
- the taint ``edgetrust.io/untrusted:NoExecute`` on every node whose device is not trusted,
  which evicts pods that do not tolerate it.

One pass lists the nodes, reads their verdicts with ``POST /v1/verdicts:batch`` and patches
each node whose label or taint differs, so a pass that changes nothing sends no patch. Passes
run every ``nodes_interval`` seconds, which also catches verdicts that expire without a new
attestation, and at once after any event on the trust API's verdict stream.

Failing closed: a node that carries the label but is no longer mapped, or whose verdict is not
known, is marked untrusted. When the trust API cannot be reached, the verdicts of the last
pass are used and a trusted one turns untrusted at its ``expires_at``. After a failure of the
Kubernetes API server or the trust API the next pass comes after a delay that starts at 1 s
and doubles up to ``nodes_backoff_max``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import requests
from kubernetes import client as kube
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from edgetrust.settings import Settings, SettingsError

log = logging.getLogger(__name__)

TRUSTED_LABEL: Final = "node-restriction.kubernetes.io/edgetrust-trusted"
UNTRUSTED_TAINT_KEY: Final = "edgetrust.io/untrusted"
UNTRUSTED_TAINT_EFFECT: Final = "NoExecute"
JSON_PATCH: Final = "application/json-patch+json"
NODE_NOT_MAPPED: Final = "node-not-mapped"
# Node names per batch request; below the server's default trust_batch_max_items.
BATCH_SIZE: Final = 500
REQUEST_TIMEOUT: Final = 10.0
# Maximum wait for a stream line, in seconds. The server sends a heartbeat every 15 s by default.
STREAM_READ_TIMEOUT: Final = 60.0


class TrustApiError(Exception):
    """The trust API could not be reached or returned an error."""


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeVerdict:
    """The verdict of the device on a node, as the trust API returned it."""

    node: str
    mapped: bool
    status: str
    expires_at: datetime | None

    def trusted_at(self, now: datetime) -> bool:
        return self.status == "trusted" and self.expires_at is not None and now < self.expires_at

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeVerdict:
        codes = {reason.get("code") for reason in data.get("reasons") or []}
        expires = data.get("expires_at")
        return cls(
            node=str(data["node"]),
            mapped=NODE_NOT_MAPPED not in codes,
            status=str(data["status"]),
            expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
        )


class TrustClient:
    """Read node verdicts from the trust API with a read token."""

    def __init__(self, base_url: str, token: str | None, *, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session or requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def node_verdicts(self, nodes: Sequence[str]) -> dict[str, NodeVerdict]:
        """Return the verdict of each node; raise TrustApiError if any request fails."""
        verdicts: dict[str, NodeVerdict] = {}
        for start in range(0, len(nodes), BATCH_SIZE):
            chunk = list(nodes[start:start + BATCH_SIZE])
            for item in self._batch(chunk):
                verdict = NodeVerdict.from_json(item)
                verdicts[verdict.node] = verdict
        return verdicts

    def _batch(self, nodes: list[str]) -> list[dict[str, Any]]:
        url = f"{self.base_url}/v1/verdicts:batch"
        try:
            response = self._session.post(url, json={"nodes": nodes}, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as error:
            raise TrustApiError(f"POST {url} failed: {error}") from None
        if response.status_code != 200:
            raise TrustApiError(f"POST {url} returned {response.status_code}: {response.text[:200]}")
        try:
            items = response.json()["verdicts"]
            if not isinstance(items, list):
                raise TypeError
            return items
        except (ValueError, KeyError, TypeError, RecursionError):
            raise TrustApiError(f"POST {url} returned a body without a list of verdicts") from None

    def stream_url(self) -> str:
        return f"{self.base_url}/v1/verdicts/stream"

    @property
    def session(self) -> requests.Session:
        return self._session


# --- desired state and patches ----------------------------------------------------------------


def desired_trust(labels: Mapping[str, str], verdict: NodeVerdict | None, now: datetime) -> bool | None:
    """Return whether the node should be marked trusted, or None to leave it alone.

    A node that is mapped gets its device's verdict. A node that carries the label but is not
    mapped, or whose verdict the controller does not have, is marked untrusted. Other nodes
    are not edgetrust's.
    """
    if verdict is not None and verdict.mapped:
        return verdict.trusted_at(now)
    if TRUSTED_LABEL in labels:
        return False
    return None


def node_patch(node: Mapping[str, Any], trusted: bool) -> list[dict[str, Any]]:
    """Return the JSON patch that gives ``node`` (a Node as JSON) the label and taint for
    ``trusted``, or an empty list when it has them already.

    The patch starts with a test of the node's resourceVersion, so it fails instead of
    overwriting taints that someone else changed since the node was read.
    """
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels")
    taints = list((node.get("spec") or {}).get("taints") or [])
    operations: list[dict[str, Any]] = []

    value = "true" if trusted else "false"
    if labels is None:
        operations.append({"op": "add", "path": "/metadata/labels", "value": {TRUSTED_LABEL: value}})
    elif labels.get(TRUSTED_LABEL) != value:
        operations.append({"op": "add", "path": "/metadata/labels/" + _pointer(TRUSTED_LABEL),
                           "value": value})

    wanted = _taints_for(taints, trusted)
    if wanted != taints:
        operations.append({"op": "add", "path": "/spec/taints", "value": wanted})

    if not operations:
        return []
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": metadata.get("resourceVersion")},
            *operations]


def _taints_for(taints: list[dict[str, Any]], trusted: bool) -> list[dict[str, Any]]:
    others = [taint for taint in taints if not _is_ours(taint)]
    if trusted:
        return others
    ours = [taint for taint in taints if _is_ours(taint) and taint.get("effect") == UNTRUSTED_TAINT_EFFECT]
    return others + (ours[:1] or [{"key": UNTRUSTED_TAINT_KEY, "effect": UNTRUSTED_TAINT_EFFECT}])


def _is_ours(taint: Mapping[str, Any]) -> bool:
    return taint.get("key") == UNTRUSTED_TAINT_KEY


def _pointer(key: str) -> str:
    """Escape ``key`` as one JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


# --- the controller ---------------------------------------------------------------------------


@dataclass
class PassReport:
    """Counts of one pass; ``ok`` is false when the pass should be retried after a backoff delay."""

    patched: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    trust_api_failed: bool = False

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.trust_api_failed


@dataclass(frozen=True)
class ControllerOptions:
    interval: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


class NodeController:
    """Reconcile node labels and taints with verdicts; see the module docstring."""

    def __init__(self, core: kube.CoreV1Api, trust: TrustClient, options: ControllerOptions, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._core = core
        self.trust = trust
        self.options = options
        self._clock = clock
        self._serializer = kube.ApiClient()
        # The verdicts of the last pass that reached the trust API, by node name.
        self._verdicts: dict[str, NodeVerdict] = {}
        self.wake = threading.Event()

    def reconcile_once(self) -> PassReport:
        """Run one pass over all nodes. Raises ApiException or HTTPError when the nodes cannot
        be listed."""
        report = PassReport()
        nodes = [self._as_json(node) for node in self._core.list_node().items]
        self._refresh_verdicts([node["metadata"]["name"] for node in nodes], report)

        now = self._clock()
        for node in nodes:
            self._reconcile_node(node, now, report)
        return report

    def _refresh_verdicts(self, names: list[str], report: PassReport) -> None:
        try:
            self._verdicts = self.trust.node_verdicts(names)
        except TrustApiError as error:
            report.trust_api_failed = True
            log.warning("cannot read verdicts, using those of the last pass until they expire: %s", error)

    def _reconcile_node(self, node: Mapping[str, Any], now: datetime, report: PassReport) -> None:
        name = node["metadata"]["name"]
        trusted = desired_trust(node["metadata"].get("labels") or {}, self._verdicts.get(name), now)
        if trusted is None:
            report.skipped += 1
            return
        patch = node_patch(node, trusted)
        if not patch:
            report.unchanged += 1
            return
        try:
            self._core.patch_node(name, patch, _content_type=JSON_PATCH)
        except (ApiException, HTTPError) as error:
            report.failed += 1
            log.warning("cannot patch node %s to %s; retrying: %s", name,
                        "trusted" if trusted else "untrusted", _describe(error))
            return
        report.patched += 1
        log.info("node %s marked %s", name, "trusted" if trusted else "untrusted (tainted NoExecute)")

    def _as_json(self, node: Any) -> dict[str, Any]:
        data: dict[str, Any] = self._serializer.sanitize_for_serialization(node)
        return data

    def run(self, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set; a pass also starts when ``wake`` is set."""
        log.info("node controller started: a pass every %.1f s, trust API %s", self.options.interval,
                 self.trust.base_url)
        failures = 0
        while not stop.is_set():
            failures = 0 if self._pass_safely() else failures + 1
            delay = self.options.interval if failures == 0 else min(
                self.options.backoff_initial * 2.0 ** (failures - 1), self.options.backoff_max)
            self.wake.wait(delay)
            self.wake.clear()
        log.info("node controller stopped")

    def _pass_safely(self) -> bool:
        try:
            report = self.reconcile_once()
        except (ApiException, HTTPError) as error:
            log.warning("cannot list nodes from the Kubernetes API server; retrying: %s", _describe(error))
            return False
        log.debug("pass: %s", report)
        return report.ok


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"status {error.status} {error.reason}"
    return f"{error.__class__.__name__}: {error}"


# --- following the verdict stream -------------------------------------------------------------


class StreamWaker:
    """Set ``wake`` on every event of the trust API's verdict stream, reconnecting on failure."""

    def __init__(self, trust: TrustClient, wake: threading.Event, stop: threading.Event,
                 backoff_max: float) -> None:
        self._trust = trust
        self._wake = wake
        self._stop = stop
        self._backoff_max = backoff_max
        self._last_event_id: str | None = None

    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._follow()
                failures = 0
            except requests.RequestException as error:
                failures += 1
                log.info("verdict stream interrupted; reconnecting: %s", error.__class__.__name__)
            self._stop.wait(min(2.0 ** failures, self._backoff_max))

    def _follow(self) -> None:
        headers = {"Accept": "text/event-stream"}
        if self._last_event_id is not None:
            headers["Last-Event-ID"] = self._last_event_id
        with self._trust.session.get(self._trust.stream_url(), headers=headers, stream=True,
                                     timeout=(REQUEST_TIMEOUT, STREAM_READ_TIMEOUT)) as response:
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if self._stop.is_set():
                    return
                if line.startswith("id:"):
                    self._last_event_id = line[3:].strip()
                elif line.startswith("event:"):
                    self._wake.set()


# --- construction from settings ---------------------------------------------------------------


def kube_core_api(settings: Settings) -> kube.CoreV1Api:
    """Return a CoreV1Api for ``nodes_kube_api_url``, or the in-cluster configuration."""
    if not settings.nodes_kube_api_url:
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException as error:
            raise SettingsError(f"setting nodes_kube_api_url is empty and the in-cluster "
                                f"configuration cannot be loaded ({error}); set the API server URL") from None
        return kube.CoreV1Api()
    configuration = kube.Configuration()
    configuration.host = settings.nodes_kube_api_url.rstrip("/")
    if settings.nodes_kube_token_file is not None:
        token = _read_secret(settings.nodes_kube_token_file, "nodes_kube_token_file")
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    if settings.nodes_kube_ca_file is not None:
        configuration.ssl_ca_cert = str(settings.nodes_kube_ca_file)
    return kube.CoreV1Api(kube.ApiClient(configuration))


def trust_client(settings: Settings) -> TrustClient:
    token = None
    if settings.nodes_trust_token_file is not None:
        token = _read_secret(settings.nodes_trust_token_file, "nodes_trust_token_file")
    return TrustClient(settings.nodes_trust_api_url, token)


def _read_secret(path: Path, setting: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise SettingsError(f"setting {setting}: cannot read {path}: {error.strerror}") from None

