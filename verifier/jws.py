"""Signed verdicts: compact JWS (RFC 7515) with ES256, and the JWKS that publishes the key.

A signed verdict lets a device or a gate check a verdict offline: it needs only the public key
from ``GET /v1/keys``. The payload is the verdict's JSON claims:

    {"iss", "sub": device id, "iat", "exp": the verdict's expires_at (trusted verdicts only),
     "status", "reasons", "verdict_id", "attested_at", "policies"}

Untrusted and unknown verdicts carry no ``exp`` because they never turn trusted by themselves.
A verifier of a JWS must reject one past its ``exp`` and must treat every status other than
``trusted`` as not trusted.

The ES256 signature is the raw 64-byte ``r || s`` of ECDSA P-256 over SHA-256 (RFC 7518
section 3.4), not the DER encoding that ``cryptography`` produces. The key id (``kid``) is the
RFC 7638 thumbprint of the public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

log = logging.getLogger(__name__)

ALGORITHM: Final = "ES256"
MEDIA_TYPE: Final = "application/jose"
_COORDINATE_BYTES: Final = 32


class JwsError(Exception):
    """A signing key or a JWS that cannot be used; ``code`` is stable kebab-case."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


# --- encoding ---------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; raise JwsError ``jws-malformed`` on any other character."""
    if not all(c.isalnum() or c in "-_" for c in text):
        raise JwsError("JWS segment is not base64url", code="jws-malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwsError("JWS segment is not base64url", code="jws-malformed") from None


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


# --- keys -------------------------------------------------------------------------------------


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """Return the JWK of a P-256 public key with its ``kid``, ``use`` and ``alg``."""
    numbers = public_key.public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        "y": b64url(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
    }
    return {**jwk, "kid": thumbprint(jwk), "use": "sig", "alg": ALGORITHM}


def thumbprint(jwk: Mapping[str, str]) -> str:
    """Return the RFC 7638 SHA-256 thumbprint of an EC JWK: its required members, sorted."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(_canonical_json(required)).digest())


def load_or_create_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the P-256 key in the PEM file ``path``, generating it (mode 0600) if it is absent.

    Several server processes may start at once: the key is written to a temporary file and
    linked into place, so exactly one generated key wins and every process loads that one.
    Raises JwsError ``signing-key-invalid`` for a file that is not an unencrypted P-256 key.
    """
    if not path.exists():
        _create_signing_key(path)
    return load_signing_key(path)


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise JwsError(f"cannot load the verdict signing key {path}: {error}; give an unencrypted "
                       "PEM ECDSA P-256 key (setting jws_signing_key)", code="signing-key-invalid") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise JwsError(f"the verdict signing key {path} is not an ECDSA P-256 key, which ES256 "
                       "needs", code="signing-key-invalid")
    return key


def _create_signing_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # mkstemp creates the file with mode 0600.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".jws-key-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        os.link(temporary, path)
        log.info("generated the verdict signing key %s", path)
    except FileExistsError:
        pass  # another process linked its key first; every process uses that one
    finally:
        os.unlink(temporary)


# --- signing and verification -----------------------------------------------------------------


class VerdictSigner:
    """Sign verdict claims with one ES256 key and publish its public JWK."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, issuer: str) -> None:
        self._key = key
        self.issuer = issuer
        self.jwk = public_jwk(key.public_key())
        self.kid = self.jwk["kid"]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Return the compact JWS of ``claims``."""
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "JWT"}
        signing_input = f"{b64url(_canonical_json(header))}.{b64url(_canonical_json(claims))}"
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(_COORDINATE_BYTES, "big") + s.to_bytes(_COORDINATE_BYTES, "big")
        return f"{signing_input}.{b64url(raw)}"

    def sign_verdict(self, verdict: Mapping[str, Any], now: datetime) -> str:
        return self.sign(verdict_claims(verdict, self.issuer, now))


def verdict_claims(verdict: Mapping[str, Any], issuer: str, now: datetime) -> dict[str, Any]:
    """Return the JWS claims of a verdict in the JSON form of ``verifier.api.verdict_json``."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": verdict["device_id"],
        "iat": int(now.timestamp()),
        "status": verdict["status"],
        "reasons": verdict["reasons"],
        "verdict_id": verdict["verdict_id"],
        "attested_at": verdict["attested_at"],
        "policies": verdict["policies"],
    }
    expires_at = verdict.get("expires_at")
    if expires_at is not None:
        claims["exp"] = int(datetime.fromisoformat(expires_at).timestamp())
    return claims


def verify_compact(token: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Check a compact ES256 JWS and return its claims; raise JwsError otherwise.

    Checks, in order:
    1. three base64url segments;
    2. the header names ES256 (no other algorithm is accepted);
    3. the signature is 64 bytes and verifies over ``header.payload``;
    4. the payload is a JSON object.
    Expiry is the caller's to check against its own clock.
    """
    segments = token.split(".")
    if len(segments) != 3:
        raise JwsError(f"a compact JWS has 3 segments, got {len(segments)}", code="jws-malformed")
    header_b64, payload_b64, signature_b64 = segments

    header = _json_object(b64url_decode(header_b64), "header")
    if header.get("alg") != ALGORITHM:
        raise JwsError(f"JWS alg is {header.get('alg')!r}, expected {ALGORITHM!r}",
                       code="jws-algorithm-invalid")

    raw = b64url_decode(signature_b64)
    if len(raw) != 2 * _COORDINATE_BYTES:
        raise JwsError(f"ES256 signature is {len(raw)} bytes, expected 64", code="jws-signature-invalid")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, f"{header_b64}.{payload_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwsError("JWS signature does not verify with the given key",
                       code="jws-signature-invalid") from None

    return _json_object(b64url_decode(payload_b64), "payload")


def _json_object(data: bytes, part: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JwsError(f"JWS {part} is not JSON", code="jws-malformed") from None
    if not isinstance(value, dict):
        raise JwsError(f"JWS {part} is not a JSON object", code="jws-malformed")
    return value
