"""``edgetrust policy store``: upload, list, show and delete policies on an edgetrust server.

The commands call the server's policy API (``/v1/policies``) over HTTP with an API token of
the admin scope (``edgetrust token create``). Exit status: 0 on
success, 1 when the server rejects the request, 2 when an input file cannot be read or the
server cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import requests

from edgetrust.commands.common import config_option, settings_from
from policies.dsse import is_envelope
from verifier.policy_models import POLICY_KINDS

# Seconds to wait for the server; a 200,000-digest policy is about 20 MB to upload.
REQUEST_TIMEOUT = 120.0


class InputError(click.ClickException):
    """An input file that cannot be read, or a server that cannot be reached (exit status 2)."""

    exit_code = 2


class RequestRejected(click.ClickException):
    """A request the server rejected with an error response (exit status 1)."""

    exit_code = 1


def server_option(function: Any) -> Any:
    function = click.option(
        "--token", envvar="EDGETRUST_TOKEN",
        help="API token with the admin scope, sent as a bearer token (also $EDGETRUST_TOKEN).",
    )(function)
    return click.option(
        "--server", envvar="EDGETRUST_SERVER",
        help="Base URL of the edgetrust server (also $EDGETRUST_SERVER; default: "
        "http://<listen_host>:<listen_port> from the settings).",
    )(function)


@click.group("store")
def store_group() -> None:
    """Upload, list, show and delete the policies stored on an edgetrust server."""


@store_group.command("upload")
@click.argument("name")
@click.argument("policy_path", metavar="FILE",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kind", required=True, type=click.Choice(POLICY_KINDS),
              help="Kind of policy in FILE.")
@click.option("--public-key", "public_key_path",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM public key that verifies FILE when FILE is a DSSE envelope.")
@server_option
@config_option
def upload_command(name: str, policy_path: Path, kind: str, public_key_path: Path | None,
                   server: str | None, token: str | None, config_file: Path | None) -> None:
    """Store FILE as policy NAME: a new policy, or a new version of an existing one."""
    document = _read_json(policy_path)
    if is_envelope(document):
        body: dict[str, Any] = {"kind": kind, "envelope": document}
        if public_key_path is not None:
            body["public_key"] = _read_text(public_key_path)
    else:
        if public_key_path is not None:
            raise click.UsageError("--public-key verifies a DSSE envelope; FILE is a plain policy")
        body = {"kind": kind, "policy": document}
    base = _policies_url(server, config_file)

    response = _call("POST", f"{base}/{name}", token, json=body)
    if response.status_code == 409 and _error(response).get("code") == "policy-exists":
        response = _call("PUT", f"{base}/{name}", token, json=body)
    result = _result(response)

    state = "stored as" if result["created"] else "unchanged, still"
    click.echo(f"policy {result['name']} {state} version {result['version']} "
               f"({result['kind']}, content {result['content_hash']})")


@store_group.command("list")
@click.option("--kind", type=click.Choice(POLICY_KINDS), help="List only policies of this kind.")
@server_option
@config_option
def list_command(kind: str | None, server: str | None, token: str | None,
                 config_file: Path | None) -> None:
    """List the latest version of every stored policy."""
    params = {"kind": kind} if kind else {}
    result = _result(_call("GET", _policies_url(server, config_file), token, params=params))

    for item in result["policies"]:
        signed = f", signed by {item['signed_by'][:16]}" if item["signed_by"] else ""
        click.echo(f"{item['name']}\t{item['kind']}\tversion {item['version']}\t"
                   f"{item['created_at']}{signed}")


@store_group.command("show")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="Version to show (default: the latest).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write the policy document here instead of stdout.")
@server_option
@config_option
def show_command(name: str, version: int | None, output: Path | None, server: str | None,
                 token: str | None, config_file: Path | None) -> None:
    """Print a stored policy's document; the version details go to stderr."""
    params = {"version": version} if version is not None else {}
    result = _result(_call("GET", f"{_policies_url(server, config_file)}/{name}", token,
                           params=params))

    click.echo(f"policy {result['name']} version {result['version']} ({result['kind']}, "
               f"content {result['content_hash']})", err=True)
    text = json.dumps(result["policy"], indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


@store_group.command("delete")
@click.argument("name")
@server_option
@config_option
def delete_command(name: str, server: str | None, token: str | None,
                   config_file: Path | None) -> None:
    """Delete every version of policy NAME; the server rejects this while devices use it."""
    result = _result(_call("DELETE", f"{_policies_url(server, config_file)}/{name}", token))

    click.echo(f"deleted policy {result['name']} ({result['deleted_versions']} versions)")


def _policies_url(server: str | None, config_file: Path | None) -> str:
    if server is None:
        settings = settings_from(config_file)
        server = f"http://{settings.listen_host}:{settings.listen_port}"
    return server.rstrip("/") + "/v1/policies"


def _call(method: str, url: str, token: str | None, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return requests.request(method, url, headers=headers, timeout=REQUEST_TIMEOUT, **kwargs)
    except requests.RequestException as error:
        raise InputError(f"{method} {url} failed: {error}") from None


def _error(response: requests.Response) -> dict[str, Any]:
    try:
        error = response.json().get("error")
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


def _result(response: requests.Response) -> dict[str, Any]:
    if response.ok:
        result: dict[str, Any] = response.json()
        return result
    error = _error(response)
    if not error:
        raise RequestRejected(f"the server returned status {response.status_code}: {response.text[:200]}")
    field = f" (field {error['field']})" if error.get("field") else ""
    raise RequestRejected(f"{error.get('code')}: {error.get('message')}{field}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(_read_text(path))
    except (ValueError, RecursionError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} must contain a JSON object")
    return document
