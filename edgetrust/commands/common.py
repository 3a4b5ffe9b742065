"""Options and helpers shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgetrust.logs import configure_logging
from edgetrust.settings import Settings, SettingsError, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def config_option(function: F) -> F:
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
        envvar="EDGETRUST_CONFIG", help="TOML settings file (also $EDGETRUST_CONFIG).",
    )(function)


def settings_from(config_file: Path | None, **overrides: Any) -> Settings:
    """Load settings, apply the command-line overrides that were given, set up logging."""
    try:
        settings = load_settings(config_file)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        settings = settings.replace(**given)
    try:
        configure_logging(settings.log_level)
    except ValueError as exc:
        raise click.ClickException(f"setting log_level: {exc}") from exc
    return settings
