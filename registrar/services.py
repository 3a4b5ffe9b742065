"""Registration and activation of devices, on the database through SQLAlchemy sessions.

Registration (``RegistrarService.register``) checks, in this order:

1. The AK is a restricted signing key (restricted, sign, fixedTPM, fixedParent,
   sensitiveDataOrigin, not decrypt) with an allowed signing algorithm.
2. The device sent an EK certificate, unless the settings allow registration without one.
3. The EK certificate chains to the EK CA bundle and certifies the EK. When the device sent
   only the certificate, the EK public key is the certificate's key.
4. A device id that is already known comes with the same EK, EK certificate, AK, IAK and
   IDevID. Anything else is an identity takeover attempt: it is rejected, logged as a
   security event and nothing is written. An operator deletes the device to enroll it again.
5. TPM2_MakeCredential wraps a fresh secret for the EK and the AK's name.

Activation compares the device's ``auth_tag`` with HMAC-SHA384(key = base64 of the secret,
message = device id), as Keylime's registrar (``keylime/tpm/tpm_main.py``) and rust-keylime's
agent compute it. On success the device is
active, the secret is erased and the contact details of that registration take effect.

Registering the same identity again issues a new challenge and counts the registration. An
active device stays active meanwhile, as in Keylime: its AK was already proven to live with its
EK, and the request carries only public keys, so anyone could send it. Because anyone could,
the new ip, port and mtls_cert wait until the device completes the new challenge.

A challenge is voided after ``MAX_FAILED_ACTIVATIONS`` wrong auth_tags, and the device must
register again. An agent derives the tag from the secret its TPM released, so it sends a wrong
tag only for a challenge that a newer registration replaced. Three attempts cover that race;
a stranger gets three guesses at a 384-bit HMAC. Keylime deletes the device on the first wrong
tag, which would let anyone who knows a device id delete the device.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import CursorResult, Result, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from edgetrust.db import transaction
from edgetrust.settings import Settings, SettingsError
from evidence.credential import make_credential
from evidence.ekcert import EkCertificate, TrustStore, verify_ek_certificate
from evidence.errors import EvidenceError
from evidence.tpm import (
    ObjectAttributes,
    PublicArea,
    SigningAlgorithm,
    TpmAlg,
    check_ak_attributes,
    parse_tpmt_public,
)
from registrar.errors import (
    ActivationFailed,
    ChallengeNotPending,
    DeviceNotFound,
    EkCertificateMissing,
    IdentityMismatch,
    InvalidDeviceId,
    RegistrarError,
    RegistrationConflict,
)
from registrar.models import DEVICE_ID_MAX_LENGTH, RegisteredDevice

log = logging.getLogger(__name__)

MAX_FAILED_ACTIVATIONS: Final = 3
# Keylime's registrar wraps a 32-character random password (Tpm.encrypt_aik_with_ek).
# edgetrust wraps 32 random letters and digits, so the secret is printable ASCII as well.
SECRET_LENGTH: Final = 32
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits

_DEVICE_ID_PATTERN: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{DEVICE_ID_MAX_LENGTH}}}")


def parse_device_id(unverified_device_id: str) -> str:
    """Return the device id if it has the form of a Keylime agent uuid, else raise."""
    if not _DEVICE_ID_PATTERN.fullmatch(unverified_device_id):
        shown = unverified_device_id[:80] + ("..." if len(unverified_device_id) > 80 else "")
        raise InvalidDeviceId(
            f"invalid device id {shown!r}: an agent uuid is 1 to {DEVICE_ID_MAX_LENGTH} "
            "characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            field="uuid",
        )
    return unverified_device_id


def error_in_field(error: EvidenceError, field: str) -> EvidenceError:
    """Return a copy of ``error`` that names the request ``field`` the input came from.

    Evidence errors name the position inside a structure (``unique.rsa``). API clients need
    the request field, so the copy names that and keeps the position in its message.
    """
    return type(error)(f"{field}: {error.message}", code=error.code, field=field)


# --- Requests and results -------------------------------------------------------------------


@dataclass(frozen=True)
class ContactDetails:
    """Contact details of an agent: address, port and mTLS certificate (PEM or "disabled")."""

    ip: str | None = None
    port: int | None = None
    mtls_cert: str | None = None


@dataclass(frozen=True)
class RegistrationRequest:
    """A registration parsed at the edge; nothing in it is verified yet."""

    device_id: str
    unverified_aik: PublicArea
    unverified_ek: PublicArea | None
    unverified_ekcert: EkCertificate | None
    # Parsed for form only. NOTE: the registrar does not verify the IAK and IDevID.
    unverified_iak_tpm: bytes | None = None
    unverified_iak_cert: bytes | None = None
    unverified_idevid_tpm: bytes | None = None
    unverified_idevid_cert: bytes | None = None
    contact: ContactDetails = ContactDetails()


@dataclass(frozen=True)
class DeviceIdentity:
    """The TPM keys and certificates that identify a device, as stored."""

    ek_tpm: bytes | None
    ekcert: bytes | None
    aik_tpm: bytes
    iak_tpm: bytes | None
    iak_cert: bytes | None
    idevid_tpm: bytes | None
    idevid_cert: bytes | None

    @classmethod
    def of_request(cls, request: RegistrationRequest) -> DeviceIdentity:
        return cls(
            ek_tpm=request.unverified_ek.to_tpm2b() if request.unverified_ek else None,
            ekcert=request.unverified_ekcert.der if request.unverified_ekcert else None,
            aik_tpm=request.unverified_aik.to_tpm2b(),
            iak_tpm=request.unverified_iak_tpm,
            iak_cert=request.unverified_iak_cert,
            idevid_tpm=request.unverified_idevid_tpm,
            idevid_cert=request.unverified_idevid_cert,
        )

    @classmethod
    def of_device(cls, device: RegisteredDevice) -> DeviceIdentity:
        return cls(
            ek_tpm=device.ek_tpm,
            ekcert=device.ekcert,
            aik_tpm=device.aik_tpm,
            iak_tpm=device.iak_tpm,
            iak_cert=device.iak_cert,
            idevid_tpm=device.idevid_tpm,
            idevid_cert=device.idevid_cert,
        )

    def differing_fields(self, other: DeviceIdentity) -> list[str]:
        """Return the request field names whose values differ between the two identities."""
        names = ("ek_tpm", "ekcert", "aik_tpm", "iak_tpm", "iak_cert", "idevid_tpm", "idevid_cert")
        return [name for name in names if getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class DeviceRecord:
    """An active device as the registrar serves it (Keylime's GET /agents/{uuid})."""

    device_id: str
    aik_tpm: bytes
    ek_tpm: bytes | None
    ekcert: bytes | None
    mtls_cert: str | None
    ip: str | None
    port: int | None
    regcount: int


# --- The service ------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RegistrarService:
    """Register, activate, list and delete devices. Safe to share between threads."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        trust_store: TrustStore,
        *,
        require_ek_certificate: bool,
        ak_allowed_algorithms: Iterable[SigningAlgorithm],
        max_failed_activations: int = MAX_FAILED_ACTIVATIONS,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._sessions = sessions
        self._trust_store = trust_store
        self._require_ek_certificate = require_ek_certificate
        self._ak_allowed_algorithms = frozenset(ak_allowed_algorithms)
        self._max_failed_activations = max_failed_activations
        self._clock = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: sessionmaker[Session], trust_store: TrustStore
    ) -> RegistrarService:
        return cls(
            sessions,
            trust_store,
            require_ek_certificate=settings.require_ek_certificate,
            ak_allowed_algorithms=parse_ak_algorithms(settings.ak_allowed_algorithms),
        )

    # --- Registration ---

    def register(self, request: RegistrationRequest) -> bytes:
        """Check a registration, store it and return the tpm2-tools credential file.

        Raises ``RegistrarError`` or ``EvidenceError`` if a check fails; nothing is written then.
        """
        device_id = request.device_id
        try:
            ek_public = self._verify_keys(request)
            secret = new_secret()
            credential = _make_credential(ek_public, request.unverified_aik, secret)
            regcount = self._store_registration(request, secret)
        except IdentityMismatch:
            raise  # logged as a security event where it is detected
        except (EvidenceError, RegistrarError) as error:
            log.warning("registration rejected (%s): %s", error.code, error,
                        extra={"device_id": device_id})
            raise

        log.info("registration %d accepted, credential challenge issued", regcount,
                 extra={"device_id": device_id})
        return credential

    def _verify_keys(self, request: RegistrationRequest) -> PublicArea:
        """Run steps 1-3 of registration and return the EK public area for the credential."""
        # 1. The AK can only sign what the TPM itself produced and never leaves the TPM.
        try:
            check_ak_attributes(request.unverified_aik, self._ak_allowed_algorithms)
        except EvidenceError as error:
            raise error_in_field(error, "aik_tpm") from None

        # 2. Without an EK certificate nothing shows that the EK belongs to a genuine TPM.
        ekcert = request.unverified_ekcert
        if ekcert is None:
            if self._require_ek_certificate:
                raise EkCertificateMissing(
                    "field 'ekcert' is missing, and this registrar requires an EK certificate; "
                    "send the certificate from the TPM's NV index, or set "
                    "require_ek_certificate = false for TPMs without one",
                    field="ekcert",
                )
            assert request.unverified_ek is not None  # parse_registration requires one of both
            return request.unverified_ek

        # 3. The certificate vouches for exactly the EK that the credential is made for.
        ek = request.unverified_ek
        ek_public_key = ek.public_key if ek is not None else ekcert.public_key
        try:
            verify_ek_certificate(ekcert, self._trust_store, ek_public_key)
        except EvidenceError as error:
            raise error_in_field(error, "ekcert") from None
        return ek if ek is not None else ek_public_area_from_certificate(ekcert)

    def _store_registration(self, request: RegistrationRequest, secret: bytes) -> int:
        """Run step 4, store the challenge and return the device's registration count.

        Two registrations of a new device id can both find no row and insert. The unique
        constraint rejects the second, which then retries once and finds the first one's row.
        """
        for attempt in (1, 2):
            try:
                with transaction(self._sessions) as session:
                    return self._upsert_device(session, request, secret)
            except (IntegrityError, StaleDataError) as error:
                if attempt == 2:
                    log.warning("registration conflicted twice with concurrent changes: %s",
                                error.__class__.__name__, extra={"device_id": request.device_id})
                    raise RegistrationConflict(
                        f"device {request.device_id!r} changed concurrently while registering; "
                        "retry the registration",
                    ) from None
                log.info("registration raced with another one for this device; retrying",
                         extra={"device_id": request.device_id})
        raise AssertionError("unreachable")  # the loop returns or raises

    def _upsert_device(self, session: Session, request: RegistrationRequest, secret: bytes) -> int:
        now = self._clock()
        identity = DeviceIdentity.of_request(request)
        contact = request.contact
        device = session.scalars(
            select(RegisteredDevice)
            .where(RegisteredDevice.device_id == request.device_id)
            .with_for_update()
        ).one_or_none()

        if device is None:
            session.add(
                RegisteredDevice(
                    device_id=request.device_id,
                    ek_tpm=identity.ek_tpm,
                    ekcert=identity.ekcert,
                    aik_tpm=identity.aik_tpm,
                    iak_tpm=identity.iak_tpm,
                    iak_cert=identity.iak_cert,
                    idevid_tpm=identity.idevid_tpm,
                    idevid_cert=identity.idevid_cert,
                    pending_ip=contact.ip,
                    pending_port=contact.port,
                    pending_mtls_cert=contact.mtls_cert,
                    regcount=1,
                    active=False,
                    challenge_secret=secret,
                    challenge_issued_at=now,
                    failed_activations=0,
                    created_at=now,
                    registered_at=now,
                )
            )
            session.flush()
            return 1

        # 4. A known device id keeps its identity.
        differing = identity.differing_fields(DeviceIdentity.of_device(device))
        if differing:
            raise _identity_mismatch(request.device_id, differing)

        # A SQL expression, so that concurrent registrations each count.
        device.regcount = RegisteredDevice.regcount + 1
        device.challenge_secret = secret
        device.challenge_issued_at = now
        device.failed_activations = 0
        device.pending_ip = contact.ip
        device.pending_port = contact.port
        device.pending_mtls_cert = contact.mtls_cert
        device.registered_at = now
        session.flush()
        return device.regcount

    # --- Activation ---

    def activate(self, device_id: str, unverified_auth_tag: bytes) -> None:
        """Check the auth_tag against the pending credential challenge and activate the device.

        Raises DeviceNotFound, ChallengeNotPending, or ActivationFailed for a wrong tag.
        A wrong tag is counted and stored before ActivationFailed is raised.
        """
        with transaction(self._sessions) as session:
            device = session.scalars(
                select(RegisteredDevice)
                .where(RegisteredDevice.device_id == device_id)
                .with_for_update()
            ).one_or_none()
            if device is None:
                raise DeviceNotFound(f"device {device_id!r} is not registered; register it first")
            secret = device.challenge_secret
            if secret is None:
                raise ChallengeNotPending(
                    f"device {device_id!r} has no pending credential challenge; register again "
                    "to get one",
                )

            if hmac.compare_digest(expected_auth_tag(secret, device_id), unverified_auth_tag):
                self._mark_active(session, device, secret)
                log.info("activation succeeded; the AK is bound to the EK",
                         extra={"device_id": device_id})
                return

            voided = self._count_failure(session, device, secret)

        log.warning("activation failed: wrong auth_tag%s",
                    "; challenge voided, the device must register again" if voided else "",
                    extra={"device_id": device_id})
        raise ActivationFailed(
            f"auth_tag for device {device_id!r} does not match the credential challenge"
            + ("; the challenge is now void, register again" if voided else ""),
            field="auth_tag",
        )

    def _mark_active(self, session: Session, device: RegisteredDevice, secret: bytes) -> None:
        result = session.execute(
            update(RegisteredDevice)
            .where(RegisteredDevice.id == device.id, RegisteredDevice.challenge_secret == secret)
            .values(
                active=True,
                challenge_secret=None,
                challenge_issued_at=None,
                failed_activations=0,
                ip=RegisteredDevice.pending_ip,
                port=RegisteredDevice.pending_port,
                mtls_cert=RegisteredDevice.pending_mtls_cert,
                pending_ip=None,
                pending_port=None,
                pending_mtls_cert=None,
                activated_at=self._clock(),
            )
            .execution_options(synchronize_session=False)
        )
        if _rows_matched(result) != 1:
            # Only a concurrent registration on SQLite, which has no row locks, gets here.
            raise ChallengeNotPending(
                f"a newer registration of device {device.device_id!r} replaced the challenge "
                "that this auth_tag was computed for; activate with the newer challenge",
            )

    def _count_failure(self, session: Session, device: RegisteredDevice, secret: bytes) -> bool:
        """Count a wrong auth_tag and void the challenge at the limit. Return whether it was voided."""
        this_challenge = (
            RegisteredDevice.id == device.id,
            RegisteredDevice.challenge_secret == secret,
        )
        session.execute(
            update(RegisteredDevice)
            .where(*this_challenge)
            .values(failed_activations=RegisteredDevice.failed_activations + 1)
            .execution_options(synchronize_session=False)
        )
        voided = session.execute(
            update(RegisteredDevice)
            .where(
                *this_challenge,
                RegisteredDevice.failed_activations >= self._max_failed_activations,
            )
            .values(
                challenge_secret=None,
                challenge_issued_at=None,
                pending_ip=None,
                pending_port=None,
                pending_mtls_cert=None,
            )
            .execution_options(synchronize_session=False)
        )
        return _rows_matched(voided) == 1

    # --- Administration ---

    def list_device_ids(self) -> list[str]:
        """Return the ids of all registered devices, active or not, in sorted order."""
        with self._sessions() as session:
            return list(
                session.scalars(select(RegisteredDevice.device_id).order_by(RegisteredDevice.device_id))
            )

    def get_active_device(self, device_id: str) -> DeviceRecord:
        """Return an active device, or raise DeviceNotFound if it is unknown or not yet active."""
        with self._sessions() as session:
            device = session.scalars(
                select(RegisteredDevice).where(RegisteredDevice.device_id == device_id)
            ).one_or_none()
            if device is None:
                raise DeviceNotFound(f"device {device_id!r} is not registered")
            if not device.active:
                raise DeviceNotFound(
                    f"device {device_id!r} is registered but not activated; it becomes visible "
                    "after it completes its credential challenge",
                )
            return DeviceRecord(
                device_id=device.device_id,
                aik_tpm=device.aik_tpm,
                ek_tpm=device.ek_tpm,
                ekcert=device.ekcert,
                mtls_cert=device.mtls_cert,
                ip=device.ip,
                port=device.port,
                regcount=device.regcount,
            )

    def delete_device(self, device_id: str) -> None:
        """Delete a device so that it can enroll again. Raise DeviceNotFound if it is unknown."""
        with transaction(self._sessions) as session:
            result = session.execute(
                delete(RegisteredDevice).where(RegisteredDevice.device_id == device_id)
            )
        if _rows_matched(result) != 1:
            raise DeviceNotFound(f"device {device_id!r} is not registered")
        log.info("device deleted", extra={"device_id": device_id})


def _rows_matched(result: Result[Any]) -> int:
    """Return the number of rows an UPDATE or DELETE matched."""
    return cast(CursorResult[Any], result).rowcount


def _identity_mismatch(device_id: str, differing: list[str]) -> IdentityMismatch:
    """Log a rejected identity change as a security event and return the error to raise.

    Same EK and EK certificate with another AK is what an agent sends after it lost its AK,
    for example on a reinstall. It is rejected all the same, because the AK is what the
    verifier trusts, but the error message states that the device needs re-enrollment.
    """
    fields = ", ".join(differing)
    same_ek = not {"ek_tpm", "ekcert"} & set(differing)
    if same_ek:
        reason = f"re-enrollment needed: same EK, new {fields}"
    else:
        reason = "possible identity takeover: the EK or EK certificate differs"
    log.warning(
        "security event: registration of a known device with a different %s rejected, nothing "
        "changed (%s; delete the device to enroll it again)",
        fields, reason, extra={"device_id": device_id},
    )
    return IdentityMismatch(
        f"device {device_id!r} is registered with a different {fields} ({reason}); an operator "
        "must delete the device before it can enroll with a new identity",
        field=differing[0],
    )


# --- Credential challenge -------------------------------------------------------------------


def new_secret() -> bytes:
    """Return a fresh challenge secret: 32 random ASCII letters and digits."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH)).encode("ascii")


def expected_auth_tag(secret: bytes, device_id: str) -> bytes:
    """Compute the auth_tag an agent sends after ActivateCredential released ``secret``.

    rust-keylime and Keylime's registrar both key the HMAC with the base64 text of the secret,
    not with the secret itself. Returns the lowercase hex digest as ASCII bytes.
    """
    key = base64.b64encode(secret)
    return hmac.new(key, device_id.encode("ascii"), hashlib.sha384).hexdigest().encode("ascii")


def _make_credential(ek_public: PublicArea, aik: PublicArea, secret: bytes) -> bytes:
    try:
        return make_credential(ek_public, aik.name, secret)
    except EvidenceError as error:
        raise error_in_field(error, "ek_tpm") from None


# --- EK public area of a certificate-only registration --------------------------------------

_EK_LOW_ATTRIBUTES: Final = (
    ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN | ObjectAttributes.ADMIN_WITH_POLICY
    | ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT
)
_EK_HIGH_ATTRIBUTES: Final = _EK_LOW_ATTRIBUTES | ObjectAttributes.USER_WITH_AUTH

# authPolicy digests of the TCG EK templates, as tpm2-pytss 3.0.0 lists them
# (tpm2_pytss.internal.templates): PolicyA for the low range, PolicyB for the high range.
_POLICY_A_SHA256: Final = bytes.fromhex(
    "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
)
_POLICY_B_SHA384: Final = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)
_POLICY_B_SHA512: Final = bytes.fromhex(
    "b8221ca69e8550a4914de3faa6a18c072cc01208073a928d5d66d59ef79e49a4"
    "29c41a6b269571d57edb25fbdb1838425608b413cd616a5f6db5b6071af99bea"
)


