"""``edgetrust guard``: run a workload command only while the device's verdict is trusted."""

from __future__ import annotations

from pathlib import Path

import click

from device.guard import Guard, GuardOptions, Inbox, install_stop_handlers
from device.verdict_client import Backoff, ClientOptions, TrustApiClient, VerdictFollower
from edgetrust.commands.common import config_option, settings_from
from edgetrust.settings import Settings


@click.command("guard", context_settings={"allow_interspersed_args": False})
@click.option("--device", "device_id", required=True, help="Device id (agent uuid) whose verdict gates CMD.")
@click.option("--server", "server_url", help="Base URL of the trust API (setting guard_server_url).")
@click.option("--token", help="API token with the read scope. Prefer --token-file: other users of the "
              "device can read a command line.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the API token (setting guard_token_file).")
@click.option("--grace-period", type=click.FloatRange(min=0), help="Seconds between SIGTERM and SIGKILL "
              "when stopping CMD (setting guard_grace_period, default 5).")
@click.option("--restart/--no-restart", default=None, help="Start CMD again when the device is trusted "
              "again, and after CMD exits on its own (setting guard_restart, default off).")
@config_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@click.pass_context
def guard_command(ctx: click.Context, device_id: str, server_url: str | None, token: str | None,
                  token_file: Path | None, grace_period: float | None, restart: bool | None,
                  config_file: Path | None, command: tuple[str, ...]) -> None:
    """Run CMD while the device's verdict is trusted: edgetrust guard --device ID -- CMD ARGS...

    The guard starts CMD once the trust API reports the device trusted, and stops it (SIGTERM to
    its process group, SIGKILL after the grace period) when the verdict turns untrusted or
    unknown, or expires with no newer verdict. It runs until SIGTERM or SIGINT, then stops CMD
    and exits 0. When CMD exits on its own and restart is off, the guard exits with its status.
    """
    if token is not None and token_file is not None:
        raise click.UsageError("give --token or --token-file, not both")
    settings = settings_from(config_file, guard_server_url=server_url, guard_token_file=token_file,
                             guard_grace_period=grace_period, guard_restart=restart)
    _check_server_url(settings.guard_server_url)
    if token is None and settings.guard_token_file is not None:
        token = read_token(settings.guard_token_file)

    inbox = Inbox()
    install_stop_handlers(inbox)
    client = TrustApiClient(device_id, _client_options(settings, token))
    follower = VerdictFollower(client, inbox.put, backoff=_backoff(settings))
    guard = Guard(_guard_options(settings, device_id, command), inbox, follower)

    ctx.exit(guard.run())


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise click.ClickException(f"cannot read the API token file {path}: {error.strerror}") from None
    if not token:
        raise click.ClickException(f"the API token file {path} is empty")
    return token


def _check_server_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{url!r} is not an http:// or https:// URL", param_hint="--server")


def _backoff(settings: Settings) -> Backoff:
    return Backoff(initial=settings.guard_retry_initial, maximum=settings.guard_retry_max)


def _client_options(settings: Settings, token: str | None) -> ClientOptions:
    return ClientOptions(
        base_url=settings.guard_server_url,
        token=token,
        request_timeout=settings.guard_request_timeout,
        idle_timeout=settings.guard_stream_idle_timeout,
        ca_file=settings.guard_ca_file,
    )


def _guard_options(settings: Settings, device_id: str, command: tuple[str, ...]) -> GuardOptions:
    return GuardOptions(
        device_id=device_id,
        command=command,
        grace_period=settings.guard_grace_period,
        restart=settings.guard_restart,
        restart_delay=settings.guard_restart_delay,
        reread_interval=settings.guard_reread_interval,
        reread_backoff=_backoff(settings),
    )
