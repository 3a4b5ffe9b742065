"""Trust API client for one device: its current verdict and the stream of its verdict changes.

The guard uses two routes of the trust API, both with an ``Authorization: Bearer`` token of
scope ``read``:

    GET /v1/devices/{id}/verdict                  the device's current verdict
    GET /v1/verdicts/stream?device_ids={id}       server-sent events named ``verdict``, each
                                                  carrying a whole verdict; ``Last-Event-ID``
                                                  resumes after the last event received

:class:`VerdictFollower` keeps a device's verdict current. One thread follows the stream and
reconnects with backoff and ``Last-Event-ID`` when it drops or stays silent for longer than
the idle timeout (the server sends heartbeat comments while nothing changes). A second thread
reads the current verdict after every reconnect and whenever the guard asks, because the
stream does not report every change: a trusted verdict whose expiry another attestation
extends sends no event, and neither does a trusted verdict that follows an expired one.

Expiry is judged on the server's clock, not the device's: a board without a real-time clock
can boot with a wrong time. Each response's ``Date`` header gives an upper bound on the server
time at the moment the request was sent (:class:`ServerClock`), and a verdict's ``expires_at``
becomes a deadline on the device's monotonic clock. The bound errs early, so the guard may
stop the workload up to about one second plus a round trip before the verifier would.
"""

from __future__ import annotations

import codecs
import email.utils
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import requests
import urllib3.exceptions

from device.errors import DeviceError
from edgetrust.logs import device_logger

log = logging.getLogger(__name__)

VERDICT_EVENT: Final = "verdict"
# Reason code this client gives a device that the verifier does not attest (HTTP 404).
DEVICE_NOT_FOUND: Final = "device-not-found"
# A Date header has whole seconds, so the server time may be up to this much later.
DATE_RESOLUTION: Final = timedelta(seconds=1)
# Maximum length, in characters, of a line that the stream parser buffers. A verdict event is a
# few kilobytes.
MAX_LINE_CHARS: Final = 1024 * 1024
# Bytes requested in one read of the stream.
READ_SIZE: Final = 64 * 1024


class VerdictClientError(DeviceError):
    """The trust API could not be reached or returned an error; ``status`` is the HTTP status."""

    default_code = "trust-api-failed"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message, code=code)
        self.status = status


class VerdictFormatError(VerdictClientError):
    """A verdict or a stream event from the trust API is malformed or names another device."""

    default_code = "verdict-invalid"


# --- verdicts ---------------------------------------------------------------------------------


class VerdictStatus(enum.StrEnum):
    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Reason:
    """A finding behind a verdict: its stable code and its message."""

    code: str
    message: str


@dataclass(frozen=True)
class DeviceVerdict:
    """A verdict as the trust API sent it, checked for form."""

    device_id: str
    status: VerdictStatus
    reasons: tuple[Reason, ...]
    # None for a device that was never attested or is not in the verifier.
    verdict_id: str | None
    issued_at: datetime | None
    attested_at: datetime | None
    # Set exactly when the status is trusted.
    expires_at: datetime | None

    @property
    def reason_codes(self) -> str:
        return ", ".join(reason.code for reason in self.reasons) or "none"

    def is_older_than(self, other: DeviceVerdict) -> bool:
        """Tell whether this verdict was issued before ``other``; unknown issue times are never older."""
        if self.issued_at is None or other.issued_at is None:
            return False
        return self.issued_at < other.issued_at


