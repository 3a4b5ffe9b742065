"""The node controller against a fake Kubernetes API server and a real trust API, on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubernetes.client.exceptions import ApiException
from sqlalchemy import Engine

from edgetrust.cli import main
from edgetrust.db import make_engine, upgrade
from edgetrust.settings import Settings
from tests.support.fake_kubernetes import FakeKubernetes, fake_kubernetes
from tests.support.server import ServerThread, serving
from tests.verifier.test_trust_api import TrustEnv, add_device, make_trust_env, map_node, set_verdict
from verifier.node_controller import (
    TRUSTED_LABEL,
    UNTRUSTED_TAINT_KEY,
    ControllerOptions,
    NodeController,
    NodeVerdict,
    StreamWaker,
    TrustClient,
    desired_trust,
    kube_core_api,
    node_patch,
)

KUBE_TOKEN = "kube-test-token"
OTHER_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}


@dataclass
class Cluster:
    env: TrustEnv
    server: ServerThread
    kube: FakeKubernetes
    controller: NodeController
    settings: Settings

    def label(self, node: str) -> str | None:
        labels: dict[str, str] = self.kube.node(node)["metadata"].get("labels") or {}
        return labels.get(TRUSTED_LABEL)

    def tainted(self, node: str) -> bool:
        taints = self.kube.node(node)["spec"].get("taints") or []
        return any(taint["key"] == UNTRUSTED_TAINT_KEY and taint["effect"] == "NoExecute" for taint in taints)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def cluster(engine: Engine, tmp_path: Path) -> Iterator[Cluster]:
    env = make_trust_env(engine, tmp_path, trust_stream_poll_interval=0.05, trust_stream_heartbeat=0.3)
    token_file = tmp_path / "kube-token"
    token_file.write_text(KUBE_TOKEN + "\n")
    with serving(env.app) as server, fake_kubernetes(KUBE_TOKEN) as kube:
        settings = env.settings.replace(nodes_kube_api_url=kube.url, nodes_kube_token_file=token_file,
                                        nodes_trust_api_url=server.url)
        controller = NodeController(kube_core_api(settings), TrustClient(server.url, env.read_token),
                                    ControllerOptions(interval=0.2, backoff_initial=0.05, backoff_max=0.2))
        yield Cluster(env, server, kube, controller, settings)


def fleet(cluster: Cluster) -> None:
    """Two cars on two nodes, and a control-plane node that is not edgetrust's."""
    for number in (1, 2):
        add_device(cluster.env.sessions, f"car-{number}")
        map_node(cluster.env.sessions, f"node-{number}", f"car-{number}")
        cluster.kube.add_node(f"node-{number}", labels={"kubernetes.io/hostname": f"node-{number}"})
    cluster.kube.add_node("control-plane", taints=[OTHER_TAINT])


# --- labels and taints follow verdicts ----------------------------------------------------------


def test_trusted_untrusted_and_expired(cluster: Cluster) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=1.0)
    set_verdict(cluster.env.sessions, "car-2", "trusted", expires_in=60)

    first = cluster.controller.reconcile_once()
    trusted = (cluster.label("node-1"), cluster.tainted("node-1"))

    set_verdict(cluster.env.sessions, "car-2", "untrusted", codes=("ima-digest-not-allowed",))
    cluster.controller.reconcile_once()
    untrusted = (cluster.label("node-2"), cluster.tainted("node-2"))

    time.sleep(1.1)
    cluster.controller.reconcile_once()
    expired = (cluster.label("node-1"), cluster.tainted("node-1"))

    assert first.patched == 2
    assert first.skipped == 1
    assert trusted == ("true", False)
    assert untrusted == ("false", True)
    assert expired == ("false", True)
    assert cluster.kube.node("node-1")["metadata"]["labels"]["kubernetes.io/hostname"] == "node-1"
    assert cluster.kube.node("control-plane")["spec"]["taints"] == [OTHER_TAINT]
    assert "labels" not in cluster.kube.node("control-plane")["metadata"]


