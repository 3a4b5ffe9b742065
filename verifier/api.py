"""Verifier admin API: add devices to the verifier, read their verdicts and attestations.

Routes live under ``/v1`` because Keylime's verifier paths (``/v2.x/agents/{id}``) are the
registrar's in this single server. Field names follow Keylime's tenant where one exists
(``cloudagent_ip``, ``cloudagent_port``); policies are referred to by their names in the
policy store.

    POST   /v1/devices/{id}                    add a device (201)
    GET    /v1/devices/{id}                    the device, its current verdict and state summary
    POST   /v1/devices/{id}/pause              stop attesting it; its verdict then expires
    POST   /v1/devices/{id}/resume             attest it again from now
    DELETE /v1/devices/{id}                    remove it with its attestations (204)
    GET    /v1/devices/{id}/verdict            the verdict as of now
    GET    /v1/devices/{id}/attestations?limit=N   the newest N attestations with findings

``edgetrust.auth`` checks the API token of every request: reading a verdict needs the ``read``
scope, every other route here ``admin``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from flask import Blueprint, Flask, Response, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.context import AppServices, services
from edgetrust.db import transaction
from edgetrust.web import RequestError, json_body, require_int, require_str
from registrar.models import RegisteredDevice
from verifier import policy_store
from verifier.errors import (
    DeviceAlreadyAdded,
    DeviceNotActive,
    PolicyNotFound,
    VerifierDeviceNotFound,
    VerifierError,
)
from verifier.models import Attestation, VerifierDevice
from verifier.poller import as_utc
from verifier.verdicts import (
    NOT_ATTESTED,
    AppliedPolicy,
    Reason,
    Verdict,
    VerdictStatus,
    effective_verdict,
)

log = logging.getLogger(__name__)

_EXTENSION_KEY: Final = "verifier"
_DEVICE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,255}")
_HOST_NAME_PATTERN: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# Shortest and longest poll interval the API accepts, in seconds.
MIN_POLL_INTERVAL: Final = 0.1
MAX_POLL_INTERVAL: Final = 86400.0
DEFAULT_ATTESTATION_LIMIT: Final = 20
MAX_ATTESTATION_LIMIT: Final = 1000
# Request fields naming a policy, and the policy kind each must be.
POLICY_FIELDS: Final = {"runtime_policy": "runtime", "mb_policy": "measured-boot", "pcr_policy": "pcr"}

blueprint = Blueprint("verifier", __name__)


# --- The service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AddDeviceRequest:
    """A request to add a device, checked for form but not against the database."""

    device_id: str
    ip: str | None = None
    port: int | None = None
    poll_interval: float | None = None
    runtime_policy: str | None = None
    mb_policy: str | None = None
    pcr_policy: str | None = None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class VerifierService:
    """Add, read, pause and remove the devices the verifier attests. Safe to share between threads."""

    def __init__(self, sessions: sessionmaker[Session], *, default_poll_interval: float,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        self._sessions = sessions
        self._default_poll_interval = default_poll_interval
        self.clock = clock

    def add_device(self, add: AddDeviceRequest) -> VerifierDevice:
        """Add a device that the registrar has activated; it is due at once.

        Contact details default to the registrar's. Raises VerifierError: device-not-found,
        device-not-active, device-already-added, policy-not-found, or missing-field when
        neither the request nor the registrar gives an address.
        """
        now = self.clock()
        try:
            with transaction(self._sessions) as session:
                registered = _registered(session, add.device_id)
                if session.scalar(select(VerifierDevice.id).where(VerifierDevice.device_id == add.device_id)):
                    raise _already_added(add.device_id)
                for field, kind in POLICY_FIELDS.items():
                    _check_policy(session, getattr(add, field), kind, field)
                device = _new_device(add, registered, now, add.poll_interval or self._default_poll_interval)
                session.add(device)
        except IntegrityError:
            # Another request added the same device between the check and the insert.
            raise _already_added(add.device_id) from None
        log.info("added to the verifier: %s:%d every %.1f s, policies runtime=%s mb=%s pcr=%s",
                 device.ip, device.port, device.poll_interval, device.runtime_policy,
                 device.mb_policy, device.pcr_policy, extra={"device_id": add.device_id})
        return device

    def device(self, device_id: str) -> VerifierDevice:
        with self._sessions() as session:
            return _device(session, device_id)

    def set_paused(self, device_id: str, paused: bool) -> VerifierDevice:
        """Pause or resume a device; a resumed device is due at once."""
        now = self.clock()
        with transaction(self._sessions) as session:
            device = _device(session, device_id, for_update=True)
            device.paused = paused
            device.updated_at = now
            if not paused:
                device.next_poll_at = now
                device.consecutive_failures = 0
        log.info("attestation %s", "paused" if paused else "resumed", extra={"device_id": device_id})
        return device

    def remove_device(self, device_id: str) -> None:
        """Remove a device with its attestations and verdict history."""
        with transaction(self._sessions) as session:
            session.delete(_device(session, device_id, for_update=True))
        log.info("removed from the verifier", extra={"device_id": device_id})

    def attestations(self, device_id: str, limit: int) -> list[Attestation]:
        """Return the newest ``limit`` attestations of a device, newest first."""
        with self._sessions() as session:
            _device(session, device_id)
            query = (select(Attestation).where(Attestation.device_id == device_id)
                     .order_by(Attestation.finished_at.desc(), Attestation.id.desc()).limit(limit))
            return list(session.scalars(query))


def _registered(session: Session, device_id: str) -> RegisteredDevice:
    registered = session.scalars(
        select(RegisteredDevice).where(RegisteredDevice.device_id == device_id)
    ).one_or_none()
    if registered is None:
        raise VerifierError(
            f"device {device_id!r} is not registered; the agent must register with the "
            "registrar before it can be added to the verifier",
            code="device-not-found",
        )
    if not registered.active:
        raise DeviceNotActive(
            f"device {device_id!r} has not completed its credential challenge, so its AK is not "
            "proven yet; add it after the agent activates"
        )
    return registered


def _already_added(device_id: str) -> DeviceAlreadyAdded:
    return DeviceAlreadyAdded(
        f"device {device_id!r} is already in the verifier; remove it first to add it with "
        "other settings"
    )


def _check_policy(session: Session, name: str | None, kind: str, field: str) -> None:
    if name is None:
        return
    try:
        version = policy_store.latest(session, name)
    except policy_store.PolicyStoreError:
        raise PolicyNotFound(f"field {field!r}: no {kind} policy named {name!r} is stored; upload it "
                             "first", field=field) from None
    if version.kind != kind:
        raise RequestError("invalid-field", f"field {field!r}: policy {name!r} is a {version.kind} "
                           f"policy, expected a {kind} policy", field=field)


def _new_device(add: AddDeviceRequest, registered: RegisteredDevice, now: datetime,
                poll_interval: float) -> VerifierDevice:
    ip = add.ip or registered.ip
    port = add.port or registered.port
    if ip is None or port is None:
        field = "cloudagent_ip" if ip is None else "cloudagent_port"
        raise RequestError("missing-field", f"field {field!r} is required: the registrar has no "
                           "contact address for this device", field=field)
    return VerifierDevice(
        device_id=add.device_id,
        ip=ip,
        port=port,
        poll_interval=poll_interval,
        paused=False,
        runtime_policy=add.runtime_policy,
        mb_policy=add.mb_policy,
        pcr_policy=add.pcr_policy,
        next_poll_at=now,
        consecutive_failures=0,
        state=None,
        verdict_id=None,
        verdict_status=VerdictStatus.UNKNOWN.value,
        verdict_reasons=[_not_attested().to_json()],
        verdict_policies=[],
        created_at=now,
        updated_at=now,
    )


def _device(session: Session, device_id: str, *, for_update: bool = False) -> VerifierDevice:
    query = select(VerifierDevice).where(VerifierDevice.device_id == device_id)
    if for_update:
        query = query.with_for_update()
    device = session.scalars(query).one_or_none()
    if device is None:
        raise VerifierDeviceNotFound(f"device {device_id!r} is not in the verifier; add it with "
                                     f"POST /v1/devices/{device_id}")
    return device


def _not_attested() -> Reason:
    return Reason(NOT_ATTESTED, "the verifier has not attested this device yet")


# --- Reading verdicts -----------------------------------------------------------------------


def stored_verdict(device: VerifierDevice) -> Verdict | None:
    """Return the device's current verdict as issued, or None before its first attestation."""
    if device.verdict_id is None or device.verdict_issued_at is None:
        return None
    return Verdict(
        verdict_id=uuid.UUID(device.verdict_id),
        device_id=device.device_id,
        status=VerdictStatus(device.verdict_status),
        reasons=tuple(Reason(item["code"], item["message"]) for item in device.verdict_reasons),
        issued_at=as_utc(device.verdict_issued_at),
        attested_at=_utc_or_none(device.verdict_attested_at),
        expires_at=_utc_or_none(device.verdict_expires_at),
        policies=tuple(AppliedPolicy.from_json(item) for item in device.verdict_policies),
    )