def parse_verdict(unverified: object, device_id: str) -> DeviceVerdict:
    """Check the form of a verdict in the trust API's JSON; raise VerdictFormatError."""
    if not isinstance(unverified, Mapping):
        raise VerdictFormatError(f"verdict is a {type(unverified).__name__}, expected a JSON object")

    sent_device_id = unverified.get("device_id")
    if sent_device_id != device_id:
        raise VerdictFormatError(f"verdict is for device {sent_device_id!r}, expected {device_id!r}",
                                 code="verdict-device-mismatch")

    status_text = unverified.get("status")
    try:
        status = VerdictStatus(str(status_text))
    except ValueError:
        raise VerdictFormatError(f"verdict status is {status_text!r}, expected trusted, untrusted "
                                 "or unknown") from None

    expires_at = _optional_time(unverified, "expires_at")
    if status is VerdictStatus.TRUSTED and expires_at is None:
        raise VerdictFormatError("trusted verdict has no expires_at")

    verdict_id = unverified.get("verdict_id")
    if verdict_id is not None and not isinstance(verdict_id, str):
        raise VerdictFormatError(f"verdict_id is {verdict_id!r}, expected a string or null")

    return DeviceVerdict(
        device_id=device_id,
        status=status,
        reasons=_reasons(unverified.get("reasons")),
        verdict_id=verdict_id,
        issued_at=_optional_time(unverified, "issued_at"),
        attested_at=_optional_time(unverified, "attested_at"),
        expires_at=expires_at if status is VerdictStatus.TRUSTED else None,
    )


def _reasons(unverified: object) -> tuple[Reason, ...]:
    if unverified is None:
        return ()
    if not isinstance(unverified, list):
        raise VerdictFormatError(f"verdict reasons is a {type(unverified).__name__}, expected a list")
    reasons = []
    for item in unverified:
        if not isinstance(item, Mapping) or not isinstance(item.get("code"), str):
            raise VerdictFormatError(f"verdict reason {item!r} has no string 'code'")
        reasons.append(Reason(item["code"], str(item.get("message", ""))))
    return tuple(reasons)


