"""The guard's trust API client against a fake trust server on 127.0.0.1, and the fake server itself.

``FakeTrustServer`` serves the two routes the guard reads, ``GET /v1/devices/{id}/verdict``
and ``GET /v1/verdicts/stream``, in the trust API's formats. A test drives them: it sets the
current verdict with or without a stream event, drops open streams cleanly or abruptly,
rejects new streams, turns off the replay after ``Last-Event-ID``, and stops the server. The
guard tests import it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from queue import Empty, SimpleQueue
from typing import Any

import pytest
import requests
from flask import Flask, Response, jsonify, request
from hypothesis import given
from hypothesis import strategies as st

from device.verdict_client import (
    Backoff,
    ClientOptions,
    Observation,
    RereadFailed,
    ServerClock,
    SseEvent,
    SseParser,
    TrustApiClient,
    VerdictClientError,
    VerdictFollower,
    VerdictFormatError,
    VerdictStatus,
    VerdictUpdate,
    parse_verdict,
    server_clock_of,
)
from tests.support.server import ServerThread

DEVICE_ID = "car-7"
TOKEN = "guard-test-token"
# Seconds a test waits for any expected effect. Each effect takes a few seconds at most.
DEADLINE = 30.0


def verdict(status: str, *, expires_in: float = 600.0, codes: tuple[str, ...] = (),
            device_id: str = DEVICE_ID, issued_at: datetime | None = None) -> dict[str, Any]:
    """Return a verdict in the trust API's JSON form, issued now unless ``issued_at`` is given."""
    now = datetime.now(UTC)
    issued = issued_at or now
    return {
        "verdict_id": str(uuid.uuid4()),
        "device_id": device_id,
        "status": status,
        "reasons": [{"code": code, "message": f"finding {code}"} for code in codes],
        "issued_at": issued.isoformat(),
        "attested_at": issued.isoformat(),
        "expires_at": (now + timedelta(seconds=expires_in)).isoformat() if status == "trusted" else None,
        "policies": [],
    }


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class _Abort(Exception):
    """Raised inside a stream's generator to break its connection without the closing chunk."""


_DROP = "drop"
_ABORT = "abort"