@dataclass(frozen=True)
class _EkTemplate:
    """The parts of a TCG EK template that MakeCredential and the EK's name depend on."""

    name_alg: TpmAlg
    attributes: ObjectAttributes
    auth_policy: bytes
    aes_bits: int


# Keyed by key type and size (RSA modulus bits or ECC curve name).
_EK_TEMPLATES: Final[dict[tuple[str, int | str], _EkTemplate]] = {
    ("rsa", 2048): _EkTemplate(TpmAlg.SHA256, _EK_LOW_ATTRIBUTES, _POLICY_A_SHA256, 128),  # L-1
    ("ecc", "secp256r1"): _EkTemplate(TpmAlg.SHA256, _EK_LOW_ATTRIBUTES, _POLICY_A_SHA256, 128),
    ("ecc", "secp384r1"): _EkTemplate(TpmAlg.SHA384, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA384, 256),
    ("ecc", "secp521r1"): _EkTemplate(TpmAlg.SHA512, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA512, 256),
    ("rsa", 3072): _EkTemplate(TpmAlg.SHA384, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA384, 256),
    ("rsa", 4096): _EkTemplate(TpmAlg.SHA384, _EK_HIGH_ATTRIBUTES, _POLICY_B_SHA384, 256),
}
_ECC_CURVE_IDS: Final = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}


