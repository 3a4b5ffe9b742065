"""Errors raised by the verifier.

Each error has a stable kebab-case ``code`` that tests assert and ``edgetrust.web`` maps to an
HTTP status, a ``message`` naming the value seen and the value expected, and, where the error
comes from one request field, that ``field``. A failed attestation is not an error: the engine
returns it as findings and a verdict.
"""

from __future__ import annotations


class VerifierError(Exception):
    """Base of every error raised by ``verifier``."""

    default_code = "verifier-request-invalid"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field


class VerifierDeviceNotFound(VerifierError):
    """The verifier does not attest a device with this id."""

    default_code = "verifier-device-not-found"


class DeviceAlreadyAdded(VerifierError):
    """The device is already in the verifier; remove it first to add it with new settings."""

    default_code = "device-already-added"


class DeviceNotActive(VerifierError):
    """The registrar knows the device, but it has not completed its credential challenge."""

    default_code = "device-not-active"


class PolicyNotFound(VerifierError):
    """A policy name that the policy store does not hold for the kind it is used as."""

    default_code = "policy-not-found"


class AgentError(VerifierError):
    """The agent could not be asked for evidence, or answered with something that is not a
    Keylime quote response. The device's verdict becomes unknown, never untrusted."""

    default_code = "agent-unreachable"


class AgentUnreachable(AgentError):
    """Connecting, the TLS handshake or reading the answer failed or timed out."""

    default_code = "agent-unreachable"


class AgentResponseInvalid(AgentError):
    """The agent answered, but with an HTTP error status or a body that is not a quote response."""

    default_code = "agent-response-invalid"
