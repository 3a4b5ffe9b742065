"""Tests for ``edgetrust db prune`` on SQLite and PostgreSQL: its output, --dry-run, and the
one-line errors for bad settings and databases."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text

from edgetrust.cli import main
from edgetrust.db import make_session_factory
from tests.verifier.retention_support import (
    add_attestation,
    add_delivery,
    add_device,
    add_webhook,
    attestation_ids,
    delivery_ids,
)
from verifier.retention import LOCK_KEY

CUTOFF = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


def run_prune(database_url: str, *arguments: str, **settings: str) -> Result:
    env: dict[str, str | None] = {"EDGETRUST_CONFIG": None, "EDGETRUST_DATABASE_URL": database_url,
                                  **settings}
    return CliRunner().invoke(main, ["db", "prune", *arguments], env=env)


@pytest.fixture
def populated(migrated_engine: Engine) -> Engine:
    """Two attestations and a delivered and a pending delivery older than the defaults, and
    the device's latest attestation."""
    sessions = make_session_factory(migrated_engine)
    now = datetime.now(UTC)
    add_device(sessions, "device-1")
    for days in (20, 10):
        add_attestation(sessions, "device-1", now - timedelta(days=days))
    add_attestation(sessions, "device-1", now - timedelta(days=9))
    webhook = add_webhook(sessions)
    add_delivery(sessions, webhook, "device-1", "delivered", now - timedelta(days=4))
    add_delivery(sessions, webhook, "device-1", "pending", now - timedelta(days=4))
    return migrated_engine


def test_prune_prints_deleted_rows(database_url: str, populated: Engine) -> None:
    sessions = make_session_factory(populated)

    result = run_prune(database_url)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(f"attestations: deleted 2 finished before {CUTOFF}", lines[0])
    assert re.fullmatch(f"webhook deliveries: deleted 1 delivered or failed before {CUTOFF}", lines[1])
    assert len(attestation_ids(sessions)) == 1
    assert len(delivery_ids(sessions)) == 1


def test_prune_dry_run_deletes_nothing(database_url: str, populated: Engine) -> None:
    sessions = make_session_factory(populated)

    result = run_prune(database_url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert re.search(f"^attestations: would delete 2 finished before {CUTOFF}$", result.stdout, re.M)
    assert re.search("^webhook deliveries: would delete 1 delivered or failed before", result.stdout, re.M)
    assert len(attestation_ids(sessions)) == 3
    assert len(delivery_ids(sessions)) == 2


def test_prune_zero_retention_prints_kept(database_url: str, populated: Engine) -> None:
    result = run_prune(database_url, EDGETRUST_ATTESTATION_RETENTION="0",
                       EDGETRUST_OUTBOX_RETENTION="2d")

    assert result.exit_code == 0, result.output
    assert "attestations: none deleted, attestation_retention is 0 (keep every row)" in result.stdout
    assert "webhook deliveries: deleted 1 delivered or failed before" in result.stdout


def test_prune_uses_retention_settings(database_url: str, populated: Engine) -> None:
    result = run_prune(database_url, "--dry-run", EDGETRUST_ATTESTATION_RETENTION="15d",
                       EDGETRUST_OUTBOX_RETENTION="5d")

    assert result.exit_code == 0, result.output
    assert "attestations: would delete 1 finished" in result.stdout
    assert "webhook deliveries: would delete 0 delivered" in result.stdout


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"EDGETRUST_ATTESTATION_RETENTION": "one week"},
         "Error: setting attestation_retention (EDGETRUST_ATTESTATION_RETENTION) has invalid "
         "value 'one week'; expected a duration such as 2w, 7d, 36h, 90m or 30s, or a number of seconds"),
        ({"EDGETRUST_OUTBOX_RETENTION": "-3d"},
         "Error: setting outbox_retention (EDGETRUST_OUTBOX_RETENTION) has invalid value '-3d'"),
        ({"EDGETRUST_RETENTION_BATCH_SIZE": "0"},
         "Error: setting retention_batch_size is 0, expected an integer of at least 1"),
        ({"EDGETRUST_RETENTION_INTERVAL": "-60"},
         "Error: setting retention_interval is -60.0, expected seconds of at least 0"),
    ],
)
def test_prune_bad_setting_one_line(database_url: str, migrated_engine: Engine,
                                    settings: dict[str, str], message: str) -> None:
    result = run_prune(database_url, **settings)

    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_prune_unmigrated_database(database_url: str) -> None:
    result = run_prune(database_url)

    assert result.exit_code == 1
    # Alembic logs its own lines at INFO while it reads the revision, so look at the error alone.
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "has no edgetrust schema; run `edgetrust db upgrade`" in errors[0]
    assert "Traceback" not in result.output


def test_prune_while_poller_holds_lock(database_url: str, populated: Engine) -> None:
    if populated.dialect.name != "postgresql":
        pytest.skip("the advisory lock exists only on PostgreSQL")

    with populated.connect() as poller:
        poller.scalar(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        result = run_prune(database_url)
        poller.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})

    assert result.exit_code == 1
    assert "another process (a poller) is pruning the database now" in result.stderr
    assert len(attestation_ids(make_session_factory(populated))) == 3


def test_prune_help_names_dry_run() -> None:
    result = CliRunner().invoke(main, ["db", "prune", "--help"])

    assert result.exit_code == 0
    assert "--dry-run" in result.output
    assert "attestation_retention" in result.output