def test_trust_restored_removes_only_our_taint(cluster: Cluster) -> None:
    fleet(cluster)
    cluster.kube.set_taints("node-1", [OTHER_TAINT])
    cluster.controller.reconcile_once()
    tainted = cluster.kube.node("node-1")["spec"]["taints"]

    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=60)
    cluster.controller.reconcile_once()

    assert tainted == [OTHER_TAINT, {"key": UNTRUSTED_TAINT_KEY, "effect": "NoExecute"}]
    assert cluster.kube.node("node-1")["spec"]["taints"] == [OTHER_TAINT]
    assert cluster.label("node-1") == "true"


def test_pass_without_changes_sends_no_patch(cluster: Cluster) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=60)
    cluster.controller.reconcile_once()
    patches = len(cluster.kube.patches())

    report = cluster.controller.reconcile_once()

    assert patches == 2
    assert report.patched == 0
    assert report.unchanged == 2
    assert len(cluster.kube.patches()) == patches


def test_patches_are_json_patches_guarded_by_resource_version(cluster: Cluster) -> None:
    fleet(cluster)
    version = cluster.kube.node("node-1")["metadata"]["resourceVersion"]

    cluster.controller.reconcile_once()

    patch = next(p for p in cluster.kube.patches() if p.path.endswith("/node-1"))
    assert patch.content_type == "application/json-patch+json"
    assert patch.body[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": version}


def test_unmapped_node_with_label_is_untrusted(cluster: Cluster) -> None:
    fleet(cluster)
    cluster.kube.add_node("node-old", labels={TRUSTED_LABEL: "true"})

    cluster.controller.reconcile_once()

    assert cluster.label("node-old") == "false"
    assert cluster.tainted("node-old")


# --- failures -----------------------------------------------------------------------------------


def test_kube_failure_is_retried(cluster: Cluster) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=60)
    cluster.kube.fail_next(1, 500)

    with pytest.raises(ApiException):
        cluster.controller.reconcile_once()
    report = cluster.controller.reconcile_once()

    assert report.ok
    assert cluster.label("node-1") == "true"


def test_patch_failure_counts_and_recovers(cluster: Cluster) -> None:
    fleet(cluster)
    original_list = cluster.controller._core.list_node  # noqa: SLF001 - to fail between list and patch

    def list_then_fail(*args: Any, **kwargs: Any) -> Any:
        nodes = original_list(*args, **kwargs)
        cluster.kube.fail_next(1, 503)
        return nodes

    cluster.controller._core.list_node = list_then_fail  # type: ignore[method-assign] # noqa: SLF001
    failed = cluster.controller.reconcile_once()
    cluster.controller._core.list_node = original_list  # type: ignore[method-assign] # noqa: SLF001
    recovered = cluster.controller.reconcile_once()

    assert failed.failed == 1
    assert not failed.ok
    assert recovered.ok
    assert cluster.tainted("node-1")
    assert cluster.tainted("node-2")


def test_stale_patch_is_rejected(cluster: Cluster) -> None:
    fleet(cluster)
    stale = cluster.kube.node("node-1")
    cluster.kube.set_taints("node-1", [OTHER_TAINT])

    with pytest.raises(ApiException) as raised:
        cluster.controller._core.patch_node(  # noqa: SLF001
            "node-1", node_patch(stale, False), _content_type="application/json-patch+json")

    assert raised.value.status == 422
    assert cluster.kube.node("node-1")["spec"]["taints"] == [OTHER_TAINT]


def test_trust_api_down_uses_last_verdicts_until_expiry(cluster: Cluster) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=1.5)
    cluster.controller.reconcile_once()
    cluster.controller.trust.base_url = "http://127.0.0.1:9"

    before = cluster.controller.reconcile_once()
    label_before = cluster.label("node-1")
    time.sleep(1.6)
    after = cluster.controller.reconcile_once()

    assert before.trust_api_failed
    assert label_before == "true"
    assert after.trust_api_failed
    assert cluster.label("node-1") == "false"
    assert cluster.tainted("node-1")


