"""Keylime registrar REST API (v2.1-2.5): enrollment routes and the admin routes.

Every request is parsed here into typed objects before it reaches ``RegistrarService``, and
every malformed field is rejected with a 4xx error naming it. Responses use Keylime's envelope
``{"code", "status", "results"}``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, Flask, Response

from edgetrust.context import AppServices, services
from edgetrust.web import RequestError, json_body, keylime_response, require_int, require_str
from evidence.ekcert import EkCertificate, TrustStore, load_ek_certificate
from evidence.errors import EvidenceError
from evidence.tpm import PublicArea, parse_tpm2b_public
from registrar.errors import RegistrarError
from registrar.services import (
    ContactDetails,
    RegistrarService,
    RegistrationRequest,
    error_in_field,
    parse_device_id,
)

log = logging.getLogger(__name__)

API_VERSIONS: Final = ("2.1", "2.2", "2.3", "2.4", "2.5")
CURRENT_API_VERSION: Final = "2.3"
_PREFIX: Final = "/v<any({}):api_version>".format(", ".join(f'"{v}"' for v in API_VERSIONS))

# An auth_tag is the hex of an HMAC-SHA384: 48 bytes.
_AUTH_TAG_PATTERN: Final = re.compile(r"[0-9a-fA-F]{96}")
_HOST_NAME_PATTERN: Final = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_EXTENSION_KEY: Final = "registrar"

blueprint = Blueprint("registrar", __name__)


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Build the registrar service, add its routes to ``app`` and return its error classes."""
    settings = app_services.settings
    trust_store = load_trust_store(settings.effective_ek_ca_dir)
    app_services.extras[_EXTENSION_KEY] = RegistrarService.from_settings(
        settings, app_services.sessions, trust_store
    )
    app.register_blueprint(blueprint)
    return (RegistrarError,)


def load_trust_store(directory: Path) -> TrustStore:
    """Load the EK CA bundle once at start-up.

    A missing directory gives an empty store, which rejects every EK certificate as untrusted,
    and a warning. A directory that exists but cannot be used raises ``TrustStoreError``.
    TODO: reload the bundle without a restart when its files change.
    """
    if not directory.exists():
        log.warning("EK CA bundle %s does not exist; every EK certificate will be rejected as "
                    "untrusted until PEM files of the TPM vendor CAs are put there and the "
                    "server restarts", directory)
        return TrustStore([])
    store = TrustStore.from_directory(directory)
    log.info("loaded %d CA certificates from the EK CA bundle %s", len(store.certificates),
             directory)
    return store


def _registrar() -> RegistrarService:
    service = services().extras[_EXTENSION_KEY]
    assert isinstance(service, RegistrarService)
    return service


# --- Routes -----------------------------------------------------------------------------------


@blueprint.get("/version")
def get_version() -> Response:
    return keylime_response(
        {"current_version": CURRENT_API_VERSION, "supported_versions": list(API_VERSIONS)}
    )


@blueprint.post(f"{_PREFIX}/agents/<device_id>", strict_slashes=False)
def register_device(api_version: str, device_id: str) -> Response:
    unverified_body = json_body()

    request = parse_registration(parse_device_id(device_id), unverified_body)

    credential = _registrar().register(request)

    return keylime_response({"blob": base64.b64encode(credential).decode("ascii")})


@blueprint.put(f"{_PREFIX}/agents/<device_id>", strict_slashes=False)
@blueprint.post(f"{_PREFIX}/agents/<device_id>/activate", strict_slashes=False)
def activate_device(api_version: str, device_id: str) -> Response:
    unverified_body = json_body()

    valid_device_id = parse_device_id(device_id)
    unverified_auth_tag = parse_auth_tag(unverified_body)

    _registrar().activate(valid_device_id, unverified_auth_tag)

    return keylime_response({})


# The routes below need an API token with the admin scope, which edgetrust.auth checks.


@blueprint.get(f"{_PREFIX}/agents/", strict_slashes=False)
def list_devices(api_version: str) -> Response:
    return keylime_response({"uuids": _registrar().list_device_ids()})


@blueprint.get(f"{_PREFIX}/agents/<device_id>", strict_slashes=False)
def get_device(api_version: str, device_id: str) -> Response:
    device = _registrar().get_active_device(parse_device_id(device_id))

    return keylime_response(
        {
            "aik_tpm": _b64(device.aik_tpm),
            "ek_tpm": _b64(device.ek_tpm),
            "ekcert": _b64(device.ekcert),
            "mtls_cert": device.mtls_cert,
            "ip": device.ip,
            "port": device.port,
            "regcount": device.regcount,
        }
    )


@blueprint.delete(f"{_PREFIX}/agents/<device_id>", strict_slashes=False)
def delete_device(api_version: str, device_id: str) -> Response:
    _registrar().delete_device(parse_device_id(device_id))

    return keylime_response({})


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# --- Request parsing --------------------------------------------------------------------------