class FakeTrustServer:
    """A trust API with one device whose verdict and stream the test controls."""

    def __init__(self, device_id: str = DEVICE_ID, *, token: str | None = TOKEN,
                 heartbeat: float = 0.5) -> None:
        self.device_id = device_id
        self.token = token
        self.heartbeat = heartbeat
        self.current: dict[str, Any] = {
            **verdict("unknown", codes=("not-attested-yet",)), "verdict_id": None, "issued_at": None,
            "attested_at": None,
        }
        self.known = True
        self.sequence = 0
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.accept_streams = True
        self.replay = True
        self.verdict_reads = 0
        # The Last-Event-ID header of every stream connection, in order ("" when absent).
        self.stream_connects: list[str] = []
        self.rejected_tokens = 0
        self._lock = threading.Lock()
        self._streams: list[SimpleQueue[tuple[int, dict[str, Any]] | str]] = []
        self._server: ServerThread | None = None
        self.app = self._make_app()

    # Control from the test.

    def set_verdict(self, data: dict[str, Any], *, event: bool = True, cause: str = "attestation") -> None:
        """Make ``data`` the current verdict; with ``event`` also record and send a stream event."""
        with self._lock:
            self.current = data
            if not event:
                return
            self.sequence += 1
            item = (self.sequence, {**data, "cause": cause})
            self.history.append(item)
            for stream in self._streams:
                stream.put(item)

    def drop_streams(self, *, abrupt: bool = False) -> None:
        """End every open stream: cleanly, or by breaking the connection mid-body."""
        with self._lock:
            for stream in self._streams:
                stream.put(_ABORT if abrupt else _DROP)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def start(self, port: int = 0) -> FakeTrustServer:
        self._server = ServerThread(self.app, port)
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving: refuse streams, end the open ones and close the listening socket."""
        self.accept_streams = False
        self.drop_streams()
        if self._server is not None:
            self._server.stop()
            self._server = None

    # The Flask app.

    def _make_app(self) -> Flask:
        app = Flask("fake-trust-api")

        @app.after_request
        def no_keep_alive(response: Response) -> Response:
            # Each request gets a new connection, so stop() leaves no connection being served.
            response.headers["Connection"] = "close"
            return response

        @app.get("/v1/devices/<device_id>/verdict")
        def get_verdict(device_id: str) -> Response | tuple[Response, int]:
            denied = self._check_token()
            if denied is not None:
                return denied
            with self._lock:
                self.verdict_reads += 1
                known = self.known and device_id == self.device_id
                current = dict(self.current)
            if not known:
                message = f"device {device_id!r} is not in the verifier"
                return _error(404, "verifier-device-not-found", message)
            return jsonify(current)

        @app.get("/v1/verdicts/stream")
        def stream() -> Response | tuple[Response, int]:
            denied = self._check_token()
            if denied is not None:
                return denied
            if request.args.get("device_ids") != self.device_id:
                return _error(400, "invalid-field", "expected device_ids=<the device>")
            if not self.accept_streams:
                return _error(503, "database-unavailable", "streams are refused by the test")
            last_event_id = request.headers.get("Last-Event-ID", "")
            queue: SimpleQueue[tuple[int, dict[str, Any]] | str] = SimpleQueue()
            with self._lock:
                self.stream_connects.append(last_event_id)
                backlog = self._backlog(last_event_id)
                self._streams.append(queue)
            return Response(self._events(queue, backlog), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache"})

        return app

    def _check_token(self) -> tuple[Response, int] | None:
        if self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}":
            return None
        self.rejected_tokens += 1
        return _error(401, "unauthorized", "missing or invalid API token")

    def _backlog(self, last_event_id: str) -> list[tuple[int, dict[str, Any]]]:
        if not last_event_id:
            return [(self.sequence, {**self.current, "cause": "current"})]
        if not self.replay:
            return []
        return [(sequence, data) for sequence, data in self.history if sequence > int(last_event_id)]

    def _events(self, queue: SimpleQueue[tuple[int, dict[str, Any]] | str],
                backlog: list[tuple[int, dict[str, Any]]]) -> Iterator[str]:
        try:
            yield "retry: 200\n\n"
            for item in backlog:
                yield _encode(*item)
            while True:
                try:
                    item = queue.get(timeout=self.heartbeat)
                except Empty:
                    yield ": heartbeat\n\n"
                    continue
                if item == _DROP:
                    return
                if item == _ABORT:
                    raise _Abort("connection broken by the test")
                assert isinstance(item, tuple)
                yield _encode(*item)
        finally:
            with self._lock:
                self._streams.remove(queue)


def _encode(sequence: int, data: dict[str, Any]) -> str:
    return f"id: {sequence}\nevent: verdict\ndata: {json.dumps(data)}\n\n"


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


@pytest.fixture
def trust_server() -> Iterator[FakeTrustServer]:
    server = FakeTrustServer().start()
    yield server
    server.stop()


def make_client(server: FakeTrustServer, token: str | None = TOKEN) -> TrustApiClient:
    return TrustApiClient(DEVICE_ID, ClientOptions(server.url, token, request_timeout=5.0, idle_timeout=5.0))


# --- the server-sent events parser ------------------------------------------------------------


def test_sse_parser_reads_fields_and_comments() -> None:
    parser = SseParser()

    events = parser.feed(b"retry: 1500\n: heartbeat\n\nid: 4\nevent: verdict\ndata: {\"a\":\ndata: 1}\n\n")

    assert events == [SseEvent("verdict", '{"a":\n1}', "4")]
    assert parser.retry_milliseconds == 1500
    assert parser.comments == 1
    assert parser.last_event_id == "4"


def test_sse_parser_keeps_id_between_events() -> None:
    parser = SseParser()

    events = parser.feed(b"id: 9\ndata: one\n\ndata: two\n\n")

    assert [event.last_event_id for event in events] == ["9", "9"]
    assert [event.event_type for event in events] == ["message", "message"]


def test_sse_parser_skips_event_without_data() -> None:
    parser = SseParser()

    events = parser.feed(b"id: 3\nevent: verdict\n\n")

    assert events == []
    assert parser.last_event_id == "3"


def test_sse_parser_line_endings_and_bom() -> None:
    parser = SseParser()

    events = parser.feed("\ufeffdata: a\r\rdata: b\r\n\r\ndata: c\n\n".encode())

    assert [event.data for event in events] == ["a", "b", "c"]


def test_sse_parser_rejects_endless_line() -> None:
    parser = SseParser()

    with pytest.raises(VerdictClientError) as caught:
        parser.feed(b"data: " + b"x" * (1024 * 1024 + 1))

    assert caught.value.code == "stream-invalid"


STREAM = ("retry: 2000\r\n\r\nid: 1\nevent: verdict\ndata: {\"status\": \"trusted\"}\n\n"
          ": heartbeat\r\n\r\nid: 2\r\nevent: verdict\r\ndata: \u00e9t\u00e9\r\n\r\n"
          "id: 3\revent: other\rdata: x\r\r\n").encode()


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_sse_parser_chunking_does_not_matter(cuts: list[int]) -> None:
    whole = SseParser().feed(STREAM)
    parser = SseParser()
    events: list[SseEvent] = []
    bounds = [0, *sorted(cuts), len(STREAM)]

    for start, end in zip(bounds, bounds[1:], strict=False):
        events.extend(parser.feed(STREAM[start:end]))

    assert events == whole
    assert [event.last_event_id for event in whole] == ["1", "2", "3"]


# --- verdicts and the server clock ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"device_id": "car-8"}, "verdict-device-mismatch", "for device 'car-8', expected 'car-7'"),
        ({"status": "fine"}, "verdict-invalid", "status is 'fine'"),
        ({"expires_at": None}, "verdict-invalid", "trusted verdict has no expires_at"),
        ({"expires_at": "2026-01-01T00:00:00"}, "verdict-invalid", "has no UTC offset"),
        ({"expires_at": "soon"}, "verdict-invalid", "expected an ISO 8601 time"),
        ({"reasons": "bad"}, "verdict-invalid", "reasons is a str"),
        ({"reasons": [{"message": "no code"}]}, "verdict-invalid", "has no string 'code'"),
        ({"verdict_id": 7}, "verdict-invalid", "verdict_id is 7"),
    ],
)
def test_parse_verdict_rejects_malformed(change: dict[str, Any], code: str, message: str) -> None:
    data = {**verdict("trusted"), **change}

    with pytest.raises(VerdictFormatError, match=message) as caught:
        parse_verdict(data, DEVICE_ID)

    assert caught.value.code == code


def test_parse_verdict_reads_fields() -> None:
    data = verdict("untrusted", codes=("ima-digest-not-allowed", "quote-nonce-mismatch"))

    parsed = parse_verdict(data, DEVICE_ID)

    assert parsed.status is VerdictStatus.UNTRUSTED
    assert parsed.reason_codes == "ima-digest-not-allowed, quote-nonce-mismatch"
    assert parsed.verdict_id == data["verdict_id"]
    assert parsed.expires_at is None


def test_server_clock_bounds_expiry_by_date_header() -> None:
    response = requests.Response()
    response.headers["Date"] = "Fri, 04 Dec 2026 12:00:00 GMT"

    clock = server_clock_of(response, sent_at=100.0)

    assert clock == ServerClock(datetime(2026, 12, 4, 12, 0, 1, tzinfo=UTC), 100.0)
    assert clock.deadline(datetime(2026, 12, 4, 12, 0, 31, tzinfo=UTC)) == 130.0


def test_server_clock_missing_date_header() -> None:
    assert server_clock_of(requests.Response(), sent_at=1.0) is None


# --- the verdict route ------------------------------------------------------------------------


def test_client_reads_trusted_verdict(trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted", expires_in=60))
    client = make_client(trust_server)

    observation = client.current_verdict()

    assert observation.verdict.status is VerdictStatus.TRUSTED
    assert observation.source == "reread"
    remaining = observation.trusted_until() - time.monotonic()  # type: ignore[operator]
    assert 30 < remaining <= 60


def test_client_reads_missing_device_as_unknown(trust_server: FakeTrustServer) -> None:
    trust_server.known = False

    observation = make_client(trust_server).current_verdict()

    assert observation.verdict.status is VerdictStatus.UNKNOWN
    assert observation.verdict.reason_codes == "device-not-found"
    assert observation.trusted_until() is None


def test_client_reports_rejected_token(trust_server: FakeTrustServer) -> None:
    client = make_client(trust_server, token="wrong")

    with pytest.raises(VerdictClientError, match="HTTP 401 .*check the API token") as caught:
        client.current_verdict()

    assert caught.value.code == "trust-api-rejected"
    assert caught.value.status == 401


def test_client_reports_unreachable_server() -> None:
    server = FakeTrustServer().start()
    url = server.url
    server.stop()
    client = TrustApiClient(DEVICE_ID, ClientOptions(url, TOKEN, request_timeout=2.0))

    with pytest.raises(VerdictClientError, match="cannot reach the trust API") as caught:
        client.current_verdict()

    assert caught.value.code == "trust-api-unreachable"


# --- the stream -------------------------------------------------------------------------------


def test_stream_sends_current_then_changes(trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    client = make_client(trust_server)

    with client.open_stream(None) as stream:
        events = stream.events()
        first = next(events)
        trust_server.set_verdict(verdict("untrusted", codes=("ima-digest-not-allowed",)))
        second = next(events)

    assert json.loads(first.data)["cause"] == "current"
    assert json.loads(second.data)["status"] == "untrusted"
    assert second.last_event_id == "2"


def test_stream_resumes_after_last_event_id(trust_server: FakeTrustServer) -> None:
    for status in ("trusted", "untrusted", "trusted"):
        trust_server.set_verdict(verdict(status))
    client = make_client(trust_server)

    with client.open_stream("1") as stream:
        events = stream.events()
        replayed = [next(events), next(events)]

    assert trust_server.stream_connects == ["1"]
    assert [event.last_event_id for event in replayed] == ["2", "3"]
    assert [json.loads(event.data)["status"] for event in replayed] == ["untrusted", "trusted"]


def test_stream_abrupt_drop_raises(trust_server: FakeTrustServer) -> None:
    client = make_client(trust_server)

    with client.open_stream(None) as stream, pytest.raises(VerdictClientError) as caught:
        for _event in stream.events():
            trust_server.drop_streams(abrupt=True)

    assert caught.value.code == "stream-interrupted"


def test_stream_silence_times_out() -> None:
    server = FakeTrustServer(heartbeat=60.0).start()
    try:
        options = ClientOptions(server.url, TOKEN, request_timeout=5.0, idle_timeout=1.0)
        client = TrustApiClient(DEVICE_ID, options)
        started = time.monotonic()

        with client.open_stream(None) as stream, pytest.raises(VerdictClientError) as caught:
            for _event in stream.events():
                pass
    finally:
        server.stop()

    assert caught.value.code == "stream-interrupted"
    assert "timed out" in caught.value.message.lower()
    assert time.monotonic() - started < DEADLINE


def test_stream_rejects_refused_connection(trust_server: FakeTrustServer) -> None:
    trust_server.accept_streams = False

    with pytest.raises(VerdictClientError, match="HTTP 503") as caught:
        make_client(trust_server).open_stream(None)

    assert caught.value.status == 503


# --- the follower -----------------------------------------------------------------------------


class Collector:
    """Collects what a follower publishes."""

    def __init__(self) -> None:
        self.messages: list[VerdictUpdate | RereadFailed] = []
        self._lock = threading.Lock()

    def __call__(self, message: VerdictUpdate | RereadFailed) -> None:
        with self._lock:
            self.messages.append(message)

    def observations(self, source: str) -> list[Observation]:
        with self._lock:
            return [m.observation for m in self.messages
                    if isinstance(m, VerdictUpdate) and m.observation.source == source]

    def statuses(self, source: str) -> list[str]:
        return [observation.verdict.status.value for observation in self.observations(source)]


@pytest.mark.parametrize("abrupt", [False, True], ids=["clean-drop", "abrupt-drop"])
def test_follower_resumes_and_rereads_after_drop(trust_server: FakeTrustServer, abrupt: bool) -> None:
    trust_server.set_verdict(verdict("trusted"))
    collector = Collector()
    follower = VerdictFollower(make_client(trust_server), collector, backoff=Backoff(0.1, 0.5))
    follower.start()
    try:
        wait_for(lambda: collector.statuses("stream") == ["trusted"], "the current verdict from the stream")
        wait_for(lambda: collector.statuses("reread") == ["trusted"], "the reread after connecting")
        trust_server.accept_streams = False
        trust_server.drop_streams(abrupt=abrupt)
        wait_for(lambda: trust_server.open_streams == 0, "the stream to close")
        trust_server.set_verdict(verdict("untrusted", codes=("ima-digest-not-allowed",)))
        trust_server.accept_streams = True

        wait_for(lambda: "untrusted" in collector.statuses("stream"), "the replayed change")
        wait_for(lambda: "untrusted" in collector.statuses("reread"), "the reread after reconnecting")
    finally:
        follower.stop()

    assert trust_server.stream_connects[0] == ""
    assert trust_server.stream_connects[-1] == "1"
    assert follower.last_event_id == "2"


def test_follower_reports_failed_reread(trust_server: FakeTrustServer) -> None:
    collector = Collector()
    follower = VerdictFollower(make_client(trust_server, token="wrong"), collector, backoff=Backoff(0.1, 0.5))
    follower.start()
    try:
        wait_for(lambda: trust_server.rejected_tokens >= 1, "a request with the wrong token")
        follower.request_reread()
        wait_for(lambda: any(isinstance(m, RereadFailed) for m in collector.messages), "a failed reread")
    finally:
        follower.stop()

    failed = [m for m in collector.messages if isinstance(m, RereadFailed)]
    assert failed[0].error.status == 401
