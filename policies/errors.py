"""Errors raised by the policies package.

Every error carries a stable kebab-case ``code`` that tests assert and the web layer maps to an
HTTP status, and a plain ``message`` with the value seen and the value expected. Where the input
came from a named field, ``field`` names it as a JSON path such as ``digests["/usr/bin/bash"][0]``.
"""

from __future__ import annotations

# Codes for a runtime policy document that cannot be used.
POLICY_NOT_JSON = "policy-not-json"
POLICY_INVALID = "policy-invalid"
POLICY_FIELD_MISSING = "policy-field-missing"
POLICY_FIELD_INVALID = "policy-field-invalid"
POLICY_DIGEST_INVALID = "policy-digest-invalid"
POLICY_EXCLUDE_INVALID = "policy-exclude-invalid"
POLICY_VERSION_UNSUPPORTED = "policy-version-unsupported"
POLICY_VERIFICATION_KEYS_INVALID = "policy-verification-keys-invalid"

# Codes for legacy inputs converted into a runtime policy.
ALLOWLIST_INVALID = "allowlist-invalid"
EXCLUDE_LIST_INVALID = "exclude-list-invalid"

# Codes for DSSE envelopes and the keys that sign or verify them.
DSSE_ENVELOPE_INVALID = "dsse-envelope-invalid"
DSSE_SIGNATURE_INVALID = "dsse-signature-invalid"
DSSE_KEY_REQUIRED = "dsse-key-required"
POLICY_NOT_SIGNED = "policy-not-signed"
SIGNING_KEY_INVALID = "signing-key-invalid"

# Codes for IMA file signatures (``security.ima`` signature v2).
IMA_SIGNATURE_MALFORMED = "ima-signature-malformed"
IMA_SIGNATURE_UNSUPPORTED = "ima-signature-unsupported"
IMA_SIGNATURE_INVALID = "ima-signature-invalid"
IMA_KEY_UNSUPPORTED = "ima-key-unsupported"

# Code for a policy creation source that cannot be read.
POLICY_SOURCE_INVALID = "policy-source-invalid"


class PolicyError(Exception):
    """Base of every error raised by ``policies``."""

    default_code = POLICY_INVALID

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field

    def __str__(self) -> str:
        if self.field is None:
            return self.message
        return f"{self.field}: {self.message}"