def test_kube_api_needs_the_token(cluster: Cluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    core = kube_core_api(cluster.settings.replace(nodes_kube_token_file=wrong))

    with pytest.raises(ApiException) as raised:
        core.list_node()

    assert raised.value.status == 401


# --- the loop -----------------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_run_retries_with_backoff(cluster: Cluster) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=60)
    cluster.kube.fail_next(3, 500)
    stop = threading.Event()
    thread = threading.Thread(target=cluster.controller.run, args=(stop,))

    thread.start()
    try:
        converged = wait_until(lambda: cluster.label("node-1") == "true")
    finally:
        stop.set()
        cluster.controller.wake.set()
        thread.join(timeout=10)

    assert converged
    assert not thread.is_alive()


def test_run_follows_the_verdict_stream(cluster: Cluster) -> None:
    fleet(cluster)
    slow = NodeController(cluster.controller._core, cluster.controller.trust,  # noqa: SLF001
                          ControllerOptions(interval=60.0))
    stop = threading.Event()
    waker = StreamWaker(slow.trust, slow.wake, stop, backoff_max=1.0)
    threads = [threading.Thread(target=slow.run, args=(stop,)),
               threading.Thread(target=waker.run, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        first_pass = wait_until(lambda: cluster.label("node-1") == "false")
        time.sleep(0.5)
        set_verdict(cluster.env.sessions, "car-1", "trusted", expires_in=60)
        followed = wait_until(lambda: cluster.label("node-1") == "true", timeout=5.0)
    finally:
        stop.set()
        slow.wake.set()
        threads[0].join(timeout=10)

    assert first_pass
    assert followed


# --- pure functions and the command -------------------------------------------------------------


def test_desired_trust_rules() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    trusted = NodeVerdict("n", True, "trusted", now + timedelta(seconds=5))
    stale = NodeVerdict("n", True, "trusted", now - timedelta(seconds=1))
    unmapped = NodeVerdict("n", False, "unknown", None)

    assert desired_trust({}, trusted, now) is True
    assert desired_trust({}, stale, now) is False
    assert desired_trust({}, unmapped, now) is None
    assert desired_trust({TRUSTED_LABEL: "true"}, unmapped, now) is False
    assert desired_trust({TRUSTED_LABEL: "true"}, None, now) is False
    assert desired_trust({}, None, now) is None


def test_node_patch_creates_labels_map() -> None:
    node = {"metadata": {"name": "n", "resourceVersion": "7"}, "spec": {}}

    patch = node_patch(node, False)

    assert patch == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "add", "path": "/metadata/labels", "value": {TRUSTED_LABEL: "false"}},
        {"op": "add", "path": "/spec/taints", "value": [{"key": UNTRUSTED_TAINT_KEY, "effect": "NoExecute"}]},
    ]


def test_node_patch_escapes_label_key() -> None:
    node = {"metadata": {"name": "n", "resourceVersion": "7", "labels": {}}, "spec": {}}

    patch = node_patch(node, True)

    assert patch[1]["path"] == "/metadata/labels/node-restriction.kubernetes.io~1edgetrust-trusted"


def test_sync_command(cluster: Cluster, tmp_path: Path) -> None:
    fleet(cluster)
    set_verdict(cluster.env.sessions, "car-2", "trusted", expires_in=60)
    trust_token = tmp_path / "trust-token"
    trust_token.write_text(cluster.env.read_token)
    env = {"EDGETRUST_DATA_DIR": str(tmp_path), "EDGETRUST_NODES_KUBE_API_URL": cluster.kube.url,
           "EDGETRUST_NODES_KUBE_TOKEN_FILE": str(cluster.settings.nodes_kube_token_file),
           "EDGETRUST_NODES_TRUST_API_URL": cluster.server.url,
           "EDGETRUST_NODES_TRUST_TOKEN_FILE": str(trust_token)}

    result = CliRunner().invoke(main, ["nodes", "sync"], env=env)

    assert result.exit_code == 0, result.output
    assert "patched 2" in result.output
    assert cluster.label("node-2") == "true"
    assert cluster.label("node-1") == "false"


def test_sync_command_fails_without_trust_token(cluster: Cluster, tmp_path: Path) -> None:
    fleet(cluster)
    env = {"EDGETRUST_DATA_DIR": str(tmp_path), "EDGETRUST_NODES_KUBE_API_URL": cluster.kube.url,
           "EDGETRUST_NODES_KUBE_TOKEN_FILE": str(cluster.settings.nodes_kube_token_file),
           "EDGETRUST_NODES_TRUST_API_URL": cluster.server.url}

    result = CliRunner().invoke(main, ["nodes", "sync"], env=env)

    assert result.exit_code == 1
    assert "trust API could not be read" in result.output
