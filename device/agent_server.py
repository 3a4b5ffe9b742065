"""The Keylime agent API (v2.x, pull mode) that verifiers ask for evidence.

Routes, with ``<v>`` one of ``SUPPORTED_API_VERSIONS``:

- ``GET /version``: ``{"supported_version": "2.5", "supported_versions": [...]}``.
- ``GET /v<v>/quotes/integrity?nonce=N&mask=M&partial=P&ima_ml_entry=E``: a quote over the
  PCRs of mask M and PCR 16, with the IMA measurement list from entry E and, when M selects
  PCR 0, the UEFI event log.
- ``GET /v<v>/quotes/identity?nonce=N``: a quote over PCR 16 only, with the payload key.
- ``GET /v<v>/keys/pubkey``: the payload public key.

Every response is Keylime's envelope ``{"code", "status", "results"}``. A query value that is
missing or invalid gets 400 naming the parameter in ``status`` and in ``results.error.field``.
A failed TPM command gets 500; the log has its decoded response code, the client only the
command name, and no response carries a traceback.

Query rules, as rust-keylime 0.2.9 applies them (stricter where it is lenient):

- ``nonce``: 1 to 64 ASCII letters and digits; its bytes are the quote's qualifying data.
- ``mask``: hexadecimal with or without ``0x``, naming PCRs 0-23 only.
- ``partial``: ``0`` (send ``pubkey``) or ``1``.
- ``ima_ml_entry``: a decimal entry index, 0 when absent. rust-keylime reads an invalid value
  as 0, and this agent rejects it with 400.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from device.attest import PCR_COUNT, AgentQuoter, QuoteEvidence
from device.errors import DeviceError, TpmError
from device.ima_sim import ListSlice, MeasurementListFile
from edgetrust.web import keylime_response

log = logging.getLogger(__name__)

SUPPORTED_API_VERSIONS: Final = ("2.1", "2.2", "2.3", "2.4", "2.5")
CURRENT_API_VERSION: Final = SUPPORTED_API_VERSIONS[-1]
# Seconds a connection may stay idle (TLS handshake included) before its thread gives up.
CONNECTION_TIMEOUT: Final = 30.0

_NONCE: Final = re.compile(r"[A-Za-z0-9]{1,64}")
_MASK: Final = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,8})")
_ENTRY: Final = re.compile(r"[0-9]{1,19}")
_PROC_STAT: Final = Path("/proc/stat")
_CONTEXT_KEY: Final = "edgetrust.agent"


class QueryError(Exception):
    """A query parameter is missing or invalid; the response is 400."""

    def __init__(self, parameter: str, message: str, *, code: str = "query-parameter-invalid"):
        super().__init__(message)
        self.parameter = parameter
        self.message = message
        self.code = code


@dataclass(frozen=True)
class AgentEvidence:
    """Evidence sources of the agent API: the quoter, the IMA list (None without one), the
    UEFI event log (None without one) and the boot time in seconds since the epoch (None when
    unknown)."""

    agent_id: str
    quoter: AgentQuoter
    ima_list: MeasurementListFile | None
    event_log: bytes | None
    boot_time: int | None


# --- Query parsing ---------------------------------------------------------------------------


def parse_nonce(args: Mapping[str, str]) -> bytes:
    value = _required(args, "nonce")
    if not _NONCE.fullmatch(value):
        raise QueryError("nonce", f"nonce must be 1 to 64 ASCII letters and digits, got "
                                  f"{_clip(value)} ({len(value)} characters)")
    return value.encode("ascii")


def parse_mask(args: Mapping[str, str]) -> frozenset[int]:
    """Return the PCR indexes that a Keylime mask selects (bit n is PCR n)."""
    value = _required(args, "mask")
    match = _MASK.fullmatch(value)
    if not match:
        raise QueryError("mask", f"mask must be a hexadecimal PCR bitmask such as 0x400, got "
                                 f"{_clip(value)}")
    bits = int(match.group(1), 16)
    if bits >> PCR_COUNT:
        raise QueryError("mask", f"mask {_clip(value)} selects PCRs above {PCR_COUNT - 1}; a "
                                 f"TPM has PCRs 0-{PCR_COUNT - 1}")
    return frozenset(index for index in range(PCR_COUNT) if bits >> index & 1)


def parse_partial(args: Mapping[str, str]) -> bool:
    """Return True when the client wants the payload public key (``partial=0``)."""
    value = _required(args, "partial")
    if value not in ("0", "1"):
        raise QueryError("partial", f"partial must be 0 or 1, got {_clip(value)}")
    return value == "0"


def parse_ima_entry(args: Mapping[str, str]) -> int:
    value = args.get("ima_ml_entry")
    if value is None:
        return 0
    if not _ENTRY.fullmatch(value):
        raise QueryError("ima_ml_entry", f"ima_ml_entry must be a decimal entry index, got "
                                         f"{_clip(value)}")
    return int(value)


def _required(args: Mapping[str, str], name: str) -> str:
    value = args.get(name)
    if value is None:
        raise QueryError(name, f"query parameter {name} is missing",
                         code="query-parameter-missing")
    return value


def _clip(value: str, limit: int = 70) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def check_api_version(api_version: str) -> None:
    if api_version not in SUPPORTED_API_VERSIONS:
        raise QueryError("api_version",
                         f"API version {_clip(api_version)} is not supported; use one of "
                         f"{', '.join(SUPPORTED_API_VERSIONS)} (GET /version)",
                         code="api-version-unsupported")


# --- Routes ----------------------------------------------------------------------------------

agent_api = Blueprint("agent_api", __name__)


def _evidence() -> AgentEvidence:
    evidence: AgentEvidence = current_app.extensions[_CONTEXT_KEY]
    return evidence


@agent_api.get("/version")
def version() -> Response:
    return keylime_response({"supported_version": CURRENT_API_VERSION,
                             "supported_versions": list(SUPPORTED_API_VERSIONS)})


@agent_api.get("/v<api_version>/quotes/integrity")
def integrity_quote(api_version: str) -> Response:
    check_api_version(api_version)
    nonce = parse_nonce(request.args)
    pcrs = parse_mask(request.args)
    with_pubkey = parse_partial(request.args)
    ima_entry = parse_ima_entry(request.args)
    evidence = _evidence()

    quote = evidence.quoter.quote(nonce, pcrs)
    results = _quote_results(evidence, quote, with_pubkey=with_pubkey)
    if evidence.ima_list is not None:
        ima = _read_ima_list(evidence.ima_list, ima_entry)
        results["ima_measurement_list"] = ima.text
        results["ima_measurement_list_entry"] = ima.start_index
    if 0 in pcrs and evidence.event_log is not None:
        results["mb_measurement_list"] = base64.b64encode(evidence.event_log).decode("ascii")

    log.debug("integrity quote over PCRs %s sent", quote.selection,
              extra={"device_id": evidence.agent_id})
    return keylime_response(results)


@agent_api.get("/v<api_version>/quotes/identity")
def identity_quote(api_version: str) -> Response:
    check_api_version(api_version)
    nonce = parse_nonce(request.args)
    evidence = _evidence()

    quote = evidence.quoter.quote(nonce, ())
    results = _quote_results(evidence, quote, with_pubkey=True)

    log.debug("identity quote sent", extra={"device_id": evidence.agent_id})
    return keylime_response(results)


@agent_api.get("/v<api_version>/keys/pubkey")
def payload_public_key(api_version: str) -> Response:
    check_api_version(api_version)
    evidence = _evidence()
    return keylime_response({"pubkey": evidence.quoter.payload_key.public_pem.decode("ascii")})


def _quote_results(evidence: AgentEvidence, quote: QuoteEvidence, *,
                   with_pubkey: bool) -> dict[str, Any]:
    quoter = evidence.quoter
    results: dict[str, Any] = {
        "quote": quote.keylime_quote(),
        "hash_alg": quoter.hash_alg,
        "enc_alg": quoter.enc_alg,
        "sign_alg": quoter.sign_alg,
    }
    if with_pubkey:
        results["pubkey"] = quoter.payload_key.public_pem.decode("ascii")
    if evidence.boot_time is not None:
        results["boottime"] = evidence.boot_time
    return results


def _read_ima_list(ima_list: MeasurementListFile, entry: int) -> ListSlice:
    try:
        return ima_list.read_from(entry)
    except OSError as exc:
        raise DeviceError(f"cannot read the IMA measurement list {ima_list.path}: "
                          f"{exc.strerror or exc}", code="ima-list-unreadable") from exc


# --- Errors ----------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, field: str | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return keylime_response({"error": error}, status, message)


def _query_error(error: QueryError) -> Response:
    log.warning("%s %s rejected with 400: %s", request.method, request.path, error.message)
    return _error(400, error.code, error.message, error.parameter)


def _tpm_error(error: TpmError) -> Response:
    log.error("%s %s failed: %s", request.method, request.path, error.message)
    return _error(500, error.code, f"{error.command} failed; the agent log has the response code")


def _device_error(error: DeviceError) -> Response:
    log.error("%s %s failed [%s]: %s", request.method, request.path, error.code, error.message)
    return _error(500, error.code, "the agent could not collect the evidence; the agent log has "
                                   "the details")


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    if status == 404:
        return _error(404, "not-found", f"no route for {request.method} {request.path}")
    return _error(status, "http-error", error.description or error.name)


def _unexpected_error(error: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return _error(500, "internal-error", "internal error; the agent log has the details")


def create_agent_app(evidence: AgentEvidence) -> Flask:
    """Build the agent API app serving ``evidence``."""
    app = Flask(__name__)
    app.extensions[_CONTEXT_KEY] = evidence
    app.register_blueprint(agent_api)
    app.register_error_handler(QueryError, _query_error)
    app.register_error_handler(TpmError, _tpm_error)
    app.register_error_handler(DeviceError, _device_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def read_boot_time(proc_stat: Path = _PROC_STAT) -> int | None:
    """Return the boot time in seconds since the epoch (``btime`` of /proc/stat), or None."""
    try:
        text = proc_stat.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "btime" and value.strip().isdigit():
            return int(value)
    return None


# --- Serving ---------------------------------------------------------------------------------


class _RequestHandler(WSGIRequestHandler):
    # socketserver applies this to each connection, so an idle client frees its thread.
    timeout = CONNECTION_TIMEOUT


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host``:``port``; raise DeviceError when that fails."""
    try:
        return socket.create_server((host, port), backlog=128)
    except OSError as exc:
        raise DeviceError(
            f"the agent API cannot listen on {host}:{port}: {exc.strerror or exc}; check "
            "agent_contact_host and agent_contact_port", code="agent-api-listen-failed",
        ) from exc


class AgentApiServer:
    """The agent API on a threaded werkzeug server, started in a background thread.

    With an ``ssl_context`` the TLS handshake runs in each connection's own thread, not in
    the thread that accepts connections, so a client that never finishes it blocks no one.
    """

    def __init__(self, app: Flask, host: str, port: int, ssl_context: ssl.SSLContext | None):
        # werkzeug exits the process when it cannot bind, so the socket is bound here first.
        listener = _listen(host, port)
        try:
            self._server = ThreadedWSGIServer(host, port, app, handler=_RequestHandler,
                                              fd=listener.fileno())
        finally:
            listener.close()
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
            self._server.ssl_context = ssl_context
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="agent-api", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        return "http" if self._server.ssl_context is None else "https"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting requests, close the socket and wait for the serving thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
