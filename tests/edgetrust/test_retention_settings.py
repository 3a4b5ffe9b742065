"""Tests for the retention settings: durations from TOML and the environment, and bad values."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from edgetrust.settings import SettingsError, load_settings, parse_duration


def test_retention_defaults() -> None:
    settings = load_settings(environ={})

    assert settings.attestation_retention == timedelta(days=7)
    assert settings.outbox_retention == timedelta(days=3)
    assert settings.retention_interval == 600.0
    assert settings.retention_batch_size == 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2w", timedelta(weeks=2)),
        ("7d", timedelta(days=7)),
        ("36h", timedelta(hours=36)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1.5d", timedelta(hours=36)),
        (" 12 H ", timedelta(hours=12)),
        ("3600", timedelta(hours=1)),
        ("0", timedelta(0)),
        (86400, timedelta(days=1)),
        (0.5, timedelta(milliseconds=500)),
    ],
)
def test_parse_duration_accepts(text: str | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("value", ["", "d", "7 days", "7y", "-1d", "1d12h", "inf", -5, True, [7]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(value)


def test_parse_duration_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_duration(float("inf"))


def test_retention_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('attestation_retention = "14d"\noutbox_retention = 7200\n'
                      "retention_interval = 60.0\nretention_batch_size = 2000\n")

    settings = load_settings(config, environ={})

    assert settings.attestation_retention == timedelta(days=14)
    assert settings.outbox_retention == timedelta(hours=2)
    assert settings.retention_interval == 60.0
    assert settings.retention_batch_size == 2000


def test_retention_from_environment() -> None:
    settings = load_settings(environ={"EDGETRUST_ATTESTATION_RETENTION": "30d",
                                      "EDGETRUST_OUTBOX_RETENTION": "0",
                                      "EDGETRUST_RETENTION_INTERVAL": "0"})

    assert settings.attestation_retention == timedelta(days=30)
    assert settings.outbox_retention == timedelta(0)
    assert settings.retention_interval == 0.0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EDGETRUST_ATTESTATION_RETENTION": "a week"},
         "setting attestation_retention (EDGETRUST_ATTESTATION_RETENTION) has invalid value "
         "'a week'; expected a duration such as 2w, 7d, 36h, 90m or 30s, or a number of seconds"),
        ({"EDGETRUST_OUTBOX_RETENTION": "-1d"},
         "setting outbox_retention (EDGETRUST_OUTBOX_RETENTION) has invalid value '-1d'"),
        ({"EDGETRUST_RETENTION_BATCH_SIZE": "many"},
         "setting retention_batch_size (EDGETRUST_RETENTION_BATCH_SIZE) has invalid value 'many'; "
         "expected an integer"),
    ],
)
def test_bad_retention_environment(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ=environ)

    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_bad_retention_toml_type(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("attestation_retention = true\n")

    with pytest.raises(SettingsError, match="setting attestation_retention .* has invalid value True"):
        load_settings(config, environ={})