def verdict_json(device: VerifierDevice, at: datetime) -> dict[str, Any]:
    """Return the device's verdict as of ``at``: a trusted verdict past its expiry reads unknown."""
    verdict = stored_verdict(device)
    if verdict is None:
        return {"verdict_id": None, "device_id": device.device_id, "status": VerdictStatus.UNKNOWN.value,
                "reasons": [_not_attested().to_json()], "issued_at": None, "attested_at": None,
                "expires_at": None, "policies": []}
    return effective_verdict(verdict, at).to_json()


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


def device_json(device: VerifierDevice, at: datetime) -> dict[str, Any]:
    state = device.state or {}
    counters = state.get("counters") or {}
    boot = state.get("boot") or {}
    ima = state.get("ima") or {}
    return {
        "device_id": device.device_id,
        "cloudagent_ip": device.ip,
        "cloudagent_port": device.port,
        "poll_interval": device.poll_interval,
        "paused": device.paused,
        "runtime_policy": device.runtime_policy,
        "mb_policy": device.mb_policy,
        "pcr_policy": device.pcr_policy,
        "verdict": verdict_json(device, at),
        "state": {
            "boot_session": boot.get("reset_count"),
            "boot_started_at": boot.get("started_at"),
            "boot_aggregate": boot.get("boot_aggregate"),
            "pcr_bank": state.get("bank"),
            "ima_next_entry": ima.get("next_index"),
            "clock": counters.get("clock"),
            "restart_count": counters.get("restart_count"),
        },
        "next_attestation_at": None if device.paused else _iso(device.next_poll_at),
        "consecutive_failures": device.consecutive_failures,
        "poller": device.lease_owner,
        "added_at": _iso(device.created_at),
    }


