"""``edgetrust gate``: ask the rollout gate of a server whether an image may be rolled out.

Meant for CI/CD steps (a Tekton task, an Argo Rollouts analysis): the exit status is the
decision. 0 means allowed, 1 means denied (the reasons are printed), and 2 means no decision
was made (a usage error, an unreachable server, an error status).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, NoReturn

import click
import requests

EXIT_ALLOWED: Final = 0
EXIT_DENIED: Final = 1
EXIT_NO_DECISION: Final = 2


@click.command("gate")
@click.option("--server", required=True, envvar="EDGETRUST_SERVER",
              help="Base URL of the edgetrust server, such as https://edgetrust.example:8890 "
              "(also $EDGETRUST_SERVER).")
@click.option("--image", required=True,
              help="Image reference pinned by digest: registry/path@sha256:<digest>.")
@click.option("--device", "devices", multiple=True, metavar="ID",
              help="Target device id; repeat for several.")
@click.option("--node", "nodes", multiple=True, metavar="NAME",
              help="Target Kubernetes node name; repeat for several.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE",
              help="Node label that every target node has; repeat for several.")
@click.option("--min-trusted-fraction", type=click.FloatRange(0.0, 1.0), default=1.0,
              show_default=True, help="Fraction of the targets, 0.0 to 1.0, that must be trusted.")
@click.option("--token", envvar="EDGETRUST_TOKEN",
              help="API token sent as a bearer token (also $EDGETRUST_TOKEN).")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM file of the CA certificates the server's TLS certificate chains to.")
@click.option("--timeout", type=click.FloatRange(min=1.0), default=60.0, show_default=True,
              help="Seconds to wait for the server's decision.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's decision as JSON.")
def gate_command(server: str, image: str, devices: tuple[str, ...], nodes: tuple[str, ...],
                 labels: tuple[str, ...], min_trusted_fraction: float, token: str | None,
                 ca_bundle: Path | None, timeout: float, as_json: bool) -> None:
    """Exit 0 only if the image is signed and enough target devices are trusted.

    Name the targets with --device, --node or --label (one kind per call). Exit status 1
    means denied, with the reasons printed; 2 means no decision was made.
    """
    body = {"image": image, "selector": _selector(devices, nodes, labels),
            "min_trusted_fraction": min_trusted_fraction}

    decision = _request_decision(server, body, token, ca_bundle, timeout)

    if as_json:
        click.echo(json.dumps(decision, indent=2))
    else:
        _print_decision(decision)
    raise SystemExit(EXIT_ALLOWED if decision.get("allowed") is True else EXIT_DENIED)


def _selector(devices: tuple[str, ...], nodes: tuple[str, ...],
              labels: tuple[str, ...]) -> dict[str, Any]:
    given = [name for name, values in (("--device", devices), ("--node", nodes),
                                       ("--label", labels)) if values]
    if len(given) != 1:
        raise click.UsageError("name the targets with exactly one of --device, --node and "
                               f"--label (got {', '.join(given) or 'none'})")
    if devices:
        return {"device_ids": list(devices)}
    if nodes:
        return {"nodes": list(nodes)}
    selector = {}
    for label in labels:
        name, separator, value = label.partition("=")
        if not separator or not name:
            raise click.UsageError(f"--label {label!r} is not NAME=VALUE")
        selector[name] = value
    return {"labels": selector}


def _request_decision(server: str, body: dict[str, Any], token: str | None,
                      ca_bundle: Path | None, timeout: float) -> dict[str, Any]:
    url = server.rstrip("/") + "/v1/gate"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.post(url, json=body, headers=headers, timeout=timeout,
                                 verify=str(ca_bundle) if ca_bundle else True)
    except requests.RequestException as error:
        _no_decision(f"cannot reach {url}: {type(error).__name__}: {error}")

    try:
        decision = response.json()
    except ValueError:
        decision = None
    if response.status_code != 200 or not isinstance(decision, dict):
        problem = decision.get("error") if isinstance(decision, dict) else None
        detail = (f"{problem.get('code')}: {problem.get('message')}" if isinstance(problem, dict)
                  else response.text[:200])
        _no_decision(f"{url} returned HTTP {response.status_code}: {detail}")
    return decision


def _print_decision(decision: dict[str, Any]) -> None:
    verdict = "allowed" if decision.get("allowed") is True else "denied"
    click.echo(f"{verdict}: {decision.get('trusted')} of {decision.get('matched')} targets "
               f"trusted, minimum fraction {decision.get('min_trusted_fraction')} "
               f"(decision {decision.get('decision_id')})")

    image = decision.get("image") or {}
    if image.get("allowed"):
        click.echo(f"image {image.get('reference')}: signed by key {image.get('key')!r}")
    for reason in decision.get("reasons") or []:
        click.echo(f"  {reason.get('code')}: {reason.get('message')}")
    for device in decision.get("devices") or []:
        if device.get("status") == "trusted":
            continue
        where = f" on node {device['node']}" if device.get("node") else ""
        reasons = "; ".join(f"{r.get('code')}: {r.get('message')}" for r in device.get("reasons") or [])
        click.echo(f"  device {device.get('device_id') or '-'}{where} is {device.get('status')}"
                   f"{': ' + reasons if reasons else ''}")


def _no_decision(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(EXIT_NO_DECISION)
