"""Errors raised by the registrar.

Each error has a stable kebab-case ``code`` that tests assert and ``edgetrust.web`` maps to an
HTTP status, a ``message`` naming the value seen and the value expected, and, where the error
comes from one request field, that ``field``. Errors from the ``evidence`` checks (AK
attributes, EK certificate) keep their own classes and codes.
"""

from __future__ import annotations


class RegistrarError(Exception):
    """Base of every error raised by ``registrar``."""

    default_code = "registration-invalid"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field


class InvalidDeviceId(RegistrarError):
    """A device id (Keylime agent uuid) that is not 1-255 characters of [A-Za-z0-9._-]."""

    default_code = "invalid-device-id"


class DeviceNotFound(RegistrarError):
    """No device is registered under the id, or it is not active where that is required."""

    default_code = "device-not-found"


class EkCertificateMissing(RegistrarError):
    """A registration without an EK certificate while the settings require one."""

    default_code = "ek-certificate-missing"


class IdentityMismatch(RegistrarError):
    """A registration of a known device id with a different EK, EK certificate or AK."""

    default_code = "identity-mismatch"


class ActivationFailed(RegistrarError):
    """An auth_tag that does not match the pending credential challenge."""

    default_code = "activation-failed"


class ChallengeNotPending(RegistrarError):
    """An activation for a device that has no pending credential challenge."""

    default_code = "challenge-not-pending"


class RegistrationConflict(RegistrarError):
    """Concurrent changes to one device kept a registration from being stored, even on retry."""

    default_code = "registration-in-progress"