def attestation_json(attestation: Attestation) -> dict[str, Any]:
    return {
        "id": attestation.id,
        "verdict_id": attestation.verdict_id,
        "status": attestation.status,
        "poller": attestation.poller,
        "nonce": attestation.nonce,
        "scheduled_at": _iso(attestation.scheduled_at),
        "started_at": _iso(attestation.started_at),
        "finished_at": _iso(attestation.finished_at),
        "boot_session": attestation.boot_session,
        "ima_start_entry": attestation.ima_start_index,
        "ima_next_entry": attestation.ima_next_index,
        "evidence": attestation.evidence,
        "findings": attestation.findings,
    }


# --- Request parsing ------------------------------------------------------------------------


def parse_device_id(unverified_device_id: str) -> str:
    if not _DEVICE_ID_PATTERN.fullmatch(unverified_device_id):
        raise RequestError("invalid-device-id", f"device id {unverified_device_id[:80]!r} is invalid: "
                           "use 1 to 255 characters of A-Z, a-z, 0-9, '.', '_' and '-'", field="device_id")
    return unverified_device_id


def parse_add_request(device_id: str, unverified: Mapping[str, Any]) -> AddDeviceRequest:
    """Check the form of each field of an add request; raise RequestError naming the field."""
    ip = require_str(unverified, "cloudagent_ip", optional=True)
    if ip is not None:
        ip = _check_host(ip, "cloudagent_ip")
    port = require_int(unverified, "cloudagent_port", optional=True, minimum=1, maximum=65535)
    policies = {}
    for field in POLICY_FIELDS:
        name = require_str(unverified, field, optional=True)
        if name is not None:
            try:
                name = policy_store.check_name(name)
            except policy_store.PolicyStoreError as error:
                message = f"field {field!r}: {error.message}"
                raise RequestError("invalid-field", message, field=field) from None
        policies[field] = name
    return AddDeviceRequest(
        device_id=device_id,
        ip=ip,
        port=port,
        poll_interval=_poll_interval(unverified),
        **policies,
    )