def parse_registration(device_id: str, unverified: Mapping[str, Any]) -> RegistrationRequest:
    """Parse the JSON body of ``POST /v2.x/agents/{uuid}``, or raise a 4xx error naming the field.

    Fields other than the ones below are ignored, as Keylime does. ``iak_attest`` and
    ``iak_sign`` are checked for valid base64 only, because the registrar does not verify the
    IAK.
    """
    unverified_aik = _tpm2b_public(unverified, "aik_tpm")
    if unverified_aik is None:
        raise RequestError("missing-field", "field 'aik_tpm' is required", field="aik_tpm")
    unverified_ek = _tpm2b_public(unverified, "ek_tpm")
    unverified_ekcert = _ek_certificate(unverified)
    if unverified_ek is None and unverified_ekcert is None:
        raise RequestError(
            "missing-field",
            "field 'ek_tpm' or 'ekcert' is required; send the EK public area, the EK "
            "certificate or both",
            field="ek_tpm",
        )

    iak_tpm = _tpm2b_public(unverified, "iak_tpm")
    idevid_tpm = _tpm2b_public(unverified, "idevid_tpm")
    for field in ("iak_attest", "iak_sign"):
        _optional_base64(unverified, field)

    return RegistrationRequest(
        device_id=device_id,
        unverified_aik=unverified_aik,
        unverified_ek=unverified_ek,
        unverified_ekcert=unverified_ekcert,
        unverified_iak_tpm=iak_tpm.to_tpm2b() if iak_tpm else None,
        unverified_iak_cert=_certificate_der(unverified, "iak_cert"),
        unverified_idevid_tpm=idevid_tpm.to_tpm2b() if idevid_tpm else None,
        unverified_idevid_cert=_certificate_der(unverified, "idevid_cert"),
        contact=ContactDetails(
            ip=_host(unverified),
            port=require_int(unverified, "port", optional=True, minimum=1, maximum=65535),
            mtls_cert=_mtls_cert(unverified),
        ),
    )


def parse_auth_tag(unverified: Mapping[str, Any]) -> bytes:
    """Return the auth_tag field as lowercase hex ASCII bytes, or raise unless it is 96 hex digits."""
    text = require_str(unverified, "auth_tag")
    assert text is not None
    if not _AUTH_TAG_PATTERN.fullmatch(text):
        raise RequestError(
            "invalid-field",
            f"field 'auth_tag' must be 96 hexadecimal digits (an HMAC-SHA384), got "
            f"{len(text)} characters",
            field="auth_tag",
        )
    return text.lower().encode("ascii")


def _optional_text(unverified: Mapping[str, Any], field: str) -> str | None:
    """Return a string field. JSON null and "" count as absent, because some agents send them."""
    text = require_str(unverified, field, optional=True)
    return text or None


def _optional_base64(unverified: Mapping[str, Any], field: str) -> bytes | None:
    text = _optional_text(unverified, field)
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            "invalid-base64", f"field {field!r} is not valid base64", field=field
        ) from None


def _tpm2b_public(unverified: Mapping[str, Any], field: str) -> PublicArea | None:
    data = _optional_base64(unverified, field)
    if data is None:
        return None
    try:
        return parse_tpm2b_public(data)
    except EvidenceError as error:
        raise error_in_field(error, field) from None


def _ek_certificate(unverified: Mapping[str, Any]) -> EkCertificate | None:
    """Parse ``ekcert``: base64 of the DER (possibly NV-padded), or PEM text."""
    text = _optional_text(unverified, "ekcert")
    if text is None:
        return None
    if text.lstrip().startswith("-----BEGIN"):
        data = text.encode("utf-8")
    else:
        data = _optional_base64(unverified, "ekcert") or b""
    try:
        return load_ek_certificate(data)
    except EvidenceError as error:
        raise error_in_field(error, "ekcert") from None


def _certificate_der(unverified: Mapping[str, Any], field: str) -> bytes | None:
    """Parse an X.509 certificate sent as base64 DER or PEM text and return its DER."""
    text = _optional_text(unverified, field)
    if text is None:
        return None
    try:
        if text.lstrip().startswith("-----BEGIN"):
            certificate = x509.load_pem_x509_certificate(text.encode("utf-8"))
        else:
            certificate = x509.load_der_x509_certificate(_optional_base64(unverified, field) or b"")
    except ValueError:
        raise RequestError(
            "invalid-field",
            f"field {field!r} is not an X.509 certificate in base64 DER or PEM",
            field=field,
        ) from None
    return certificate.public_bytes(Encoding.DER)


def _mtls_cert(unverified: Mapping[str, Any]) -> str | None:
    """Return the PEM of the agent's mTLS certificate, "disabled", or None."""
    text = _optional_text(unverified, "mtls_cert")
    if text is None or text == "disabled":
        return text
    try:
        certificate = x509.load_pem_x509_certificate(text.encode("utf-8"))
    except ValueError:
        raise RequestError(
            "invalid-field",
            "field 'mtls_cert' must be a PEM certificate or the string \"disabled\"",
            field="mtls_cert",
        ) from None
    return certificate.public_bytes(Encoding.PEM).decode("ascii")


def _host(unverified: Mapping[str, Any]) -> str | None:
    text = _optional_text(unverified, "ip")
    if text is None:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOST_NAME_PATTERN.fullmatch(text):
        return text
    raise RequestError(
        "invalid-field",
        f"field 'ip' must be an IPv4 or IPv6 address or a host name, got {text[:80]!r}",
        field="ip",
    )

