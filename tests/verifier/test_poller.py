"""Tests for verifier.poller over real HTTP on 127.0.0.1 against verifier.fleet_sim agents, on
SQLite and PostgreSQL. The poller's clock is a FakeClock that the tests advance, so schedules
and backoff are exact; only the two-pollers test runs on the real clock."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import transaction
from registrar.models import RegisteredDevice
from tests.verifier.conftest import (
    POLL_INTERVAL,
    FakeClock,
    add_to_verifier,
    make_poller,
    register,
    store_runtime_policy,
)
from verifier.api import VerifierService
from verifier.fleet_sim import Fleet, SimulatedDevice, make_files
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.poller import as_utc, new_nonce, utc_now


@pytest.fixture
def files() -> dict[str, bytes]:
    return make_files(10)


@pytest.fixture
def devices(files: dict[str, bytes]) -> list[SimulatedDevice]:
    return [SimulatedDevice(f"device-{index}", files=dict(files), entries_per_quote=2) for index in range(3)]


@pytest.fixture
def fleet(devices: list[SimulatedDevice]) -> Iterator[Fleet]:
    with Fleet(devices) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(sessions: sessionmaker[Session], clock: FakeClock) -> VerifierService:
    return VerifierService(sessions, default_poll_interval=POLL_INTERVAL, clock=clock)


@pytest.fixture
def enrolled(
    sessions: sessionmaker[Session],
    service: VerifierService,
    fleet: Fleet,
    devices: list[SimulatedDevice],
    files: dict[str, bytes],
) -> list[SimulatedDevice]:
    store_runtime_policy(sessions, files)
    for device in devices:
        register(sessions, device)
        add_to_verifier(service, device)
    return devices


def row(sessions: sessionmaker[Session], device_id: str) -> VerifierDevice:
    with sessions() as session:
        return session.scalars(select(VerifierDevice).where(VerifierDevice.device_id == device_id)).one()


def attestations(sessions: sessionmaker[Session], device_id: str) -> list[Attestation]:
    with sessions() as session:
        query = select(Attestation).where(Attestation.device_id == device_id).order_by(Attestation.id)
        return list(session.scalars(query))


def verdict_history(sessions: sessionmaker[Session], device_id: str) -> list[str]:
    with sessions() as session:
        query = (
            select(VerdictRecord.status)
            .where(VerdictRecord.device_id == device_id)
            .order_by(VerdictRecord.id)
        )
        return list(session.scalars(query))


# --- attestation rounds ---------------------------------------------------------------------


def test_poller_trusts_enrolled_devices(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)

    count = poller.run_once()

    assert count == 3
    for device in enrolled:
        stored = row(sessions, device.device_id)
        assert stored.verdict_status == "trusted"
        assert stored.consecutive_failures == 0
        assert stored.lease_id is None
        assert stored.state is not None
        assert stored.state["ima"]["next_index"] == len(device.ima_lines)
        records = attestations(sessions, device.device_id)
        assert [a.status for a in records] == ["trusted"]
        assert records[0].nonce == device.last_request["nonce"]
        assert records[0].verdict_id == stored.verdict_id
        assert records[0].boot_session == 0
        assert verdict_history(sessions, device.device_id) == ["trusted"]
    assert poller.stats["attestations_trusted"] == 3


def test_poller_keeps_cadence(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)
    due = row(sessions, enrolled[0].device_id).next_poll_at
    poller.run_once()

    clock.advance(POLL_INTERVAL - 1)
    early = poller.run_once()
    clock.advance(1)
    on_time = poller.run_once()

    assert early == 0
    assert on_time == 3
    second = attestations(sessions, enrolled[0].device_id)[1]
    assert as_utc(second.scheduled_at) == as_utc(due) + timedelta(seconds=POLL_INTERVAL)


def test_poller_sends_single_use_nonces(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)
    for _ in range(3):
        poller.run_once()
        clock.advance(POLL_INTERVAL)

    nonces = [request["nonce"] for device in enrolled for request in device.requests]

    assert len(nonces) == 9
    assert len(set(nonces)) == 9
    assert all(len(nonce) == 20 and nonce.isalnum() for nonce in nonces)
    assert all(request["mask"] == hex(0x107FF) for request in enrolled[0].requests)
    assert all(request["partial"] == "1" for request in enrolled[0].requests)


def test_new_nonce_is_alphanumeric() -> None:
    nonce = new_nonce()

    assert len(nonce) == 20
    assert nonce.isascii()
    assert nonce.isalnum()


# --- failures ---------------------------------------------------------------------------------


def test_poller_untrusted_names_changed_file(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)
    device = enrolled[1]
    poller.run_once()
    path = next(iter(device.files))

    device.measure(path, secrets.token_bytes(32))
    statuses = []
    for _ in range(2):
        clock.advance(POLL_INTERVAL)
        poller.run_once()
        statuses.append(row(sessions, device.device_id).verdict_status)

    assert statuses[0] == "untrusted"
    stored = row(sessions, device.device_id)
    assert stored.verdict_status == "untrusted"
    assert stored.verdict_reasons[0]["code"] == "ima-digest-not-allowed"
    assert path in stored.verdict_reasons[0]["message"]
    findings = attestations(sessions, device.device_id)[-1].findings
    assert [f["context"]["path"] for f in findings if f["code"] == "ima-digest-not-allowed"] == [path]
    assert verdict_history(sessions, device.device_id) == ["trusted", "untrusted"]
    assert row(sessions, enrolled[0].device_id).verdict_status == "trusted"


def test_poller_unreachable_unknown_then_trusted_after_reboot(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)
    device = enrolled[0]
    poller.run_once()
    poller.run_once()
    device.reachable = False

    delays: list[float] = []
    for attempt in range(1, 5):
        clock.now = as_utc(row(sessions, device.device_id).next_poll_at)
        poller.run_once()
        stored = row(sessions, device.device_id)
        delays.append((as_utc(stored.next_poll_at) - clock.now).total_seconds())
        assert stored.consecutive_failures == attempt
        assert stored.verdict_status == "unknown"
        assert stored.verdict_reasons[0]["code"] == "agent-unreachable"

    assert delays == [POLL_INTERVAL, 2 * POLL_INTERVAL, 4 * POLL_INTERVAL, 8 * POLL_INTERVAL]
    assert row(sessions, device.device_id).consecutive_failures == 4

    device.reboot()
    device.reachable = True
    clock.now = as_utc(row(sessions, device.device_id).next_poll_at)
    poller.run_once()

    stored = row(sessions, device.device_id)
    assert stored.verdict_status == "trusted"
    assert stored.consecutive_failures == 0
    assert stored.state is not None
    assert stored.state["boot"]["reset_count"] == 1
    last = attestations(sessions, device.device_id)[-1]
    assert last.boot_session == 1
    assert verdict_history(sessions, device.device_id) == ["trusted", "unknown", "trusted"]


def test_poller_rereads_list_from_start_after_reboot(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    poller = make_poller(sessions, clock)
    device = enrolled[2]
    poller.run_once()
    device.reboot()
    for path in list(device.files)[:5]:
        device.measure(path)

    clock.advance(POLL_INTERVAL)
    poller.run_once()

    stored = row(sessions, device.device_id)
    assert stored.verdict_status == "trusted"
    last = attestations(sessions, device.device_id)[-1]
    assert last.evidence["restarted_from_entry_zero"] is True
    assert [request["ima_ml_entry"] for request in device.requests][-2:][1] == "0"
    assert len(attestations(sessions, device.device_id)) == 2


def test_poller_inactive_device_unknown(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    device = enrolled[0]
    with transaction(sessions) as session:
        session.execute(
            update(RegisteredDevice)
            .where(RegisteredDevice.device_id == device.device_id)
            .values(active=False)
        )

    make_poller(sessions, clock).run_once()

    stored = row(sessions, device.device_id)
    assert stored.verdict_status == "unknown"
    assert stored.verdict_reasons[0]["code"] == "device-not-active"
    assert device.requests == []


def test_poller_skips_paused_device(
    sessions: sessionmaker[Session],
    clock: FakeClock,
    service: VerifierService,
    enrolled: list[SimulatedDevice],
) -> None:
    service.set_paused(enrolled[0].device_id, True)

    count = make_poller(sessions, clock).run_once()

    assert count == 2
    assert enrolled[0].requests == []


# --- restarts and leases -----------------------------------------------------------------------


def test_restarted_poller_resumes_incrementally(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    first = make_poller(sessions, clock, poller_id="before-restart")
    for _ in range(2):
        first.run_once()
        clock.advance(POLL_INTERVAL)
    sent_before = {device.device_id: len(device.requests) for device in enrolled}

    second = make_poller(sessions, clock, poller_id="after-restart")
    for _ in range(2):
        second.run_once()
        clock.advance(POLL_INTERVAL)

    for device in enrolled:
        after = device.requests[sent_before[device.device_id] :]
        assert len(after) == 2
        assert all(int(request["ima_ml_entry"]) > 0 for request in after)
        assert [a.status for a in attestations(sessions, device.device_id)] == ["trusted"] * 4
        assert attestations(sessions, device.device_id)[-1].poller == "after-restart"


def test_dead_poller_lease_expires(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    dead = make_poller(sessions, clock, poller_id="dead", lease_seconds=30.0)
    alive = make_poller(sessions, clock, poller_id="alive", lease_seconds=30.0)
    claims = dead.claim(10)

    while_leased = alive.run_once()
    clock.advance(30)
    after_expiry = alive.run_once()
    dead.attest(claims[0])

    assert len(claims) == 3
    assert while_leased == 0
    assert after_expiry == 3
    assert dead.stats["claims_expired"] == 1
    for device in enrolled:
        assert [a.poller for a in attestations(sessions, device.device_id)] == ["alive"]


def test_lost_lease_discards_result(
    sessions: sessionmaker[Session],
    clock: FakeClock,
    service: VerifierService,
    enrolled: list[SimulatedDevice],
) -> None:
    poller = make_poller(sessions, clock)
    claims = poller.claim(10)
    service.remove_device(claims[0].device_id)

    for claim in claims:
        poller.attest(claim)

    assert poller.stats["leases_lost"] == 1
    assert poller.stats["attestations_trusted"] == 2


# --- the running loop and several pollers ------------------------------------------------------


def run_pollers(sessions: sessionmaker[Session], count: int, seconds: float) -> dict[str, Any]:
    pollers = [
        make_poller(sessions, utc_now, poller_id=f"poller-{index}", threads=3) for index in range(count)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=poller.run, args=(stop,)) for poller in pollers]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    return {"alive": [thread.is_alive() for thread in threads], "pollers": pollers}


def test_poller_loop_attests_repeatedly(
    sessions: sessionmaker[Session],
    service: VerifierService,
    fleet: Fleet,
    devices: list[SimulatedDevice],
    files: dict[str, bytes],
) -> None:
    store_runtime_policy(sessions, files)
    for device in devices:
        register(sessions, device)
        add_to_verifier(service, device, poll_interval=0.2)

    outcome = run_pollers(sessions, 1, 1.5)

    assert outcome["alive"] == [False]
    for device in devices:
        statuses = [a.status for a in attestations(sessions, device.device_id)]
        assert len(statuses) >= 3
        assert set(statuses) == {"trusted"}


def test_two_pollers_never_overlap(
    database_url: str, sessions: sessionmaker[Session], service: VerifierService, files: dict[str, bytes]
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("several pollers share one database on PostgreSQL; SQLite runs one poller")
    devices = [
        SimulatedDevice(f"shared-{index}", files=dict(files), entries_per_quote=1) for index in range(24)
    ]
    store_runtime_policy(sessions, files)
    with Fleet(devices):
        for device in devices:
            register(sessions, device)
            add_to_verifier(service, device, poll_interval=0.3)

        outcome = run_pollers(sessions, 2, 4.0)

    assert outcome["alive"] == [False, False]
    pollers_seen: set[str] = set()
    for device in devices:
        records = sorted(attestations(sessions, device.device_id), key=lambda a: a.started_at)
        assert len(records) >= 3
        for earlier, later in zip(records, records[1:], strict=False):
            assert earlier.finished_at <= later.started_at, f"{device.device_id} attested twice at once"
        assert {a.status for a in records} == {"trusted"}
        pollers_seen.update(a.poller for a in records)
    assert pollers_seen == {"poller-0", "poller-1"}


def test_poller_queues_webhook_on_change(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    from verifier.outbox_models import Webhook, WebhookDelivery

    with transaction(sessions) as session:
        session.add(Webhook(url="http://127.0.0.1:9/hook", secret="s" * 32, created_at=utc_now()))
    poller = make_poller(sessions, clock)
    device = enrolled[1]
    poller.run_once()
    clock.advance(POLL_INTERVAL)
    poller.run_once()

    device.measure(next(iter(device.files)), secrets.token_bytes(32))
    clock.advance(POLL_INTERVAL)
    poller.run_once()

    with sessions() as session:
        queued = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        events = [(d.device_id, d.payload["old_status"], d.payload["new_status"]) for d in queued]
    assert events.count(("device-1", "trusted", "untrusted")) == 1
    assert events.count(("device-0", "unknown", "trusted")) == 1
    assert ("device-0", "trusted", "trusted") not in events


def test_poller_skips_push_mode_device(
    sessions: sessionmaker[Session], clock: FakeClock, enrolled: list[SimulatedDevice]
) -> None:
    from verifier.outbox_models import PushDevice

    with transaction(sessions) as session:
        session.add(PushDevice(device_id="device-2", enabled_at=utc_now()))
    poller = make_poller(sessions, clock)

    poller.run_once()

    assert attestations(sessions, "device-2") == []
    assert len(attestations(sessions, "device-0")) == 1