def _check_host(text: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOST_NAME_PATTERN.fullmatch(text):
        return text
    raise RequestError("invalid-field", f"field {field!r} is {text[:80]!r}, which is neither an IP "
                       "address nor a host name", field=field)


def _poll_interval(unverified: Mapping[str, Any]) -> float | None:
    value = unverified.get("poll_interval")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError("invalid-field", "field 'poll_interval' must be a number of seconds",
                           field="poll_interval")
    if not MIN_POLL_INTERVAL <= value <= MAX_POLL_INTERVAL:
        raise RequestError("invalid-field", f"field 'poll_interval' is {value}, outside "
                           f"{MIN_POLL_INTERVAL}..{MAX_POLL_INTERVAL} seconds", field="poll_interval")
    return float(value)


def _limit() -> int:
    text = request.args.get("limit")
    if text is None:
        return DEFAULT_ATTESTATION_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_ATTESTATION_LIMIT:
        raise RequestError("invalid-field", f"query parameter 'limit' is {text[:20]!r}, expected an "
                           f"integer from 1 to {MAX_ATTESTATION_LIMIT}", field="limit")
    return int(text)


# --- Routes ---------------------------------------------------------------------------------


def install(app: Flask, app_services: AppServices) -> tuple[type[Exception], ...]:
    """Build the verifier service, add its routes to ``app`` and return its error classes."""
    app_services.extras[_EXTENSION_KEY] = VerifierService(
        app_services.sessions, default_poll_interval=app_services.settings.verifier_poll_interval
    )
    app.register_blueprint(blueprint)
    return (VerifierError,)


def _service() -> VerifierService:
    service = services().extras[_EXTENSION_KEY]
    assert isinstance(service, VerifierService)
    return service


@blueprint.post("/v1/devices/<device_id>")
def add_device(device_id: str) -> tuple[Response, int]:
    add = parse_add_request(parse_device_id(device_id), json_body())

    service = _service()
    device = service.add_device(add)

    return jsonify(device_json(device, service.clock())), 201


@blueprint.get("/v1/devices/<device_id>")
def get_device(device_id: str) -> Response:
    service = _service()
    device = service.device(parse_device_id(device_id))
    return jsonify(device_json(device, service.clock()))


@blueprint.post("/v1/devices/<device_id>/pause")
def pause_device(device_id: str) -> Response:
    service = _service()
    device = service.set_paused(parse_device_id(device_id), True)
    return jsonify(device_json(device, service.clock()))


@blueprint.post("/v1/devices/<device_id>/resume")
def resume_device(device_id: str) -> Response:
    service = _service()
    device = service.set_paused(parse_device_id(device_id), False)
    return jsonify(device_json(device, service.clock()))


@blueprint.delete("/v1/devices/<device_id>")
def remove_device(device_id: str) -> tuple[str, int]:
    _service().remove_device(parse_device_id(device_id))
    return "", 204


@blueprint.get("/v1/devices/<device_id>/verdict")
def get_verdict(device_id: str) -> Response:
    service = _service()
    device = service.device(parse_device_id(device_id))
    return jsonify(verdict_json(device, service.clock()))


@blueprint.get("/v1/devices/<device_id>/attestations")
def list_attestations(device_id: str) -> Response:
    limit = _limit()

    attestations = _service().attestations(parse_device_id(device_id), limit)

    return jsonify({"device_id": device_id, "attestations": [attestation_json(a) for a in attestations]})