def ek_public_area_from_certificate(ekcert: EkCertificate) -> PublicArea:
    """Build the EK public area for the certificate's key from the default TCG EK template.

    MakeCredential needs the EK's nameAlg and symmetric key size besides its key. A device
    that sends only its certificate is assumed to use the TCG template for that key type:
    L-1 (RSA-2048), L-2 (P-256), H-3 (P-384), H-4 (P-521), H-6 (RSA-3072) or H-7 (RSA-4096).
    NOTE: a TPM whose EK uses a different nameAlg or AES key size cannot activate the
    credential, so such a device must send ek_tpm.
    """
    key = ekcert.public_key
    if isinstance(key, rsa.RSAPublicKey):
        template_key: tuple[str, int | str] = ("rsa", key.key_size)
    else:
        template_key = ("ecc", key.curve.name)
    template = _EK_TEMPLATES.get(template_key)
    if template is None:
        raise RegistrarError(
            f"field 'ek_tpm' is missing, and the EK certificate's {template_key[0].upper()} "
            f"key ({template_key[1]}) has no default TCG EK template; send ek_tpm as well",
            code="missing-field",
            field="ek_tpm",
        )

    header = (
        (TpmAlg.RSA if template_key[0] == "rsa" else TpmAlg.ECC).to_bytes(2, "big")
        + template.name_alg.to_bytes(2, "big")
        + int(template.attributes).to_bytes(4, "big")
        + _tpm2b(template.auth_policy)
        + TpmAlg.AES.to_bytes(2, "big")
        + template.aes_bits.to_bytes(2, "big")
        + TpmAlg.CFB.to_bytes(2, "big")
        + TpmAlg.NULL.to_bytes(2, "big")  # scheme
    )
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        # An exponent of 0 stands for the default 65537, as the templates have it.
        exponent = 0 if numbers.e == 65537 else numbers.e
        modulus = numbers.n.to_bytes(key.key_size // 8, "big")
        body = key.key_size.to_bytes(2, "big") + exponent.to_bytes(4, "big") + _tpm2b(modulus)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        point = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        body = (
            _ECC_CURVE_IDS[key.curve.name].to_bytes(2, "big")
            + TpmAlg.NULL.to_bytes(2, "big")  # kdf
            + _tpm2b(point.x.to_bytes(size, "big"))
            + _tpm2b(point.y.to_bytes(size, "big"))
        )
    return parse_tpmt_public(header + body)


def _tpm2b(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


# --- Settings ---------------------------------------------------------------------------------

_SCHEME_KEY_TYPES: Final = {"rsassa": TpmAlg.RSA, "rsapss": TpmAlg.RSA, "ecdsa": TpmAlg.ECC}
_HASH_NAMES: Final = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384,
                      "sha512": TpmAlg.SHA512}


def parse_ak_algorithms(names: Sequence[str]) -> frozenset[SigningAlgorithm]:
    """Parse the ``ak_allowed_algorithms`` setting (``rsassa-sha256``, ...)."""
    algorithms = set()
    for name in names:
        scheme, _, hash_name = name.strip().lower().partition("-")
        if scheme not in _SCHEME_KEY_TYPES or hash_name not in _HASH_NAMES:
            raise SettingsError(
                f"setting ak_allowed_algorithms has invalid entry {name!r}; expected "
                "<scheme>-<hash> with scheme rsassa, rsapss or ecdsa and hash sha1, sha256, "
                "sha384 or sha512"
            )
        algorithms.add(
            SigningAlgorithm(_SCHEME_KEY_TYPES[scheme], TpmAlg[scheme.upper()], _HASH_NAMES[hash_name])
        )
    return frozenset(algorithms)

