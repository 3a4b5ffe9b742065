"""Enrollment with the registrar over the Keylime registrar API v2.x.

Steps, in the order rust-keylime's agent performs them
(keylime-agent/src/agent_registration.rs):

1. ``GET /version`` picks the API version: the registrar's ``current_version`` if this agent
   supports it, else the newest version both support. A registrar without ``/version`` (404) gets
   version 2.1.
2. ``POST /v{version}/agents/{uuid}`` sends the AK (``aik_tpm``), the EK (``ek_tpm``), the EK
   certificate (``ekcert``, base64 DER, when the TPM has one) and the contact address. The
   response's ``results.blob`` is a credential in the tpm2-tools file format, made for the EK
   and the AK's name.
3. TPM2_ActivateCredential recovers the secret, which only this TPM can do and only if the AK
   lives in it beside the EK.
4. ``PUT /v{version}/agents/{uuid}`` sends ``auth_tag`` = hex(HMAC-SHA384(key = the base64 text
   of the secret, message = the uuid)). The device is then active.

Failures: a registrar that is unreachable, times out or returns a 5xx status is retried with
exponential backoff and jitter, each retry logged at WARNING. A 4xx status raises
RegistrarRejectedError, which is not retried. A malformed response raises EnrollmentError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import requests

from device.errors import (
    AgentSettingsError,
    DeviceError,
    EnrollmentError,
    RegistrarRejectedError,
    RegistrarUnavailableError,
)
from device.identity import (
    AgentIdentity,
    IdentityStore,
    check_agent_id,
    load_or_create_identity,
)
from device.tpm import DeviceTpm, EndorsementKey, ak_template, ek_profiles
from edgetrust.logs import device_logger
from evidence.credential import CredentialFile, parse_credential_file
from evidence.errors import ParseError

log = logging.getLogger(__name__)

# Registrar API versions whose enrollment requests and responses this module supports. They do
# not differ in the fields used here.
SUPPORTED_API_VERSIONS: Final = ("2.1", "2.2", "2.3", "2.4", "2.5")
FALLBACK_API_VERSION: Final = "2.1"
# (connect, read) timeouts in seconds for each registrar request.
REQUEST_TIMEOUT: Final = (5.0, 30.0)
# Each retry delay is the doubling base delay times a random factor in this range, so that a
# fleet that lost the registrar at the same moment does not come back in lockstep.
JITTER: Final = (0.8, 1.2)

_ERRNO_TEXT: Final = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


@dataclass(frozen=True)
class AgentConfig:
    """The agent settings that enrollment uses; ``edgetrust agent`` builds it from Settings."""

    configured_uuid: str
    state_dir: Path
    registrar_url: str
    ek_type: str
    ak_type: str
    contact_host: str
    contact_port: int
    retry_initial: float
    retry_max: float
    # Returns the PEM of the agent API's TLS certificate for an agent uuid, sent as
    # ``mtls_cert``; None sends "disabled" (the API serves plain HTTP).
    mtls_certificate: Callable[[str], str] | None = None


@dataclass(frozen=True)
class Enrollment:
    """The outcome of a completed enrollment."""

    agent_id: str
    ak_name: bytes
    registrar_url: str
    api_version: str
    ek: EndorsementKey
    identity: AgentIdentity


# --- Backoff ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Retry delays in seconds: ``initial``, doubling up to ``maximum``, each with jitter."""

    initial: float
    maximum: float

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise AgentSettingsError(
                f"setting agent_retry_initial is {self.initial}; expected a number of seconds "
                "greater than 0")
        if not self.maximum >= self.initial:
            raise AgentSettingsError(
                f"setting agent_retry_max is {self.maximum}; expected at least "
                f"agent_retry_initial ({self.initial})")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield delays without end; ``rng`` makes them reproducible in tests."""
        rng = rng or random.SystemRandom()
        base = self.initial
        while True:
            yield min(self.maximum, base * rng.uniform(*JITTER))
            base = min(base * 2, self.maximum)


# --- Registrar client -------------------------------------------------------------------------


def compute_auth_tag(secret: bytes, agent_id: str) -> str:
    """Compute the activation ``auth_tag`` for a secret recovered by TPM2_ActivateCredential.

    The HMAC key is the base64 text of the secret, not the secret itself, as rust-keylime
    (keylime-agent/src/agent_registration.rs) and edgetrust's registrar compute it.
    """
    key = base64.b64encode(secret)
    return hmac.new(key, agent_id.encode("ascii"), hashlib.sha384).hexdigest()


def registration_body(ek: EndorsementKey, identity: AgentIdentity, contact_host: str,
                      contact_port: int, mtls_cert: str | None = None) -> dict[str, Any]:
    """Build the JSON body of ``POST /v{version}/agents/{uuid}``; ``mtls_cert`` is the PEM of
    the agent API's TLS certificate, or None when the API serves plain HTTP."""
    body: dict[str, Any] = {
        "aik_tpm": base64.b64encode(identity.ak.public).decode("ascii"),
        "ek_tpm": base64.b64encode(ek.public).decode("ascii"),
        "mtls_cert": mtls_cert or "disabled",
        "ip": contact_host,
        "port": contact_port,
    }
    if ek.certificate is not None:
        body["ekcert"] = base64.b64encode(ek.certificate).decode("ascii")
    return body


