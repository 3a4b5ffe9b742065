"""``edgetrust nodes``: run the node controller that labels and taints nodes by verdict."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from edgetrust.commands.common import config_option, settings_from
from edgetrust.settings import SettingsError
from verifier.node_controller import (
    ControllerOptions,
    NodeController,
    StreamWaker,
    kube_core_api,
    trust_client,
)


@click.group("nodes")
def nodes_group() -> None:
    """Keep Kubernetes node labels and taints in line with verdicts."""


@nodes_group.command("controller")
@click.option("--no-stream", is_flag=True,
              help="Do not follow the verdict stream; run passes only every nodes_interval seconds.")
@config_option
def controller_command(no_stream: bool, config_file: Path | None) -> None:
    """Run the node controller until SIGINT or SIGTERM."""
    controller = _controller(config_file)
    stop = threading.Event()

    def _stop(_signal: int, _frame: FrameType | None) -> None:
        stop.set()
        controller.wake.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if not no_stream:
        waker = StreamWaker(controller.trust, controller.wake, stop, controller.options.backoff_max)
        threading.Thread(target=waker.run, name="verdict-stream", daemon=True).start()
    controller.run(stop)


@nodes_group.command("sync")
@config_option
def sync_command(config_file: Path | None) -> None:
    """Run one pass over all nodes; exit with status 1 if any node could not be updated."""
    controller = _controller(config_file)
    try:
        report = controller.reconcile_once()
    except (ApiException, HTTPError) as error:
        raise click.ClickException(f"cannot list nodes from the Kubernetes API server: {error}") from None
    click.echo(f"patched {report.patched}, unchanged {report.unchanged}, not edgetrust's "
               f"{report.skipped}, failed {report.failed}"
               + ("; the trust API could not be read" if report.trust_api_failed else ""))
    if not report.ok:
        raise SystemExit(1)


def _controller(config_file: Path | None) -> NodeController:
    settings = settings_from(config_file)
    try:
        core = kube_core_api(settings)
        trust = trust_client(settings)
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    options = ControllerOptions(interval=settings.nodes_interval, backoff_max=settings.nodes_backoff_max)
    return NodeController(core, trust, options)
