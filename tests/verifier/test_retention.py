"""Tests for verifier.retention on SQLite and PostgreSQL: what a prune pass deletes and keeps,
batches, dry runs, the advisory lock, and the pass that a poller runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.settings import Settings, SettingsError
from tests.verifier.conftest import (
    POLL_INTERVAL,
    FakeClock,
    add_to_verifier,
    make_poller,
    register,
    store_runtime_policy,
)
from tests.verifier.retention_support import (
    NOW,
    add_attestation,
    add_delivery,
    add_device,
    add_verdict_record,
    add_webhook,
    attestation_ids,
    delivery_ids,
    set_current_verdict,
)
from verifier.agent_client import AgentClient
from verifier.api import VerifierService
from verifier.fleet_sim import Fleet, SimulatedDevice, make_files
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.poller import Poller, build_poller
from verifier.retention import LOCK_KEY, Pruner, RetentionOptions, prune

WEEK = RetentionOptions(attestation_retention=timedelta(days=7), outbox_retention=timedelta(days=1))
OLD = NOW - timedelta(days=10)


@pytest.fixture
def engine(sessions: sessionmaker[Session]) -> Engine:
    return sessions.kw["bind"]


# --- What a pass deletes and keeps ---------------------------------------------------------------


def test_prune_deletes_old_keeps_recent(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    old = [add_attestation(sessions, "device-1", NOW - timedelta(days=days)) for days in (10, 9, 8)]
    recent = [add_attestation(sessions, "device-1", NOW - timedelta(days=days)) for days in (6, 1)]

    result = prune(engine, WEEK, now=NOW)

    assert result.attestations == 3
    assert attestation_ids(sessions) == set(recent)
    assert not set(old) & attestation_ids(sessions)
    assert result.attestation_cutoff == NOW - timedelta(days=7)


def test_prune_keeps_latest_of_each_device(sessions: sessionmaker[Session], engine: Engine) -> None:
    for device_id in ("quiet-1", "quiet-2"):
        add_device(sessions, device_id)
    quiet_1 = [add_attestation(sessions, "quiet-1", NOW - timedelta(days=days)) for days in (30, 20)]
    only = add_attestation(sessions, "quiet-2", NOW - timedelta(days=40))

    result = prune(engine, WEEK, now=NOW)

    assert result.attestations == 1
    assert attestation_ids(sessions) == {quiet_1[1], only}


def test_prune_keeps_current_verdict_attestation(sessions: sessionmaker[Session], engine: Engine) -> None:
    # A poller whose clock ran behind stored the current verdict with an earlier finished_at.
    add_device(sessions, "device-1")
    oldest = add_attestation(sessions, "device-1", NOW - timedelta(days=12))
    current = add_attestation(sessions, "device-1", NOW - timedelta(days=10), verdict_id="current-verdict")
    latest = add_attestation(sessions, "device-1", NOW - timedelta(days=9))
    set_current_verdict(sessions, "device-1", "current-verdict")

    prune(engine, WEEK, now=NOW)

    assert attestation_ids(sessions) == {current, latest}
    assert oldest not in attestation_ids(sessions)


def test_prune_keeps_last_change_attestation(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    add_device(sessions, "device-1")
    first_change = add_attestation(sessions, "device-1", NOW - timedelta(days=20))
    last_change = add_attestation(sessions, "device-1", NOW - timedelta(days=15))
    repeat = add_attestation(sessions, "device-1", NOW - timedelta(days=14))
    latest = add_attestation(sessions, "device-1", NOW - timedelta(hours=1))
    first_record = add_verdict_record(sessions, "device-1", first_change, NOW - timedelta(days=20), "trusted")
    last_record = add_verdict_record(sessions, "device-1", last_change, NOW - timedelta(days=15))

    result = prune(engine, WEEK, now=NOW)

    assert result.attestations == 2
    assert attestation_ids(sessions) == {last_change, latest}
    assert repeat not in attestation_ids(sessions)
    with sessions() as session:
        records = {record.id: record.attestation_id for record in session.scalars(select(VerdictRecord))}
    assert records == {first_record: None, last_record: last_change}


def test_prune_leaves_devices_alone(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    add_attestation(sessions, "device-1", NOW - timedelta(days=10))
    add_attestation(sessions, "device-1", NOW - timedelta(days=9))

    prune(engine, WEEK, now=NOW)

    with sessions() as session:
        assert session.scalars(select(VerifierDevice.device_id)).all() == ["device-1"]


def test_prune_outbox_keeps_pending_and_recent(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    webhook = add_webhook(sessions)
    delivered_old = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(days=2))
    failed_old = add_delivery(sessions, webhook, "device-1", "failed", NOW - timedelta(days=2))
    pending_old = add_delivery(sessions, webhook, "device-1", "pending", NOW - timedelta(days=30))
    delivered_recent = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(hours=2))
    removed_device = add_delivery(sessions, webhook, "removed", "delivered", NOW - timedelta(days=5))

    result = prune(engine, WEEK, now=NOW)

    assert result.webhook_deliveries == 3
    assert delivery_ids(sessions) == {pending_old, delivered_recent}
    assert not {delivered_old, failed_old, removed_device} & delivery_ids(sessions)


def test_prune_keeps_current_expiry_delivery(
    sessions: sessionmaker[Session], engine: Engine
) -> None:
    # The delivery worker queues "<verdict id>:expiry" again when no delivery has that event id.
    add_device(sessions, "device-1")
    set_current_verdict(sessions, "device-1", "expired-verdict")
    webhook = add_webhook(sessions)
    current_expiry = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(days=5),
                                  event_id="expired-verdict:expiry")
    older_expiry = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(days=6),
                                event_id="older-verdict:expiry")
    current_change = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(days=6),
                                  event_id="expired-verdict:attestation")

    prune(engine, WEEK, now=NOW)

    assert delivery_ids(sessions) == {current_expiry}
    assert not {older_expiry, current_change} & delivery_ids(sessions)


def test_prune_zero_retention_keeps_everything(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    rows = {add_attestation(sessions, "device-1", NOW - timedelta(days=days)) for days in (300, 200)}
    webhook = add_webhook(sessions)
    delivery = add_delivery(sessions, webhook, "device-1", "delivered", NOW - timedelta(days=300))

    result = prune(engine, RetentionOptions(attestation_retention=timedelta(0),
                                            outbox_retention=timedelta(0)), now=NOW)

    assert result.attestations == 0
    assert result.webhook_deliveries == 0
    assert result.batches == 0
    assert result.attestation_cutoff is None
    assert result.outbox_cutoff is None
    assert attestation_ids(sessions) == rows
    assert delivery_ids(sessions) == {delivery}


def test_prune_retention_before_year_one(sessions: sessionmaker[Session], engine: Engine) -> None:
    # 1000000w is a valid duration, but NOW minus it is before datetime.min.
    add_device(sessions, "device-1")
    rows = {add_attestation(sessions, "device-1", NOW - timedelta(days=days)) for days in (300, 200)}
    longest = timedelta(weeks=1000000)

    result = prune(engine, RetentionOptions(attestation_retention=longest, outbox_retention=longest),
                   now=NOW)

    assert result.attestations == 0
    assert result.webhook_deliveries == 0
    assert result.attestation_cutoff == datetime.min.replace(tzinfo=UTC)
    assert result.outbox_cutoff == datetime.min.replace(tzinfo=UTC)
    assert attestation_ids(sessions) == rows


# --- Batches, dry runs, stopping and the lock ----------------------------------------------------


def test_prune_deletes_in_batches(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    for minute in range(8):
        add_attestation(sessions, "device-1", OLD + timedelta(minutes=minute))
    latest = add_attestation(sessions, "device-1", NOW)
    webhook = add_webhook(sessions)
    for _ in range(4):
        add_delivery(sessions, webhook, "device-1", "delivered", OLD)

    result = prune(engine, RetentionOptions(batch_size=3, outbox_retention=timedelta(days=1)), now=NOW)

    assert result.attestations == 8
    assert result.webhook_deliveries == 4
    # 3 + 3 + 2 attestations, then 3 + 1 deliveries.
    assert result.batches == 5
    assert attestation_ids(sessions) == {latest}
    assert delivery_ids(sessions) == set()


def test_prune_dry_run_deletes_nothing(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    for days in (12, 11, 10, 1):
        add_attestation(sessions, "device-1", NOW - timedelta(days=days))
    webhook = add_webhook(sessions)
    add_delivery(sessions, webhook, "device-1", "failed", NOW - timedelta(days=3))
    add_delivery(sessions, webhook, "device-1", "pending", NOW - timedelta(days=3))
    attestations_before = attestation_ids(sessions)
    deliveries_before = delivery_ids(sessions)

    counted = prune(engine, WEEK, now=NOW, dry_run=True)

    assert counted.dry_run
    assert counted.attestations == 3
    assert counted.webhook_deliveries == 1
    assert counted.batches == 0
    assert attestation_ids(sessions) == attestations_before
    assert delivery_ids(sessions) == deliveries_before

    deleted = prune(engine, WEEK, now=NOW)

    assert deleted.attestations == 3
    assert deleted.webhook_deliveries == 1


def test_prune_stops_after_current_batch(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    for minute in range(7):
        add_attestation(sessions, "device-1", OLD + timedelta(minutes=minute))
    add_attestation(sessions, "device-1", NOW)
    stop = threading.Event()
    stop.set()

    result = prune(engine, RetentionOptions(batch_size=3), now=NOW, stop=stop)

    assert result.stopped
    assert result.attestations == 3
    assert result.batches == 1
    assert len(attestation_ids(sessions)) == 5


def test_prune_skips_when_locked(sessions: sessionmaker[Session], engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the advisory lock exists only on PostgreSQL")
    add_device(sessions, "device-1")
    old = add_attestation(sessions, "device-1", OLD)
    latest = add_attestation(sessions, "device-1", NOW)

    with engine.connect() as other:
        assert other.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY})
        skipped = prune(engine, WEEK, now=NOW)
        other.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
        other.commit()
    after_unlock = prune(engine, WEEK, now=NOW)

    assert skipped.locked_out
    assert skipped.attestations == 0
    assert after_unlock.attestations == 1
    assert attestation_ids(sessions) == {latest}
    assert old not in attestation_ids(sessions)


def test_prune_releases_lock_after_pass(sessions: sessionmaker[Session], engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the advisory lock exists only on PostgreSQL")

    prune(engine, WEEK, now=NOW)

    with engine.connect() as other:
        assert other.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY})
        other.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})


# --- Options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "setting retention_batch_size is 0, expected an integer of at least 1"),
        ({"interval": -1.0}, "setting retention_interval is -1.0, expected seconds of at least 0"),
        ({"interval": float("nan")}, "setting retention_interval is nan"),
        ({"interval": float("inf")}, "setting retention_interval is inf, .* at most 9223372036"),
        ({"attestation_retention": timedelta(seconds=-1)}, "setting attestation_retention is"),
    ],
)
def test_options_reject_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RetentionOptions(**changes)  # type: ignore[arg-type] # values of the fields' types


def test_options_from_settings() -> None:
    settings = Settings(attestation_retention=timedelta(days=2), outbox_retention=timedelta(hours=5),
                        retention_interval=30.0, retention_batch_size=100)

    options = RetentionOptions.from_settings(settings)

    assert options == RetentionOptions(timedelta(days=2), timedelta(hours=5), 100, 30.0)


def test_pruner_needs_positive_interval(engine: Engine) -> None:
    with pytest.raises(ValueError, match="retention_interval above 0, got 0.0"):
        Pruner(engine, RetentionOptions(interval=0.0))


def test_build_poller_rejects_bad_batch_size(sessions: sessionmaker[Session]) -> None:
    settings = Settings(verifier_agent_mtls=False, retention_batch_size=-5)

    with pytest.raises(SettingsError, match="retention_batch_size is -5"):
        build_poller(settings, sessions)


# --- The poller's pass -----------------------------------------------------------------------------


def test_pruner_logs_one_line_per_pass(
    sessions: sessionmaker[Session], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    add_device(sessions, "device-1")
    for days in (12, 11, 10, 1):
        add_attestation(sessions, "device-1", NOW - timedelta(days=days))
    pruner = Pruner(engine, WEEK, clock=lambda: NOW)

    with caplog.at_level(logging.DEBUG, logger="verifier.retention"):
        result = pruner.run_pass()

    assert result is not None
    assert result.attestations == 3
    lines = [record for record in caplog.records if record.name == "verifier.retention"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "deleted 3 attestations" in lines[0].getMessage()
    assert "0 webhook deliveries" in lines[0].getMessage()


def test_pruner_logs_database_fault(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgetrust.db import make_engine

    broken = make_engine(f"sqlite:///{tmp_path}/no-tables.db")
    pruner = Pruner(broken, WEEK, clock=lambda: NOW)

    with caplog.at_level(logging.ERROR, logger="verifier.retention"):
        result = pruner.run_pass()
    broken.dispose()

    assert result is None
    assert "prune pass failed" in caplog.text
    assert "OperationalError: (sqlite3.OperationalError) no such table" in caplog.text


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(6)


@pytest.fixture
def fleet_devices(files: dict[str, bytes]) -> Iterator[list[SimulatedDevice]]:
    devices = [SimulatedDevice(f"device-{index}", files=dict(files), entries_per_quote=2)
               for index in range(2)]
    with Fleet(devices):
        yield devices


def test_attestation_after_prune_continues_ima(
    sessions: sessionmaker[Session], engine: Engine, files: dict[str, bytes],
    fleet_devices: list[SimulatedDevice],
) -> None:
    clock = FakeClock()
    store_runtime_policy(sessions, files)
    service = VerifierService(sessions, default_poll_interval=POLL_INTERVAL, clock=clock)
    for device in fleet_devices:
        register(sessions, device)
        add_to_verifier(service, device)
    poller = make_poller(sessions, clock)
    for _ in range(4):
        poller.run_once()
        clock.advance(POLL_INTERVAL)
    clock.advance(8 * 24 * 3600)

    result = prune(engine, WEEK, now=clock())
    poller.run_once()

    # Of four attestations per device, the first changed the verdict and the fourth is the
    # latest; the two between them go.
    assert result.attestations == 4
    with sessions() as session:
        newest = session.scalars(select(Attestation).where(Attestation.device_id == "device-0")
                                 .order_by(Attestation.id.desc())).first()
        device = session.scalars(select(VerifierDevice).where(VerifierDevice.device_id == "device-0")).one()
    assert newest is not None
    assert newest.status == "trusted"
    assert newest.ima_start_index is not None
    assert newest.ima_start_index > 0
    assert device.verdict_status == "trusted"


def test_poller_run_prunes_in_background(sessions: sessionmaker[Session], engine: Engine) -> None:
    add_device(sessions, "device-1")
    add_attestation(sessions, "device-1", OLD)
    latest = add_attestation(sessions, "device-1", NOW)
    base = make_poller(sessions, FakeClock(NOW))
    poller = Poller(sessions, AgentClient(mtls=False, identity=None, timeout=2.0), base.options,
                    clock=FakeClock(NOW), pruner=Pruner(engine, WEEK, clock=lambda: NOW))
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))

    thread.start()
    deadline = time.monotonic() + 20
    while attestation_ids(sessions) != {latest} and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=20)

    assert not thread.is_alive()
    assert attestation_ids(sessions) == {latest}
