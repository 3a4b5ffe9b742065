"""Client of the Keylime agent API: ask a device for a quote and its logs.

``AgentClient.request_quote`` sends ``GET /v<api>/quotes/integrity?nonce&mask&partial&
ima_ml_entry`` and returns the response as ``engine.Evidence``, unverified. Anything that
keeps it from returning evidence raises an ``AgentError`` (``agent-unreachable`` or
``agent-response-invalid``), which the poller turns into an unknown verdict.

Mutual TLS follows Keylime's scheme. The agent's server certificate must be the one it
registered (``mtls_cert``): the client trusts that certificate alone, as its only trust
anchor, and does not match host names, because an agent's certificate names its uuid rather
than its address. The client presents the verifier's own certificate, which the agent checks
against the CA it trusts. Plain HTTP is used only when mTLS is switched off in the settings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import requests
from requests.adapters import HTTPAdapter
from urllib3.poolmanager import PoolManager

from verifier.engine import Evidence
from verifier.errors import AgentError, AgentResponseInvalid, AgentUnreachable

log = logging.getLogger(__name__)

# Keylime's registrar stores this instead of a certificate for an agent without mTLS.
MTLS_DISABLED: Final = "disabled"
DEFAULT_MAX_SESSIONS: Final = 4096
# Largest quote response read. An IMA list read from entry 0 after a long uptime can reach tens
# of megabytes; anything bigger is refused rather than buffered.
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AgentContact:
    """The address and mTLS certificate of one agent."""

    device_id: str
    ip: str
    port: int
    mtls_cert: str | None
    """PEM of the agent's server certificate as registered, ``"disabled"`` or None."""


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The certificate and private key (PEM files) the verifier presents to agents."""

    cert_file: Path
    key_file: Path


class _PinnedCertificateAdapter(HTTPAdapter):
    """An adapter whose TLS context trusts one agent certificate and nothing else.

    requests would otherwise load its default CA bundle into the context for every request
    with ``verify=True``, and any certificate from a public CA would then pass.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kwargs: Any) -> None:
        self.poolmanager = PoolManager(num_pools=connections, maxsize=maxsize, block=block,
                                       ssl_context=self._context, assert_hostname=False, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


def pinned_context(agent_cert_pem: str, identity: ClientIdentity) -> ssl.SSLContext:
    """Build a TLS client context that accepts only ``agent_cert_pem`` and presents ``identity``.

    Raises ssl.SSLError or ValueError if the certificate or the identity cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # The registered certificate is the trust anchor even when it is not self-signed.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=agent_cert_pem)
    context.load_cert_chain(identity.cert_file, identity.key_file)
    return context


class AgentClient:
    """Ask agents for quotes, over mutual TLS unless ``mtls`` is False.

    Keeps one ``requests.Session`` per agent, so that connections are reused, up to
    ``max_sessions`` (least recently used closed first). A session is used by one thread at
    a time because a device is attested by one thread at a time.
    """

    def __init__(
        self,
        *,
        mtls: bool,
        identity: ClientIdentity | None,
        timeout: float,
        api_version: str = "2.1",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        if mtls and identity is None:
            raise ValueError("mutual TLS needs the verifier's client certificate and key")
        self.mtls = mtls
        self._identity = identity
        self._timeout = timeout
        self._api_version = api_version
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[str, str], requests.Session] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()

    def request_quote(self, contact: AgentContact, *, nonce: str, mask: str, ima_ml_entry: int,
                      partial: bool = True) -> Evidence:
        """Request a quote over ``nonce`` of the PCRs in ``mask`` and the IMA list from entry
        ``ima_ml_entry``. Raises AgentUnreachable or AgentResponseInvalid."""
        scheme = "https" if self.mtls else "http"
        host = f"[{contact.ip}]" if ":" in contact.ip else contact.ip
        url = f"{scheme}://{host}:{contact.port}/v{self._api_version}/quotes/integrity"
        params = {"nonce": nonce, "mask": mask, "partial": "1" if partial else "0",
                  "ima_ml_entry": str(ima_ml_entry)}

        session = self._session(contact)
        try:
            response = session.get(url, params=params, timeout=self._timeout, stream=True)
            body = _read_limited(response, contact)
        except requests.exceptions.SSLError as error:
            raise AgentUnreachable(
                f"TLS handshake with the agent at {contact.ip}:{contact.port} failed: {error}; "
                "is its server certificate the one it registered?"
            ) from None
        except requests.exceptions.Timeout:
            raise AgentUnreachable(
                f"the agent at {contact.ip}:{contact.port} did not respond within {self._timeout} s"
            ) from None
        except requests.exceptions.RequestException as error:
            self._drop_session(contact)
            raise AgentUnreachable(
                f"cannot reach the agent at {contact.ip}:{contact.port}: {type(error).__name__}"
            ) from None
        return parse_quote_response(response.status_code, body)

    def _session(self, contact: AgentContact) -> requests.Session:
        key = (contact.device_id, _session_key(contact))
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
                return session
        session = self._new_session(contact)
        with self._lock:
            self._sessions[key] = session
            evicted = []
            while len(self._sessions) > self._max_sessions:
                evicted.append(self._sessions.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return session

    def _drop_session(self, contact: AgentContact) -> None:
        with self._lock:
            session = self._sessions.pop((contact.device_id, _session_key(contact)), None)
        if session is not None:
            session.close()

    def _new_session(self, contact: AgentContact) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxies from the environment between verifier and agent
        if not self.mtls:
            return session
        if contact.mtls_cert is None or contact.mtls_cert == MTLS_DISABLED:
            raise AgentError(
                "the agent registered without an mTLS certificate, so it cannot be reached over "
                "mutual TLS; register it with one, or set verifier_agent_mtls = false",
                code="agent-mtls-certificate-missing",
            )
        assert self._identity is not None
        try:
            context = pinned_context(contact.mtls_cert, self._identity)
        except (ssl.SSLError, ValueError) as error:
            raise AgentError(
                f"the agent's registered mTLS certificate cannot be used: {error}",
                code="agent-mtls-certificate-invalid",
            ) from None
        session.mount("https://", _PinnedCertificateAdapter(context))
        return session


def _read_limited(response: requests.Response, contact: AgentContact) -> bytes:
    """Read the body of ``response`` up to MAX_RESPONSE_BYTES; raise AgentResponseInvalid beyond."""
    chunks = []
    size = 0
    with response:
        for chunk in response.iter_content(chunk_size=256 * 1024):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise AgentResponseInvalid(
                    f"the agent at {contact.ip}:{contact.port} sent more than {MAX_RESPONSE_BYTES} "
                    "bytes; response rejected"
                )
            chunks.append(chunk)
    return b"".join(chunks)


def _session_key(contact: AgentContact) -> str:
    # A changed address or certificate gets a new session, so no connection outlives them.
    text = f"{contact.ip}|{contact.port}|{contact.mtls_cert or ''}"
    return hashlib.sha256(text.encode()).hexdigest()


def parse_quote_response(status: int, unverified_body: bytes) -> Evidence:
    """Split a Keylime quote response into ``Evidence``; raise AgentResponseInvalid if it is
    not one. The evidence itself stays unverified."""
    try:
        unverified_document = _json_object(unverified_body)
    except ValueError as error:
        raise AgentResponseInvalid(f"agent responded with HTTP {status} and {error}") from None
    if status != 200:
        text = unverified_document.get("status")
        raise AgentResponseInvalid(f"agent responded with HTTP {status}: {str(text)[:200]}")

    results = unverified_document.get("results")
    if not isinstance(results, dict):
        raise AgentResponseInvalid("agent response has no 'results' object")
    return Evidence(
        quote=_required_str(results, "quote"),
        hash_alg=_required_str(results, "hash_alg"),
        ima_measurement_list=_optional_str(results, "ima_measurement_list"),
        ima_start_index=_optional_count(results, "ima_measurement_list_entry") or 0,
        mb_measurement_list=_optional_base64(results, "mb_measurement_list"),
        boottime=_optional_count(results, "boottime"),
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("a body that is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__} instead of an object")
    return value


def _required_str(results: dict[str, Any], name: str) -> str:
    value = results.get(name)
    if not isinstance(value, str):
        raise AgentResponseInvalid(f"agent response field {name!r} is missing or not a string")
    return value


def _optional_str(results: dict[str, Any], name: str) -> str | None:
    value = results.get(name)
    if value is not None and not isinstance(value, str):
        raise AgentResponseInvalid(f"agent response field {name!r} is not a string")
    return value


def _optional_count(results: dict[str, Any], name: str) -> int | None:
    value = results.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise AgentResponseInvalid(f"agent response field {name!r} is not a non-negative integer")
    return value


def _optional_base64(results: dict[str, Any], name: str) -> bytes | None:
    text = _optional_str(results, name)
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AgentResponseInvalid(f"agent response field {name!r} is not base64") from None
