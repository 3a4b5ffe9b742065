"""The Kubernetes manifests in deploy/ parse, and the admission webhook, the Deployments and
the CI/CD gate definitions have the fields edgetrust relies on."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgetrust.settings import Settings
from tests.conftest import REPO_ROOT

yaml = pytest.importorskip("yaml")

DEPLOY = REPO_ROOT / "deploy"
SYSTEM_NAMESPACES = {"kube-system", "kube-public", "kube-node-lease", "edgetrust"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def all_documents() -> list[dict[str, Any]]:
    return [document for path in sorted(DEPLOY.glob("*.yaml")) for document in documents(path)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def webhooks() -> dict[str, dict[str, Any]]:
    configuration = one("ValidatingWebhookConfiguration", "edgetrust-admission")
    return {webhook["name"]: webhook for webhook in configuration["webhooks"]}


def container_command(deployment: dict[str, Any], name: str) -> list[str]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c["command"] for c in containers if c["name"] == name)


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda path: path.name)
def test_manifest_parses(path: Path) -> None:
    found = documents(path)

    assert found, f"{path.name} has no documents"
    for document in found:
        assert isinstance(document.get("apiVersion"), str)
        assert isinstance(document.get("kind"), str)
        assert document["metadata"]["name"]


def test_webhook_fails_closed() -> None:
    for name, webhook in webhooks().items():
        assert webhook["failurePolicy"] == "Fail", name
        assert webhook["sideEffects"] == "None", name
        assert webhook["admissionReviewVersions"] == ["v1"], name
        assert webhook["clientConfig"]["service"]["path"] == "/v1/admission", name


def test_webhook_timeout_matches_setting() -> None:
    config = tomllib.loads(one("ConfigMap", "edgetrust-config")["data"]["edgetrust.toml"])

    for name, webhook in webhooks().items():
        assert 1 <= webhook["timeoutSeconds"] <= 30, name
        assert webhook["timeoutSeconds"] == config["admission_timeout"], name
    assert config["admission_timeout"] == Settings().admission_timeout


def test_webhook_rules_cover_pods_bindings_ephemeral() -> None:
    covered: set[tuple[str, str]] = set()
    for webhook in webhooks().values():
        for rule in webhook["rules"]:
            assert rule["apiGroups"] == [""]
            assert rule["apiVersions"] == ["v1"]
            covered.update((resource, operation) for resource in rule["resources"]
                           for operation in rule["operations"])

    assert covered == {("pods", "CREATE"), ("pods", "UPDATE"), ("pods/binding", "CREATE"),
                       ("pods/ephemeralcontainers", "UPDATE")}


def test_webhook_namespaces_opt_in() -> None:
    for name, webhook in webhooks().items():
        expressions = webhook["namespaceSelector"]["matchExpressions"]
        opt_in = [e for e in expressions if e["key"] == "edgetrust.io/admission"]
        excluded = [e for e in expressions if e["key"] == "kubernetes.io/metadata.name"]

        assert opt_in == [{"key": "edgetrust.io/admission", "operator": "In",
                           "values": ["enabled"]}], name
        assert len(excluded) == 1, name
        assert excluded[0]["operator"] == "NotIn", name
        assert set(excluded[0]["values"]) >= SYSTEM_NAMESPACES, name


def test_webhook_match_conditions() -> None:
    hooks = webhooks()

    for name, webhook in hooks.items():
        expressions = [condition["expression"] for condition in webhook["matchConditions"]]
        assert "!request.namespace.startsWith('openshift-')" in expressions, name
    pods = " ".join(c["expression"] for c in hooks["pods.admission.edgetrust.io"]["matchConditions"])
    assert "object.metadata.labels['app.kubernetes.io/part-of'] == 'donkeycar'" in pods


def test_webhook_ca_injected_from_certificate() -> None:
    configuration = one("ValidatingWebhookConfiguration", "edgetrust-admission")
    certificate = one("Certificate", "edgetrust-serving")
    service = one("Service", "edgetrust")

    annotation = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == "edgetrust/edgetrust-serving"
    assert "edgetrust.edgetrust.svc" in certificate["spec"]["dnsNames"]
    assert service["spec"]["ports"][0]["port"] == 443


def test_serve_and_poll_deployments() -> None:
    serve = one("Deployment", "edgetrust-serve")
    poll = one("Deployment", "edgetrust-poll")

    assert container_command(serve, "serve")[:2] == ["edgetrust", "serve"]
    assert container_command(poll, "poll") == ["edgetrust", "poll"]
    for deployment in (serve, poll):
        containers = deployment["spec"]["template"]["spec"]["containers"]
        environment = {e["name"]: e for c in containers for e in c.get("env", [])}
        reference = environment["EDGETRUST_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": "edgetrust-database", "key": "url"}


def test_database_secret_and_statefulset() -> None:
    secret = one("Secret", "edgetrust-database")
    postgres = one("StatefulSet", "edgetrust-postgres")

    assert secret["stringData"]["url"].startswith("postgresql+psycopg://")
    assert postgres["spec"]["replicas"] == 1


def test_config_settings_are_known() -> None:
    config = tomllib.loads(one("ConfigMap", "edgetrust-config")["data"]["edgetrust.toml"])
    known = set(Settings.__dataclass_fields__)

    assert set(config) <= known


def test_tekton_task_runs_gate() -> None:
    task = one("Task", "edgetrust-gate")

    script = task["spec"]["steps"][0]["script"]
    assert "exec edgetrust gate --image" in script
    assert "--min-trusted-fraction" in script
    assert {param["name"] for param in task["spec"]["params"]} >= {"image", "selector",
                                                                  "min-trusted-fraction"}


def test_analysis_template_runs_gate() -> None:
    template = one("AnalysisTemplate", "edgetrust-gate")

    job = template["spec"]["metrics"][0]["provider"]["job"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    assert container["command"] == ["edgetrust", "gate"]
    assert "{{args.image}}" in container["args"]
    assert job["backoffLimit"] == 0
    assert template["spec"]["metrics"][0]["failureLimit"] == 0
