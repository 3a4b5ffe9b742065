"""Errors raised by the device package.

Every error carries a stable kebab-case ``code`` and a message that names the value seen, the
value expected and what the operator can do. This module imports nothing from tpm2-pytss, so
the CLI can load it on machines without the TPM libraries.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base of every error raised by ``device``.

    ``device_id`` is the agent uuid the error concerns, once the agent knows it, for logs.
    """

    default_code = "device-error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.device_id: str | None = None


class TpmError(DeviceError):
    """A TPM command failed.

    ``response_code`` is the raw TSS2 response code (TPM_RC with the TSS layer in its top
    byte) and ``decoded`` is its text from ``Tss2_RC_Decode``. The original
    ``TSS2_Exception`` is the ``__cause__``.
    """

    default_code = "tpm-command-failed"

    def __init__(self, command: str, response_code: int, decoded: str, *, doing: str | None = None):
        action = f" while {doing}" if doing else ""
        super().__init__(
            f"{command} failed{action}: response code {response_code:#x} ({decoded})"
        )
        self.command = command
        self.response_code = response_code
        self.decoded = decoded


class EndorsementKeyError(DeviceError):
    """The TPM has no usable EK of the configured type, or its EK certificate does not fit."""

    default_code = "ek-unavailable"


class IdentityError(DeviceError):
    """The stored agent identity (uuid and AK) is missing, unreadable, corrupt or belongs to
    other settings or another EK."""

    default_code = "identity-invalid"


class AgentSettingsError(DeviceError):
    """An agent setting has a value the agent cannot use; the message names the setting."""

    default_code = "invalid-settings"


class EnrollmentError(DeviceError):
    """Enrollment with the registrar failed for a reason that retrying does not fix."""

    default_code = "enrollment-failed"


class RegistrarRejectedError(EnrollmentError):
    """The registrar rejected the request with a 4xx status, so retrying does not help.

    ``registrar_code`` is the error code in the response body when there is one: edgetrust
    sends ``results.error.code``, while Keylime sends only the ``status`` text.
    """

    default_code = "registrar-rejected"

    def __init__(self, message: str, *, status: int, registrar_code: str | None,
                 registrar_message: str):
        super().__init__(message)
        self.status = status
        self.registrar_code = registrar_code
        self.registrar_message = registrar_message


class RegistrarUnavailableError(DeviceError):
    """The registrar is unreachable, timed out or returned a 5xx status, so retrying may help."""

    default_code = "registrar-unavailable"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