def _optional_time(unverified: Mapping[str, Any], field: str) -> datetime | None:
    value = unverified.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise VerdictFormatError(f"verdict {field} is {value!r}, expected an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise VerdictFormatError(f"verdict {field} is {value[:60]!r}, expected an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise VerdictFormatError(f"verdict {field} is {value[:60]!r}, which has no UTC offset")
    return parsed


def unknown_verdict(device_id: str, code: str, message: str) -> DeviceVerdict:
    """Return an unknown verdict for one reason, such as a device the verifier does not attest."""
    return DeviceVerdict(device_id, VerdictStatus.UNKNOWN, (Reason(code, message),), None, None, None, None)


# --- the server's clock -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServerClock:
    """An upper bound, ``server_time``, on the server's time at the monotonic instant ``monotonic``."""

    server_time: datetime
    monotonic: float

    def deadline(self, at: datetime) -> float:
        """Return the monotonic time by which the server's clock has certainly reached ``at``."""
        return self.monotonic + (at - self.server_time).total_seconds()


def server_clock_of(response: requests.Response, sent_at: float) -> ServerClock | None:
    """Read the server time from the ``Date`` header of a response to a request sent at ``sent_at``.

    The server wrote the header after the request was sent, so its value plus the header's
    one-second resolution bounds the server time at ``sent_at`` from above. None when the
    header is missing or unreadable.
    """
    text = response.headers.get("Date")
    if not text:
        return None
    try:
        date = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return ServerClock(date + DATE_RESOLUTION, sent_at)


@dataclass(frozen=True)
class Observation:
    """A verdict together with the server clock reading of the response that carried it."""

    verdict: DeviceVerdict
    clock: ServerClock
    # Origin of the verdict: "reread" (the verdict route) or "stream".
    source: str

    def trusted_until(self) -> float | None:
        """Return the monotonic deadline of a trusted verdict, None for any other status."""
        if self.verdict.status is not VerdictStatus.TRUSTED or self.verdict.expires_at is None:
            return None
        return self.clock.deadline(self.verdict.expires_at)


# --- server-sent events -----------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    """One dispatched server-sent event."""

    event_type: str
    data: str
    # The stream's last event id when the event was dispatched ("" when none was sent yet).
    last_event_id: str


class SseParser:
    """Parse a ``text/event-stream`` body incrementally, as the WHATWG HTML standard describes.

    Lines end with CRLF, LF or CR; a blank line dispatches the event. Comment lines (``:``),
    such as heartbeats, only count in ``comments``. ``retry_milliseconds`` is the server's
    reconnection delay, None until it sends one.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._first_text = True
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self.last_event_id = ""
        self.retry_milliseconds: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes of the body and return the events they complete."""
        text = self._decoder.decode(chunk)
        if self._first_text and text:
            text = text.removeprefix("\ufeff")
            self._first_text = False
        self._pending += text
        events = []
        for line in self._complete_lines():
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        if len(self._pending) > MAX_LINE_CHARS:
            raise VerdictClientError(f"verdict stream sent a line longer than {MAX_LINE_CHARS} "
                                     "characters", code="stream-invalid")
        return events

    def _complete_lines(self) -> Iterator[str]:
        start = 0
        text = self._pending
        while True:
            cr = text.find("\r", start)
            lf = text.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                if cr + 1 == len(text):
                    break  # a CR at the end may be the first half of a CRLF
                yield text[start:cr]
                start = cr + 2 if text[cr + 1] == "\n" else cr + 1
            else:
                yield text[start:lf]
                start = lf + 1
        self._pending = text[start:]

    def _process_line(self, line: str) -> SseEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event_type = value
        elif field == "id" and "\0" not in value:
            self._id_buffer = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry_milliseconds = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        self.last_event_id = self._id_buffer
        if not self._data:
            self._event_type = ""
            return None
        event = SseEvent(self._event_type or "message", "\n".join(self._data), self.last_event_id)
        self._data = []
        self._event_type = ""
        return event


# --- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOptions:
    base_url: str
    token: str | None
    # Seconds to connect and to read the verdict route's response.
    request_timeout: float = 10.0
    # Seconds without a byte on the stream, heartbeats included, after which it counts as dropped.
    idle_timeout: float = 45.0
    # PEM CA bundle for an https base URL; None means the requests package's bundle.
    ca_file: Path | None = None


class TrustApiClient:
    """Read one device's verdict and verdict stream from the trust API.

    Each thread gets its own ``requests.Session``, because requests does not promise that a
    session is safe to share between threads.
    """

    def __init__(self, device_id: str, options: ClientOptions, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.options = options
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._monotonic = monotonic
        self._log = device_logger(log, device_id)
        self._warned_no_date = False

    @property
    def base_url(self) -> str:
        return self.options.base_url.rstrip("/")

    def current_verdict(self) -> Observation:
        """Read the device's current verdict; a device that the verifier does not attest is unknown."""
        url = f"{self.base_url}/v1/devices/{quote(self.device_id, safe='')}/verdict"
        sent_at = self._monotonic()
        try:
            response = self._session().get(url, headers=self._headers("application/json"),
                                         timeout=self.options.request_timeout, verify=self._verify())
        except requests.RequestException as error:
            raise _unreachable(url, error) from None

        clock = self._clock(response, sent_at)
        if response.status_code == 404:
            code, message = _error_of(response)
            return Observation(unknown_verdict(self.device_id, DEVICE_NOT_FOUND, message or code), clock,
                               "reread")
        if response.status_code != 200:
            raise _http_error(url, response)
        try:
            body = response.json()
        except ValueError:
            raise VerdictFormatError(f"GET {url} returned a body that is not JSON") from None
        return Observation(parse_verdict(body, self.device_id), clock, "reread")

    def open_stream(self, last_event_id: str | None) -> VerdictStream:
        """Connect to the verdict stream, resuming after ``last_event_id`` when given."""
        url = f"{self.base_url}/v1/verdicts/stream"
        headers = self._headers("text/event-stream")
        headers["Cache-Control"] = "no-cache"
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        sent_at = self._monotonic()
        try:
            response = self._session().get(
                url, params={"device_ids": self.device_id}, headers=headers, stream=True,
                timeout=(self.options.request_timeout, self.options.idle_timeout), verify=self._verify(),
            )
        except requests.RequestException as error:
            raise _unreachable(url, error) from None
        if response.status_code != 200:
            try:
                raise _http_error(url, response)
            finally:
                response.close()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if media_type != "text/event-stream":
            response.close()
            raise VerdictClientError(f"GET {url} returned Content-Type {media_type!r}, expected "
                                     "text/event-stream", code="stream-invalid")
        return VerdictStream(response, self._clock(response, sent_at))

    def close(self) -> None:
        """Close the sessions of every thread; call when no thread uses the client any more."""
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        return headers

    def _verify(self) -> bool | str:
        return str(self.options.ca_file) if self.options.ca_file is not None else True

    def _clock(self, response: requests.Response, sent_at: float) -> ServerClock:
        clock = server_clock_of(response, sent_at)
        if clock is not None:
            return clock
        if not self._warned_no_date:
            self._log.warning("the trust API sent no readable Date header; judging verdict expiry "
                              "on this device's clock, which may be wrong")
            self._warned_no_date = True
        return ServerClock(datetime.now(UTC), self._monotonic())


class VerdictStream:
    """An open verdict stream; iterate :meth:`events`, then close it (or use ``with``)."""

    def __init__(self, response: requests.Response, clock: ServerClock) -> None:
        self._response = response
        self.clock = clock
        self.parser = SseParser()

    def __enter__(self) -> VerdictStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def events(self) -> Iterator[SseEvent]:
        """Yield events until the server ends the stream; raise VerdictClientError when it breaks."""
        try:
            for chunk in self._chunks():
                yield from self.parser.feed(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise VerdictClientError(f"verdict stream broke: {_describe(error)}",
                                     code="stream-interrupted") from None

    def _chunks(self) -> Iterator[bytes]:
        raw = self._response.raw
        read1 = getattr(raw, "read1", None)
        if read1 is None:
            # NOTE: urllib3 before 2.3 has no read1; iter_content then waits for whole chunks,
            # which is enough for the chunked responses Flask servers send.
            yield from self._response.iter_content(chunk_size=None)
            return
        while True:
            data = read1(READ_SIZE, decode_content=True)
            if not data:
                return
            yield data

    def close(self) -> None:
        self._response.close()


def _unreachable(url: str, error: requests.RequestException) -> VerdictClientError:
    return VerdictClientError(f"cannot reach the trust API at {url}: {_describe(error)}",
                              code="trust-api-unreachable")


def _http_error(url: str, response: requests.Response) -> VerdictClientError:
    code, message = _error_of(response)
    detail = f" ({code}: {message})" if code else ""
    hint = ""
    if response.status_code == 401:
        hint = "; check the API token (--token or --token-file)"
    elif response.status_code == 403:
        hint = "; the API token needs the read scope"
    return VerdictClientError(f"GET {url} returned HTTP {response.status_code}{detail}{hint}",
                              code="trust-api-rejected" if response.status_code < 500 else None,
                              status=response.status_code)


def _error_of(response: requests.Response) -> tuple[str, str]:
    """Return the code and message of an edgetrust error body, or empty strings."""
    try:
        body = response.json()
    except ValueError:
        return "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code", "")), str(error.get("message", ""))


def _describe(error: BaseException) -> str:
    text = str(error)
    name = error.__class__.__name__
    return f"{name}: {text}" if text else name


# --- following a device's verdict -------------------------------------------------------------


@dataclass(frozen=True)
class VerdictUpdate:
    """A verdict read from the verdict route or the stream."""

    observation: Observation


@dataclass(frozen=True)
class RereadFailed:
    """Reading the current verdict failed."""

    error: VerdictClientError


FollowerMessage = VerdictUpdate | RereadFailed


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: ``initial`` seconds, doubling up to ``maximum``."""

    initial: float = 1.0
    maximum: float = 30.0

    def delay(self, failures: int) -> float:
        """Return the delay after ``failures`` failures in a row (at least one)."""
        exponent = min(max(failures - 1, 0), 30)
        return min(self.initial * 2**exponent, self.maximum)


class _FailureLog:
    """Log the first failure of a streak and every tenth after it; log the recovery."""

    def __init__(self, logger: logging.LoggerAdapter[logging.Logger], operation: str) -> None:
        self._log = logger
        self._operation = operation
        self.streak = 0

    def failed(self, error: VerdictClientError, retry_in: float) -> None:
        self.streak += 1
        level = logging.WARNING if self.streak % 10 == 1 else logging.DEBUG
        self._log.log(level, "%s failed (%d in a row), retrying in %.1f s: %s", self._operation, self.streak,
                      retry_in, error.message)

    def succeeded(self) -> None:
        if self.streak:
            self._log.info("%s works again after %d failures", self._operation, self.streak)
        self.streak = 0


class VerdictFollower:
    """Publish every verdict of one device that the stream or the verdict route delivers.

    :meth:`start` runs two daemon threads. The stream thread reconnects after any failure
    with :class:`Backoff` delays, sending the last event id it received, and requests a reread
    of the current verdict after every connect. The reread thread reads the verdict route
    whenever asked (:meth:`request_reread`). Every result goes to ``publish``, from either
    thread; verdicts may arrive out of order, so the receiver compares their ``issued_at``.
    """

    def __init__(self, client: TrustApiClient, publish: Callable[[FollowerMessage], None], *,
                 backoff: Backoff) -> None:
        self._client = client
        self._publish = publish
        self._backoff = backoff
        self._stop = threading.Event()
        self._reread_requested = threading.Event()
        self._log = device_logger(log, client.device_id)
        self.last_event_id: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._follow_stream, name="verdict-stream", daemon=True).start()
        threading.Thread(target=self._reread_loop, name="verdict-reread", daemon=True).start()

    def stop(self) -> None:
        """Ask both threads to end; a thread blocked on the network ends when its read returns."""
        self._stop.set()
        self._reread_requested.set()

    def request_reread(self) -> None:
        self._reread_requested.set()

    # The reread thread.

    def _reread_loop(self) -> None:
        while True:
            self._reread_requested.wait()
            self._reread_requested.clear()
            if self._stop.is_set():
                return
            try:
                observation = self._client.current_verdict()
            except VerdictClientError as error:
                self._publish(RereadFailed(error))
            else:
                self._publish(VerdictUpdate(observation))

    # The stream thread.

    def _follow_stream(self) -> None:
        failures = _FailureLog(self._log, "verdict stream")
        while not self._stop.is_set():
            try:
                retry_milliseconds = self._follow_once(failures)
            except VerdictClientError as error:
                delay = self._backoff.delay(failures.streak + 1)
                failures.failed(error, delay)
            else:
                # The server ended the stream, as it does after trust_stream_max_seconds.
                delay = self._backoff.initial
                if retry_milliseconds is not None:
                    delay = max(delay, retry_milliseconds / 1000)
                self._log.debug("verdict stream ended by the server; reconnecting in %.1f s", delay)
            self._stop.wait(delay)

    def _follow_once(self, failures: _FailureLog) -> int | None:
        """Connect, reread, and publish events until the stream ends; return the server's retry delay."""
        with self._client.open_stream(self.last_event_id) as stream:
            failures.succeeded()
            self._log.debug("verdict stream connected (Last-Event-ID %s)", self.last_event_id or "none")
            # Changes made while no stream was open are in the current verdict even when the
            # server cannot replay them.
            self.request_reread()
            for event in stream.events():
                if self._stop.is_set():
                    break
                self._handle(event, stream.clock)
            return stream.parser.retry_milliseconds

    def _handle(self, event: SseEvent, clock: ServerClock) -> None:
        if event.last_event_id:
            self.last_event_id = event.last_event_id
        if event.event_type != VERDICT_EVENT:
            self._log.debug("ignoring a stream event of type %r", event.event_type)
            return
        try:
            data = json.loads(event.data)
            if isinstance(data, Mapping) and data.get("device_id") != self._client.device_id:
                return
            verdict = parse_verdict(data, self._client.device_id)
        except (ValueError, VerdictFormatError) as error:
            message = error.message if isinstance(error, VerdictFormatError) else "data is not JSON"
            self._log.warning("verdict stream event %s is invalid (%s); reading the current verdict "
                              "instead", event.last_event_id or "without id", message)
            self.request_reread()
            return
        self._publish(VerdictUpdate(Observation(verdict, clock, "stream")))
