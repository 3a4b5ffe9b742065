"""The verdict stream over real HTTP on 127.0.0.1: changes, resumption, expiry and heartbeats."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from edgetrust.db import make_engine, transaction, upgrade
from tests.support.server import ServerThread, serving
from tests.verifier.test_trust_api import TrustEnv, add_device, make_trust_env, map_node, set_verdict
from verifier.events import ChangeFeed
from verifier.models import VerdictRecord

# Seconds a test waits for one event before it fails.
EVENT_TIMEOUT = 10.0


@dataclass
class Event:
    id: int
    name: str
    data: dict[str, Any]


@dataclass
class StreamReader:
    """Parse server-sent events from a streaming ``requests`` response."""

    response: requests.Response
    heartbeats: int = 0
    retry: int | None = None
    _lines: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._lines = self.response.iter_lines(decode_unicode=True)

    def next_event(self, timeout: float = EVENT_TIMEOUT) -> Event:
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        for line in self._lines:
            if line == "" and "data" in fields:
                return Event(int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"]))
            if line.startswith(":"):
                self.heartbeats += 1
            elif line.startswith("retry:"):
                self.retry = int(line[6:])
            elif ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"no event within {timeout} s")

    def events(self, count: int) -> list[Event]:
        return [self.next_event() for _ in range(count)]

    def wait_for_heartbeats(self, count: int, timeout: float = EVENT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for line in self._lines:
            if line.startswith(":"):
                self.heartbeats += 1
            elif line.startswith("id:"):
                raise AssertionError(f"unexpected event while waiting for heartbeats: {line}")
            if self.heartbeats >= count or time.monotonic() > deadline:
                return


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def env(engine: Engine, tmp_path: Path) -> TrustEnv:
    return make_trust_env(engine, tmp_path, trust_stream_poll_interval=0.05, trust_stream_heartbeat=0.3,
                          trust_stream_max_seconds=30.0)


@pytest.fixture
def server(env: TrustEnv) -> Iterator[ServerThread]:
    with serving(env.app) as server:
        yield server


@contextmanager
def stream(server: ServerThread, env: TrustEnv, query: str = "", *,
           last_event_id: int | None = None) -> Iterator[StreamReader]:
    headers = {**env.headers, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with requests.get(f"{server.url}/v1/verdicts/stream{query}", headers=headers, stream=True,
                      timeout=(5, EVENT_TIMEOUT)) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield StreamReader(response)


# --- connect, change, resume, expiry --------------------------------------------------------------


def test_stream_sends_current_verdicts_on_connect(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)

    with stream(server, env, "?device_ids=car-1,car-9") as reader:
        trusted, missing = reader.events(2)

    assert reader.retry == 2000
    assert trusted.name == "verdict"
    assert trusted.data["cause"] == "current"
    assert trusted.data["status"] == "trusted"
    assert trusted.id >= 1
    assert missing.data["device_id"] == "car-9"
    assert missing.data["status"] == "unknown"
    assert missing.data["reasons"][0]["code"] == "device-not-found"


def test_stream_delivers_a_verdict_change(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    add_device(env.sessions, "car-2")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)

    with stream(server, env, "?device_ids=car-1") as reader:
        current = reader.next_event()
        set_verdict(env.sessions, "car-2", "untrusted", codes=("quote-invalid",))
        verdict_id = set_verdict(env.sessions, "car-1", "untrusted", codes=("ima-digest-not-allowed",))
        change = reader.next_event()

    assert change.data["cause"] == "attestation"
    assert change.data["device_id"] == "car-1"
    assert change.data["status"] == "untrusted"
    assert change.data["verdict_id"] == verdict_id
    assert change.data["reasons"][0]["code"] == "ima-digest-not-allowed"
    assert change.id > current.id + 1


def test_stream_resumes_from_last_event_id(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=60)
    with stream(server, env, "?device_ids=car-1") as reader:
        last_seen = reader.next_event().id

    missed = [set_verdict(env.sessions, "car-1", "untrusted", codes=("quote-invalid",)),
              set_verdict(env.sessions, "car-1", "trusted", expires_in=60)]
    with stream(server, env, "?device_ids=car-1", last_event_id=last_seen) as reader:
        replayed = reader.events(2)
        later = set_verdict(env.sessions, "car-1", "untrusted", codes=("pcr-mismatch",))
        live = reader.next_event()

    assert [event.data["verdict_id"] for event in replayed] == missed
    assert [event.data["cause"] for event in replayed] == ["attestation", "attestation"]
    assert last_seen < replayed[0].id < replayed[1].id < live.id
    assert live.data["verdict_id"] == later


def test_stream_emits_expiry(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=1.5)

    with stream(server, env, "?device_ids=car-1") as reader:
        current = reader.next_event()
        expiry = reader.next_event()

    assert current.data["status"] == "trusted"
    assert expiry.data["cause"] == "expiry"
    assert expiry.data["status"] == "unknown"
    assert expiry.data["reasons"][0]["code"] == "verdict-expired"
    assert expiry.id == current.id


def test_stream_emits_expiry_after_resume(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "untrusted", codes=("quote-invalid",))
    with stream(server, env, "?device_ids=car-1") as reader:
        last_seen = reader.next_event().id
    set_verdict(env.sessions, "car-1", "trusted", expires_in=1.5)

    with stream(server, env, "?device_ids=car-1", last_event_id=last_seen) as reader:
        change = reader.next_event()
        expiry = reader.next_event()

    assert change.data["status"] == "trusted"
    assert expiry.data["status"] == "unknown"
    assert expiry.data["cause"] == "expiry"


def test_renewed_trust_does_not_expire(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    set_verdict(env.sessions, "car-1", "trusted", expires_in=1.0)

    with stream(server, env, "?device_ids=car-1") as reader:
        reader.next_event()
        # A newer passing attestation extends the expiry without a change row.
        set_verdict(env.sessions, "car-1", "trusted", expires_in=60, record=False)
        time.sleep(1.5)
        reader.wait_for_heartbeats(reader.heartbeats + 2)

    assert reader.heartbeats >= 2


def test_stream_by_node(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    add_device(env.sessions, "car-2")
    map_node(env.sessions, "node-a", "car-1")
    map_node(env.sessions, "node-b", "car-2")

    with stream(server, env, "?nodes=node-a,node-z") as reader:
        mapped, unmapped = reader.events(2)
        set_verdict(env.sessions, "car-2", "trusted", expires_in=60)
        set_verdict(env.sessions, "car-1", "trusted", expires_in=60)
        change = reader.next_event()

    assert mapped.data["node"] == "node-a"
    assert mapped.data["reasons"][0]["code"] == "not-attested-yet"
    assert unmapped.data["node"] == "node-z"
    assert unmapped.data["reasons"][0]["code"] == "node-not-mapped"
    assert change.data["node"] == "node-a"
    assert change.data["device_id"] == "car-1"


def test_stream_of_every_device(env: TrustEnv, server: ServerThread) -> None:
    add_device(env.sessions, "car-1")
    add_device(env.sessions, "car-2")

    with stream(server, env) as reader:
        current = reader.events(2)
        set_verdict(env.sessions, "car-2", "trusted", expires_in=60)
        change = reader.next_event()

    assert sorted(event.data["device_id"] for event in current) == ["car-1", "car-2"]
    assert change.data["device_id"] == "car-2"


def test_stream_ends_after_max_seconds(engine: Engine, tmp_path: Path) -> None:
    env = make_trust_env(engine, tmp_path, trust_stream_poll_interval=0.05, trust_stream_heartbeat=0.2,
                         trust_stream_max_seconds=1.0)
    started = time.monotonic()

    with serving(env.app) as server, stream(server, env) as reader:
        body = reader.response.text

    assert time.monotonic() - started < 5
    assert ": heartbeat" in body


def test_stream_needs_a_token(env: TrustEnv, server: ServerThread) -> None:
    response = requests.get(f"{server.url}/v1/verdicts/stream", timeout=5)

    assert response.status_code == 401


@pytest.mark.parametrize("query", ["?device_ids=a&nodes=b", "?nodes=Bad_Node"])
def test_stream_rejects_bad_query(env: TrustEnv, server: ServerThread, query: str) -> None:
    response = requests.get(f"{server.url}/v1/verdicts/stream{query}", headers=env.headers, timeout=5)

    assert response.status_code == 400


def test_stream_rejects_bad_last_event_id(env: TrustEnv, server: ServerThread) -> None:
    response = requests.get(f"{server.url}/v1/verdicts/stream",
                            headers={**env.headers, "Last-Event-ID": "abc"}, timeout=5)

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "Last-Event-ID"


# --- the change feed at sequence gaps ----------------------------------------------------------------


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def add_record(env: TrustEnv, record_id: int, device_id: str, issued_at: datetime) -> None:
    with transaction(env.sessions) as session:
        session.add(VerdictRecord(id=record_id, verdict_id=f"00000000-0000-0000-0000-{record_id:012d}",
                                  device_id=device_id, status="unknown", reasons=[], policies=[],
                                  issued_at=issued_at, attested_at=None, expires_at=None,
                                  attestation_id=None))


def test_feed_waits_at_a_fresh_gap(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    now = datetime.now(UTC)
    add_record(env, 1, "car-1", now)
    add_record(env, 3, "car-1", now)
    monotonic = Monotonic()
    feed = ChangeFeed(0, clock=lambda: now, monotonic=monotonic)

    with env.sessions() as session:
        first = [row.id for row in feed.read(session)]
        waiting = [row.id for row in feed.read(session)]
    add_record(env, 2, "car-1", now)
    with env.sessions() as session:
        filled = [row.id for row in feed.read(session)]

    assert first == [1]
    assert waiting == []
    assert filled == [2, 3]
    assert feed.cursor == 3


def test_feed_passes_a_gap_after_waiting(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    now = datetime.now(UTC)
    add_record(env, 1, "car-1", now)
    add_record(env, 3, "car-1", now)
    monotonic = Monotonic()
    feed = ChangeFeed(1, clock=lambda: now, monotonic=monotonic)

    with env.sessions() as session:
        waiting = [row.id for row in feed.read(session)]
        monotonic.now += 6.0
        passed = [row.id for row in feed.read(session)]

    assert waiting == []
    assert passed == [3]


def test_feed_passes_an_old_gap_at_once(env: TrustEnv) -> None:
    add_device(env.sessions, "car-1")
    old = datetime.now(UTC) - timedelta(minutes=10)
    add_record(env, 1, "car-1", old)
    add_record(env, 5, "car-1", old)
    feed = ChangeFeed(0, clock=lambda: datetime.now(UTC), monotonic=Monotonic())

    with env.sessions() as session:
        rows = [row.id for row in feed.read(session)]

    assert rows == [1, 5]
