"""Push mode on the device: request a challenge, quote, post the evidence, wait, repeat.

A device behind NAT cannot be polled, so with ``agent_push`` the agent runs :class:`PushLoop`
in place of the agent API. One round (the verifier's side is ``verifier.push_api``):

1. ``POST <verifier>/v1/push/<uuid>/challenge`` returns ``challenge_id``, ``nonce``, ``pcrs``,
   ``ima_ml_entry`` and ``deadline``.
2. ``AgentQuoter`` quotes the PCRs with the nonce as qualifying data, after binding the payload
   key to PCR 16, exactly as for a pull-mode quote.
3. The IMA measurement list is read from entry ``ima_ml_entry`` (the whole list when it has
   fewer entries, which means the device rebooted), and the UEFI event log is added when
   PCR 0 was requested.
4. ``POST <verifier>/v1/push/<uuid>/evidence`` sends them as the fields of a Keylime quote
   response, with ``challenge_id``.
5. The loop waits ``next_challenge_in`` seconds, as the verifier's response sets it.

Failures never end the loop. An unreachable verifier, a 5xx status, a rejection (4xx, such
as a device not yet in push mode) or a failed TPM command is logged. The round is then tried
again after a delay that starts at ``agent_retry_initial`` and doubles up to
``agent_retry_max``, and a round that succeeds resets the delay.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

import requests

from device.attest import PCR_COUNT, AgentQuoter
from device.enroll import Backoff
from device.errors import AgentSettingsError, DeviceError, TpmError
from device.ima_sim import MeasurementListFile
from edgetrust.logs import device_logger

log = logging.getLogger(__name__)

# (connect, read) timeouts in seconds for each verifier request. Verifying a long IMA list
# takes the verifier a while, so the read timeout is generous.
REQUEST_TIMEOUT: Final = (5.0, 60.0)
# Maximum wait between two rounds that a verifier response may set, in seconds.
MAX_WAIT_SECONDS: Final = 86400.0
_NONCE: Final = re.compile(r"[A-Za-z0-9]{1,64}")


class PushError(DeviceError):
    """A push round failed: ``push-rejected`` (a 4xx status, with the verifier's error code),
    ``push-verifier-unavailable`` or ``push-response-invalid``."""

    default_code = "push-failed"

    def __init__(self, message: str, *, code: str | None = None, verifier_code: str | None = None):
        super().__init__(message, code=code)
        self.verifier_code = verifier_code


@dataclass(frozen=True)
class PushChallenge:
    """A challenge from the verifier, checked for form."""

    challenge_id: str
    nonce: bytes
    pcrs: frozenset[int]
    ima_offset: int

    @classmethod
    def from_json(cls, unverified: Mapping[str, Any]) -> PushChallenge:
        """Check a challenge response; raise PushError naming the first field at fault."""
        challenge_id = unverified.get("challenge_id")
        nonce = unverified.get("nonce")
        pcrs = unverified.get("pcrs")
        offset = unverified.get("ima_ml_entry")
        if not isinstance(challenge_id, str) or not challenge_id:
            raise _malformed("challenge_id", challenge_id)
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise _malformed("nonce", nonce)
        if not isinstance(pcrs, list) or not all(_is_pcr(index) for index in pcrs):
            raise _malformed("pcrs", pcrs)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _malformed("ima_ml_entry", offset)
        return cls(challenge_id, nonce.encode("ascii"), frozenset(pcrs), offset)


def _is_pcr(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < PCR_COUNT


def _malformed(field: str, value: object) -> PushError:
    return PushError(f"the verifier's challenge has an invalid {field!r}: {str(value)[:80]!r}",
                     code="push-response-invalid")


@dataclass(frozen=True)
class PushReceipt:
    """The verifier's verdict on one push and the seconds until the next round."""

    status: str
    verdict_id: str | None
    next_challenge_in: float


# --- The verifier client -----------------------------------------------------------------------


class PushClient:
    """HTTP client for the two device routes of push mode, one method per request."""

    def __init__(self, base_url: str, agent_id: str, *,
                 timeout: tuple[float, float] = REQUEST_TIMEOUT,
                 session: requests.Session | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AgentSettingsError(
                f"setting agent_push_url is {base_url!r}; expected an http:// or https:// URL "
                "such as https://verifier.example:8890")
        self.base_url = base_url.rstrip("/")
        self._prefix = f"{self.base_url}/v1/push/{url_quote(agent_id, safe='')}"
        self._timeout = timeout
        self._session = session or requests.Session()

    def close(self) -> None:
        self._session.close()

    def challenge(self) -> PushChallenge:
        return PushChallenge.from_json(self._post("/challenge", {}))

    def send(self, challenge: PushChallenge, evidence: Mapping[str, Any]) -> PushReceipt:
        body = self._post("/evidence", {"challenge_id": challenge.challenge_id, **evidence})
        verdict = body.get("verdict")
        wait = body.get("next_challenge_in")
        if not isinstance(verdict, dict) or not isinstance(wait, int | float) or isinstance(wait, bool):
            raise PushError("the verifier's evidence response has no 'verdict' object or no "
                            "'next_challenge_in' number", code="push-response-invalid")
        return PushReceipt(str(verdict.get("status")), verdict.get("verdict_id"),
                           min(max(float(wait), 0.0), MAX_WAIT_SECONDS))

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        url = self._prefix + path
        try:
            response = self._session.post(url, json=body, timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            raise PushError(f"POST {url} failed: {type(exc).__name__}: {exc}",
                            code="push-verifier-unavailable") from exc
        if response.status_code >= 500:
            raise PushError(f"POST {url} returned HTTP {response.status_code}",
                            code="push-verifier-unavailable")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            raise _rejection(url, response.status_code, answer)
        if not isinstance(answer, dict):
            raise PushError(f"POST {url} returned a body that is not a JSON object",
                            code="push-response-invalid")
        return answer


def _rejection(url: str, status: int, answer: object) -> PushError:
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return PushError(f"the verifier rejected POST {url} with HTTP {status} ({code}): {message}",
                     code="push-rejected", verifier_code=code if isinstance(code, str) else None)


# --- Evidence ----------------------------------------------------------------------------------


def collect_evidence(quoter: AgentQuoter, challenge: PushChallenge, ima_list: MeasurementListFile | None,
                     event_log: bytes | None, boot_time: int | None) -> dict[str, Any]:
    """Quote for ``challenge`` and return the Keylime quote response fields to post.

    Raises TpmError or QuoteError from the quote and DeviceError when the IMA list is unreadable.
    """
    quote = quoter.quote(challenge.nonce, challenge.pcrs)
    evidence: dict[str, Any] = {
        "quote": quote.keylime_quote(),
        "hash_alg": quoter.hash_alg,
        "enc_alg": quoter.enc_alg,
        "sign_alg": quoter.sign_alg,
    }
    if ima_list is not None:
        try:
            ima = ima_list.read_from(challenge.ima_offset)
        except OSError as exc:
            raise DeviceError(f"cannot read the IMA measurement list {ima_list.path}: "
                              f"{exc.strerror or exc}", code="ima-list-unreadable") from exc
        evidence["ima_measurement_list"] = ima.text
        evidence["ima_measurement_list_entry"] = ima.start_index
    if 0 in challenge.pcrs and event_log is not None:
        evidence["mb_measurement_list"] = base64.b64encode(event_log).decode("ascii")
    if boot_time is not None:
        evidence["boottime"] = boot_time
    return evidence


# --- The loop ----------------------------------------------------------------------------------


class PushLoop:
    """Push evidence until stopped (see the module docstring for one round)."""

    def __init__(self, client: PushClient, agent_id: str, quoter: AgentQuoter,
                 ima_list: MeasurementListFile | None, event_log: bytes | None, backoff: Backoff,
                 *, boot_time: int | None = None):
        self._client = client
        self._quoter = quoter
        self._ima_list = ima_list
        self._event_log = event_log
        self._backoff = backoff
        self._boot_time = boot_time
        self._log = device_logger(log, agent_id)
        self.rounds = 0

    def push_once(self) -> PushReceipt:
        """Run one round: challenge, quote, post. Raises PushError or DeviceError."""
        challenge = self._client.challenge()
        evidence = collect_evidence(self._quoter, challenge, self._ima_list, self._event_log,
                                    self._boot_time)
        receipt = self._client.send(challenge, evidence)
        self.rounds += 1
        return receipt

    def run(self, stop: threading.Event) -> None:
        """Push until ``stop`` is set, waiting between rounds as the verifier requests."""
        self._log.info("pushing evidence to %s", self._client.base_url)
        delays = self._delays()
        while not stop.is_set():
            try:
                receipt = self.push_once()
            except DeviceError as exc:
                wait = next(delays)
                self._log_failure(exc, wait)
            else:
                delays = self._delays()
                wait = receipt.next_challenge_in
                self._log.debug("pushed evidence: verdict %s (%s); next round in %.1f s",
                                receipt.status, receipt.verdict_id, wait)
            stop.wait(wait)
        self._log.info("stopped pushing evidence")

    def _delays(self) -> Iterator[float]:
        return self._backoff.delays()

    def _log_failure(self, exc: DeviceError, wait: float) -> None:
        if isinstance(exc, TpmError) or not isinstance(exc, PushError):
            self._log.error("push round failed on the device [%s]: %s; retrying in %.1f s",
                            exc.code, exc.message, wait)
        else:
            self._log.warning("push round failed [%s]: %s; retrying in %.1f s", exc.code, exc.message,
                              wait)
