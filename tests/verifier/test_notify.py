"""Webhooks for verdict changes: the outbox, signed delivery to a real receiver on 127.0.0.1,
retries, giving up, expiry events, a worker killed mid-delivery, and the /v1/webhooks routes.

Runs on SQLite and PostgreSQL. The worker's clock is a FakeClock, so retry delays are exact;
the receiver is a real HTTP server that responds with the statuses a test scripts.

``Receiver`` is imported by the push-mode tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.app import create_app
from edgetrust.db import make_engine, make_session_factory, transaction
from edgetrust.settings import Settings, SettingsError
from tests.verifier.conftest import FakeClock
from tests.verifier.test_trust_api import add_device, set_verdict
from verifier.notify import (
    IDEMPOTENCY_HEADER,
    DeliveryOptions,
    PreviousVerdict,
    WebhookDeliverer,
    WebhookService,
    WebhookSignatureError,
    enqueue_expired_verdicts,
    enqueue_verdict_change,
    verify_signature,
)
from verifier.outbox_models import WebhookDelivery
from verifier.verdicts import Reason, Verdict, VerdictStatus, new_verdict

SECRET = "receiver-secret-0123456789"


# --- a webhook receiver on 127.0.0.1 ------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass
class Receiver:
    """An HTTP server that records each POST and responds with the next scripted status (200
    once the script is used up). ``hold`` makes it wait before responding to the first request."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    hold: threading.Event | None = None
    first_request: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.received.append(Received({k: v for k, v in self.headers.items()}, body))
                receiver.first_request.set()
                if receiver.hold is not None and len(receiver.received) == 1:
                    receiver.hold.wait(30)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def idempotency_keys(self) -> list[str]:
        return [item.headers[IDEMPOTENCY_HEADER] for item in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


def add_webhook(sessions: sessionmaker[Session], url: str, clock: FakeClock, secret: str = SECRET) -> int:
    webhook = WebhookService(sessions, clock=clock).add(url, secret)
    return webhook.id


def make_deliverer(sessions: sessionmaker[Session], clock: FakeClock, **changes: Any) -> WebhookDeliverer:
    options: dict[str, Any] = {"worker_id": "worker-1", "timeout": 2.0, "max_attempts": 4,
                               "backoff_initial": 1.0, "backoff_max": 3.0, "poll_interval": 0.05,
                               "threads": 2}
    options.update(changes)
    return WebhookDeliverer(sessions, DeliveryOptions(**options), clock=clock)


def trusted_verdict(device_id: str, at: datetime) -> Verdict:
    return new_verdict(device_id, VerdictStatus.TRUSTED, (), issued_at=at, attested_at=at,
                       expires_at=at + timedelta(seconds=30))


def untrusted_verdict(device_id: str, at: datetime) -> Verdict:
    reason = Reason("ima-digest-not-allowed", "digest of /usr/bin/tool-1 is not allowed")
    return new_verdict(device_id, VerdictStatus.UNTRUSTED, (reason,), issued_at=at, attested_at=at)


NOT_ATTESTED = PreviousVerdict("unknown", ("not-attested-yet",), None)


def enqueue(sessions: sessionmaker[Session], verdict: Verdict,
            previous: PreviousVerdict = NOT_ATTESTED) -> int:
    with transaction(sessions) as session:
        return enqueue_verdict_change(session, verdict, previous)


def deliveries(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


# --- enqueue ------------------------------------------------------------------------------------


def test_enqueue_queues_one_row_per_webhook(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:1/a", clock)
    add_webhook(sessions, "http://127.0.0.1:1/b", clock)
    verdict = trusted_verdict("car-1", clock())

    queued = enqueue(sessions, verdict)

    assert queued == 2
    rows = deliveries(sessions)
    assert [row.status for row in rows] == ["pending", "pending"]
    assert {row.event_id for row in rows} == {f"{verdict.verdict_id}:attestation"}
    event = rows[0].payload
    assert event["device_id"] == "car-1"
    assert event["old_status"] == "unknown"
    assert event["new_status"] == "trusted"
    assert event["verdict_id"] == str(verdict.verdict_id)
    assert verdict.expires_at is not None
    assert event["expires_at"] == verdict.expires_at.isoformat()


def test_enqueue_twice_queues_once(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:1/a", clock)
    verdict = trusted_verdict("car-1", clock())

    first = enqueue(sessions, verdict)
    second = enqueue(sessions, verdict)

    assert (first, second) == (1, 0)
    assert len(deliveries(sessions)) == 1


def test_enqueue_skips_unchanged_verdict(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:1/a", clock)
    previous = PreviousVerdict("trusted", (), clock() + timedelta(seconds=10))

    queued = enqueue(sessions, trusted_verdict("car-1", clock()), previous)

    assert queued == 0
    assert deliveries(sessions) == []


def test_enqueue_counts_expired_trust_as_unknown(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:1/a", clock)
    previous = PreviousVerdict("trusted", (), clock() - timedelta(seconds=1))

    queued = enqueue(sessions, trusted_verdict("car-1", clock()), previous)

    assert queued == 1
    assert deliveries(sessions)[0].payload["old_status"] == "unknown"


def test_enqueue_on_core_connection(sessions: sessionmaker[Session], migrated_engine: Engine,
                                    clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:1/a", clock)

    with migrated_engine.begin() as connection:
        queued = enqueue_verdict_change(connection, untrusted_verdict("car-1", clock()), NOT_ATTESTED)

    assert queued == 1
    assert len(deliveries(sessions)) == 1


def test_enqueue_without_webhooks_queues_nothing(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    assert enqueue(sessions, untrusted_verdict("car-1", clock())) == 0


# --- delivery -----------------------------------------------------------------------------------


def test_delivery_is_signed(sessions: sessionmaker[Session], clock: FakeClock, receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, clock)
    verdict = untrusted_verdict("car-1", clock())
    enqueue(sessions, verdict)

    sent = make_deliverer(sessions, clock).run_once()

    assert sent == 1
    assert len(receiver.received) == 1
    request = receiver.received[0]
    verify_signature(SECRET, request.headers, request.body, now=clock())
    assert request.headers[IDEMPOTENCY_HEADER] == f"{verdict.verdict_id}:attestation"
    assert request.headers["X-Edgetrust-Event"] == "verdict.changed"
    event = request.event
    assert event["device_id"] == "car-1"
    assert event["old_status"] == "unknown"
    assert event["new_status"] == "untrusted"
    assert event["reasons"] == [{"code": "ima-digest-not-allowed",
                                 "message": "digest of /usr/bin/tool-1 is not allowed"}]
    assert event["attested_at"] == clock().isoformat()
    assert event["expires_at"] is None
    row = deliveries(sessions)[0]
    assert row.status == "delivered"
    assert row.attempts == 1
    assert row.last_status_code == 200


def test_signature_rejects_tampering(sessions: sessionmaker[Session], clock: FakeClock,
                                     receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, clock)
    enqueue(sessions, untrusted_verdict("car-1", clock()))
    make_deliverer(sessions, clock).run_once()
    request = receiver.received[0]

    with pytest.raises(WebhookSignatureError) as body_changed:
        verify_signature(SECRET, request.headers, request.body.replace(b"untrusted", b"trusted"), now=clock())
    with pytest.raises(WebhookSignatureError) as wrong_secret:
        verify_signature("another-secret-0123456789", request.headers, request.body, now=clock())
    with pytest.raises(WebhookSignatureError) as replayed:
        verify_signature(SECRET, request.headers, request.body, now=clock() + timedelta(minutes=10))
    retimed = {**request.headers, "X-Edgetrust-Timestamp": str(int(clock().timestamp()) + 1)}
    with pytest.raises(WebhookSignatureError) as timestamp_changed:
        verify_signature(SECRET, retimed, request.body, now=clock())

    assert body_changed.value.code == "webhook-signature-invalid"
    assert wrong_secret.value.code == "webhook-signature-invalid"
    assert replayed.value.code == "webhook-timestamp-stale"
    assert timestamp_changed.value.code == "webhook-signature-invalid"


def test_delivery_retries_after_500(sessions: sessionmaker[Session], clock: FakeClock,
                                    receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, clock)
    enqueue(sessions, untrusted_verdict("car-1", clock()))
    receiver.statuses = [500, 503]
    deliverer = make_deliverer(sessions, clock)

    deliverer.run_once()
    first = deliveries(sessions)[0]
    assert deliverer.run_once() == 0  # not due before its retry delay
    clock.advance(1.0)
    deliverer.run_once()
    second = deliveries(sessions)[0]
    clock.advance(1.9)
    assert deliverer.run_once() == 0  # the delay doubled to 2 s
    clock.advance(0.1)
    deliverer.run_once()

    assert first.status == "pending"
    assert first.attempts == 1
    assert first.last_status_code == 500
    assert second.attempts == 2
    assert second.last_error is not None and second.last_error.startswith("HTTP 503")
    final = deliveries(sessions)[0]
    assert final.status == "delivered"
    assert final.attempts == 3
    assert [item.headers["X-Edgetrust-Delivery-Attempt"] for item in receiver.received] == ["1", "2", "3"]
    assert len(set(receiver.idempotency_keys())) == 1


def test_delivery_gives_up_after_max_attempts(sessions: sessionmaker[Session], clock: FakeClock,
                                              receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, clock)
    enqueue(sessions, untrusted_verdict("car-1", clock()))
    receiver.statuses = [500] * 10
    deliverer = make_deliverer(sessions, clock, max_attempts=3)

    for _ in range(5):
        deliverer.run_once()
        clock.advance(10)

    row = deliveries(sessions)[0]
    assert row.status == "failed"
    assert row.attempts == 3
    assert len(receiver.received) == 3


def test_delivery_retries_unreachable_receiver(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_webhook(sessions, "http://127.0.0.1:9/closed", clock)
    enqueue(sessions, untrusted_verdict("car-1", clock()))

    make_deliverer(sessions, clock).run_once()

    row = deliveries(sessions)[0]
    assert row.status == "pending"
    assert row.attempts == 1
    assert row.last_status_code is None
    assert row.last_error is not None and "ConnectionError" in row.last_error


def test_each_receiver_gets_event_once(sessions: sessionmaker[Session], clock: FakeClock,
                                       receiver: Receiver) -> None:
    other = Receiver(statuses=[500])
    try:
        add_webhook(sessions, receiver.url, clock)
        add_webhook(sessions, other.url, clock, secret="second-receiver-secret")
        enqueue(sessions, untrusted_verdict("car-1", clock()))
        deliverer = make_deliverer(sessions, clock)

        deliverer.run_once()
        clock.advance(5)
        deliverer.run_once()
        deliverer.run_once()

        assert len(receiver.received) == 1
        assert len(other.received) == 2
        verify_signature("second-receiver-secret", other.received[1].headers, other.received[1].body,
                         now=clock())
        assert [row.status for row in deliveries(sessions)] == ["delivered", "delivered"]
    finally:
        other.close()


def test_outbox_survives_restart(database_url: str, migrated_engine: Engine, clock: FakeClock,
                                 receiver: Receiver) -> None:
    sessions = make_session_factory(migrated_engine)
    add_webhook(sessions, receiver.url, clock)
    enqueue(sessions, untrusted_verdict("car-1", clock()))
    migrated_engine.dispose()  # the process stops before any delivery

    restarted = make_engine(database_url)
    try:
        deliverer = make_deliverer(make_session_factory(restarted), clock)
        sent = deliverer.run_once()
        again = deliverer.run_once()
    finally:
        restarted.dispose()

    assert (sent, again) == (1, 0)
    assert len(receiver.received) == 1


_KILLED_WORKER = """
import sys
from datetime import datetime
from edgetrust.db import make_engine, make_session_factory
from verifier.notify import DeliveryOptions, WebhookDeliverer
engine = make_engine(sys.argv[1])
start = datetime.fromisoformat(sys.argv[2])
options = DeliveryOptions(worker_id="doomed", timeout=30.0, threads=1)
WebhookDeliverer(make_session_factory(engine), options, clock=lambda: start).run_once()
"""


def test_worker_killed_mid_delivery_redelivers(database_url: str, sessions: sessionmaker[Session],
                                              clock: FakeClock, tmp_path: Path) -> None:
    receiver = Receiver(hold=threading.Event())
    try:
        add_webhook(sessions, receiver.url, clock)
        verdict = untrusted_verdict("car-1", clock())
        enqueue(sessions, verdict)
        worker = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, database_url, clock().isoformat()],
                                  cwd=Path(__file__).resolve().parents[2])
        try:
            assert receiver.first_request.wait(60), "the worker never sent the delivery"
        finally:
            worker.kill()
            worker.wait(30)
        claimed = deliveries(sessions)[0]

        deliverer = make_deliverer(sessions, clock)
        early = deliverer.run_once()
        clock.advance(DeliveryOptions(worker_id="doomed", timeout=30.0).lease_seconds)
        late = deliverer.run_once()

        assert claimed.status == "pending"
        assert claimed.claim_id is not None
        assert (early, late) == (0, 1)
        assert receiver.idempotency_keys() == [f"{verdict.verdict_id}:attestation"] * 2
        assert deliveries(sessions)[0].status == "delivered"
    finally:
        receiver.close()


def test_worker_thread_delivers_until_stopped(sessions: sessionmaker[Session], clock: FakeClock,
                                              receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, clock)
    deliverer = make_deliverer(sessions, clock)
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stop,))
    thread.start()
    try:
        enqueue(sessions, untrusted_verdict("car-1", clock()))
        receiver.first_request.wait(10)
    finally:
        stop.set()
        thread.join(10)

    assert not thread.is_alive()
    assert len(receiver.received) == 1


def test_delivery_options_checked() -> None:
    with pytest.raises(SettingsError, match="webhook_backoff_initial"):
        DeliveryOptions(worker_id="w", backoff_initial=10, backoff_max=1)
    with pytest.raises(SettingsError, match="webhook_max_attempts"):
        DeliveryOptions(worker_id="w", max_attempts=0)


# --- expiry events ------------------------------------------------------------------------------


def test_expired_trust_queued_once(sessions: sessionmaker[Session], clock: FakeClock,
                                   receiver: Receiver) -> None:
    add_webhook(sessions, receiver.url, FakeClock(clock() - timedelta(hours=1)))
    add_device(sessions, "car-1")
    add_device(sessions, "car-2")
    expired_id = set_verdict(sessions, "car-1", "trusted", expires_in=-5)
    set_verdict(sessions, "car-2", "trusted", expires_in=600)
    deliverer = make_deliverer(sessions, clock)

    first = deliverer.run_once()
    second = deliverer.run_once()

    assert (first, second) == (1, 0)
    event = receiver.received[0].event
    assert event["cause"] == "expiry"
    assert event["device_id"] == "car-1"
    assert (event["old_status"], event["new_status"]) == ("trusted", "unknown")
    assert event["reasons"][0]["code"] == "verdict-expired"
    assert event["verdict_id"] == expired_id
    assert receiver.idempotency_keys() == [f"{expired_id}:expiry"]


def test_expiry_skips_later_webhooks(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    add_device(sessions, "car-1")
    set_verdict(sessions, "car-1", "trusted", expires_in=-60)
    add_webhook(sessions, "http://127.0.0.1:1/new", clock)

    with transaction(sessions) as session:
        queued = enqueue_expired_verdicts(session, clock())

    assert queued == 0


# --- routes -------------------------------------------------------------------------------------


@pytest.fixture
def client(migrated_engine: Engine, tmp_path: Path) -> Any:
    settings = Settings(data_dir=tmp_path, api_auth=False,
                        database_url=migrated_engine.url.render_as_string(hide_password=False))
    return create_app(settings, engine=migrated_engine).test_client()


def test_webhook_routes(client: Any) -> None:
    created = client.post("/v1/webhooks", json={"url": "https://hooks.example/edgetrust"})
    listed = client.get("/v1/webhooks")
    duplicate = client.post("/v1/webhooks", json={"url": "https://hooks.example/edgetrust"})
    webhook_id = created.get_json()["id"]
    history = client.get(f"/v1/webhooks/{webhook_id}/deliveries?status=failed")
    removed = client.delete(f"/v1/webhooks/{webhook_id}")
    missing = client.delete(f"/v1/webhooks/{webhook_id}")

    assert created.status_code == 201
    assert len(created.get_json()["secret"]) >= 32
    assert listed.get_json()["webhooks"] == [{
        "id": webhook_id, "url": "https://hooks.example/edgetrust",
        "created_at": created.get_json()["created_at"],
        "deliveries": {"pending": 0, "delivered": 0, "failed": 0},
    }]
    assert "secret" not in listed.get_json()["webhooks"][0]
    assert duplicate.status_code == 409
    assert duplicate.get_json()["error"]["code"] == "webhook-exists"
    assert history.get_json() == {"webhook_id": webhook_id, "deliveries": []}
    assert removed.status_code == 204
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "webhook-not-found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "url"),
        ({"url": "ftp://hooks.example/x"}, "url"),
        ({"url": "https://user:pass@hooks.example/x"}, "url"),
        ({"url": "https://hooks.example/x", "secret": "short"}, "secret"),
        ({"url": "https://hooks.example/x", "secret": 12345678901234567}, "secret"),
    ],
)
def test_webhook_create_names_invalid_field(client: Any, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/webhooks", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == field


def test_webhook_deliveries_listed(client: Any, migrated_engine: Engine) -> None:
    sessions = make_session_factory(migrated_engine)
    webhook_id = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x",
                                                   "secret": SECRET}).get_json()["id"]
    device_id = f"car-{uuid.uuid4().hex[:6]}"
    enqueue(sessions, untrusted_verdict(device_id, datetime.now(UTC)))

    listed = client.get(f"/v1/webhooks/{webhook_id}/deliveries").get_json()["deliveries"]
    counts = client.get("/v1/webhooks").get_json()["webhooks"][0]["deliveries"]

    assert [item["device_id"] for item in listed] == [device_id]
    assert listed[0]["status"] == "pending"
    assert counts == {"pending": 1, "delivered": 0, "failed": 0}