def _connection_reason(error: requests.RequestException) -> str:
    """Return the operating system's reason ("Connection refused") from a requests error."""
    found = _ERRNO_TEXT.search(str(error))
    if found:
        return found.group(1).strip().lower()
    return f"{type(error).__name__}: {error}"


def _registrar_error(response: requests.Response) -> tuple[str | None, str]:
    """Return (error code, message) from an error response in either envelope.

    edgetrust sends ``results.error.{code, message}``, while Keylime sends only ``status``.
    """
    try:
        body = response.json()
    except ValueError:
        return None, response.text.strip()[:300] or response.reason
    if not isinstance(body, dict):
        return None, str(body)[:300]
    results = body.get("results")
    error = results.get("error") if isinstance(results, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message") or body.get("status") or ""
        return (code if isinstance(code, str) else None), str(message)
    return None, str(body.get("status") or response.reason)


class RegistrarClient:
    """HTTP client for the registrar's enrollment routes, one method per request."""

    def __init__(self, base_url: str, *, timeout: tuple[float, float] = REQUEST_TIMEOUT,
                 session: requests.Session | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AgentSettingsError(
                f"setting agent_registrar_url is {base_url!r}; expected an http:// or https:// "
                "URL such as http://registrar.example:8890")
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._session = session or requests.Session()

    def close(self) -> None:
        self._session.close()

    def negotiate_api_version(self) -> str:
        """Pick the API version with ``GET /version``; see step 1 in the module docstring."""
        try:
            results = self._request("GET", "/version")
        except RegistrarRejectedError as exc:
            if exc.status != 404:
                raise
            log.info("registrar at %s has no /version route; using API version %s",
                     self.base_url, FALLBACK_API_VERSION)
            return FALLBACK_API_VERSION
        return self._choose_version(results)

    def _choose_version(self, results: Mapping[str, Any]) -> str:
        current = results.get("current_version")
        if current in SUPPORTED_API_VERSIONS:
            return str(current)
        offered = results.get("supported_versions")
        if not isinstance(offered, list):
            offered = []
        common = [version for version in SUPPORTED_API_VERSIONS if version in offered]
        if common:
            return common[-1]
        raise EnrollmentError(
            f"registrar at {self.base_url} supports API versions {offered or [current]}, and "
            f"this agent supports {', '.join(SUPPORTED_API_VERSIONS)}; upgrade one of them",
            code="registrar-api-incompatible",
        )

    def register(self, api_version: str, agent_id: str, body: Mapping[str, Any]) -> bytes:
        """Send the registration; return the decoded ``blob`` (a tpm2-tools credential file)."""
        path = f"/v{api_version}/agents/{agent_id}"
        results = self._request("POST", path, body)
        blob = results.get("blob")
        if not isinstance(blob, str):
            raise self._invalid(f"POST {path} returned no 'blob' string in 'results'")
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise self._invalid(f"POST {path} returned a 'blob' that is not base64") from None

    def activate(self, api_version: str, agent_id: str, auth_tag: str) -> None:
        """Send the ``auth_tag`` that proves the TPM released the credential's secret."""
        self._request("PUT", f"/v{api_version}/agents/{agent_id}", {"auth_tag": auth_tag})

    def _request(self, method: str, path: str,
                 body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return the envelope's ``results``, or raise by status."""
        url = self.base_url + path
        try:
            response = self._session.request(method, url, json=body, timeout=self._timeout,
                                             allow_redirects=False)
        except requests.Timeout as exc:
            connect_timeout, read_timeout = self._timeout
            if isinstance(exc, requests.ConnectTimeout):
                phase, seconds = "connecting", connect_timeout
            else:
                phase, seconds = "waiting for the response", read_timeout
            raise RegistrarUnavailableError(
                f"{method} {path} timed out after {seconds:g} s {phase}") from exc
        except requests.ConnectionError as exc:
            raise RegistrarUnavailableError(
                f"{method} {path} failed: {_connection_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise EnrollmentError(f"{method} {url} could not be sent: {exc}",
                                  code="registrar-request-failed") from exc

        with response:
            return self._results(method, path, response)

    def _results(self, method: str, path: str, response: requests.Response) -> dict[str, Any]:
        status = response.status_code
        if status >= 500:
            code, message = _registrar_error(response)
            shown = f"{code}: {message}" if code else message
            raise RegistrarUnavailableError(f"{method} {path} returned HTTP {status} ({shown})")
        if status >= 400:
            code, message = _registrar_error(response)
            shown = f"{code}: {message}" if code else message
            raise RegistrarRejectedError(
                f"registrar at {self.base_url} rejected {method} {path} with HTTP {status} "
                f"({shown})",
                status=status, registrar_code=code, registrar_message=message,
            )
        if status != 200:
            raise self._invalid(f"{method} {path} returned HTTP {status}, expected 200")

        try:
            envelope = response.json()
        except ValueError:
            raise self._invalid(f"{method} {path} returned a body that is not JSON") from None
        results = envelope.get("results") if isinstance(envelope, dict) else None
        if not isinstance(results, dict):
            raise self._invalid(f"{method} {path} returned no 'results' object")
        return results

    def _invalid(self, problem: str) -> EnrollmentError:
        return EnrollmentError(f"registrar at {self.base_url}: {problem}",
                               code="registrar-response-invalid")


# --- Enrollment -------------------------------------------------------------------------------


def enroll_once(tpm: DeviceTpm, ek: EndorsementKey, identity: AgentIdentity,
                client: RegistrarClient, config: AgentConfig) -> Enrollment:
    """Run the four steps of the module docstring once; raise on any failure."""
    device_log = device_logger(log, identity.uuid)

    # 1. API version.
    api_version = client.negotiate_api_version()

    # 2. Registration: the registrar returns a credential for the EK and the AK's name.
    mtls_cert = config.mtls_certificate(identity.uuid) if config.mtls_certificate else None
    body = registration_body(ek, identity, config.contact_host, config.contact_port, mtls_cert)
    blob = client.register(api_version, identity.uuid, body)
    device_log.info("registered with the registrar at %s (API %s); activating the credential",
                    client.base_url, api_version)

    # 3. TPM2_ActivateCredential releases the secret only in the TPM that contains EK and AK.
    secret = tpm.activate_credential(ek, identity.ak, _parse_blob(blob, client))

    # 4. Activation.
    client.activate(api_version, identity.uuid, compute_auth_tag(secret, identity.uuid))
    return Enrollment(agent_id=identity.uuid, ak_name=identity.ak.name,
                      registrar_url=client.base_url, api_version=api_version, ek=ek,
                      identity=identity)


def _parse_blob(blob: bytes, client: RegistrarClient) -> CredentialFile:
    try:
        return parse_credential_file(blob)
    except ParseError as exc:
        raise EnrollmentError(
            f"registrar at {client.base_url} sent a credential blob that is not a tpm2-tools "
            f"credential file: {exc.message}",
            code="registrar-response-invalid",
        ) from exc


def enroll_with_retries(tpm: DeviceTpm, ek: EndorsementKey, identity: AgentIdentity,
                        client: RegistrarClient, config: AgentConfig,
                        stop: threading.Event, rng: random.Random | None = None
                        ) -> Enrollment | None:
    """Enroll, retrying while the registrar is unavailable; return None if ``stop`` is set
    while waiting for a retry."""
    device_log = device_logger(log, identity.uuid)
    delays = Backoff(config.retry_initial, config.retry_max).delays(rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return enroll_once(tpm, ek, identity, client, config)
        except RegistrarUnavailableError as exc:
            delay = next(delays)
            device_log.warning("registrar at %s unreachable: %s; retrying in %.1f s "
                               "(attempt %d failed)", client.base_url, exc.reason, delay, attempt)
        if stop.wait(delay):
            device_log.info("stopped while waiting to retry the registrar at %s",
                            client.base_url)
            return None


def check_config(config: AgentConfig) -> None:
    """Raise AgentSettingsError or IdentityError for the first setting the agent cannot use,
    before any TPM or network work starts."""
    ek_profiles(config.ek_type)
    ak_template(config.ak_type)
    Backoff(config.retry_initial, config.retry_max)
    RegistrarClient(config.registrar_url).close()
    if not 1 <= config.contact_port <= 65535:
        raise AgentSettingsError(
            f"setting agent_contact_port is {config.contact_port}; expected 1 to 65535")
    if not config.contact_host:
        raise AgentSettingsError("setting agent_contact_host is empty; set the address the "
                                 "verifier reaches this device at")
    if config.configured_uuid:
        check_agent_id(config.configured_uuid, "setting agent_uuid")


def enroll_device(tpm: DeviceTpm, config: AgentConfig, stop: threading.Event,
                  rng: random.Random | None = None) -> Enrollment | None:
    """Find the EK, load or create the identity, and enroll it with the registrar.

    Returns None if ``stop`` is set before enrollment finishes. A DeviceError raised after the
    identity is known carries its uuid in ``device_id``.
    """
    check_config(config)
    client = RegistrarClient(config.registrar_url)
    ek = tpm.read_endorsement_key(config.ek_type)
    log.info("using the %s", ek.describe())

    identity = load_or_create_identity(
        IdentityStore(config.state_dir), tpm, ek, configured_uuid=config.configured_uuid,
        ek_type=config.ek_type, ak_type=config.ak_type)
    try:
        return enroll_with_retries(tpm, ek, identity, client, config, stop, rng)
    except DeviceError as exc:
        exc.device_id = exc.device_id or identity.uuid
        raise
    finally:
        client.close()
