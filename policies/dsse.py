"""Sign and verify runtime policies in DSSE envelopes with ECDSA keys.

A DSSE envelope (Dead Simple Signing Envelope, secure-systems-lab/dsse, protocol v1) is::

    {"payload": "<base64 payload>", "payloadType": "<media type>",
     "signatures": [{"keyid": "<optional>", "sig": "<base64 signature>"}]}

Each signature is over the pre-authentication encoding (PAE) of the payload type and the
payload, never over the payload alone::

    PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body

where ``len`` is the byte length in ASCII decimal and SP a single space. As Keylime 7.14.3
does, signatures are ECDSA over SHA-256 in DER form whatever the curve, the payload type of a
runtime policy is ``application/vnd.keylime+json``, and ``keyid`` is the SHA-256 hex of the
public key's PEM SubjectPublicKeyInfo. Envelopes made here verify with Keylime and the other
way round.

Public API::

    pae(payload_type: str, payload: bytes) -> bytes
    parse_envelope(unverified_envelope: bytes | str | Mapping[str, Any]) -> Envelope
    is_envelope(unverified_document: Mapping[str, Any]) -> bool
    verify_envelope(unverified_envelope, public_key_pem: bytes) -> VerifiedPayload
    sign_envelope(payload: bytes, private_key_pem: bytes, *, payload_type=KEYLIME_PAYLOAD_TYPE,
                  password: bytes | None = None) -> str
    load_public_key(pem: bytes) -> EllipticCurvePublicKey
    load_private_key(pem: bytes, password: bytes | None = None) -> EllipticCurvePrivateKey
    key_id(public_key: EllipticCurvePublicKey) -> str
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policies.errors import (
    DSSE_ENVELOPE_INVALID,
    DSSE_SIGNATURE_INVALID,
    SIGNING_KEY_INVALID,
    PolicyError,
)

KEYLIME_PAYLOAD_TYPE = "application/vnd.keylime+json"

_SIGNATURE_ALGORITHM = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class EnvelopeSignature:
    """One entry of an envelope's ``signatures``; ``sig`` is None if it is not base64."""

    keyid: str | None
    sig: bytes | None


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope whose signatures have not been checked."""

    payload_type: str
    unverified_payload: bytes
    signatures: tuple[EnvelopeSignature, ...]


@dataclass(frozen=True)
class VerifiedPayload:
    """The payload of an envelope that a signature from the given key covers."""

    payload_type: str
    payload: bytes
    keyid: str


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of a payload type and payload."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def is_envelope(unverified_document: Mapping[str, Any]) -> bool:
    """Tell whether a decoded JSON object is shaped as a DSSE envelope rather than a policy."""
    return "payload" in unverified_document and "signatures" in unverified_document


def parse_envelope(unverified_envelope: bytes | str | Mapping[str, Any]) -> Envelope:
    """Parse a DSSE envelope. Raises PolicyError with code ``dsse-envelope-invalid``."""
    if isinstance(unverified_envelope, Mapping):
        document: Any = unverified_envelope
    else:
        try:
            document = json.loads(unverified_envelope)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise PolicyError(f"DSSE envelope is not valid JSON: {exc}", code=DSSE_ENVELOPE_INVALID) from None
    if not isinstance(document, Mapping):
        raise PolicyError("DSSE envelope must be a JSON object", code=DSSE_ENVELOPE_INVALID)

    for key, expected in (("payload", str), ("payloadType", str), ("signatures", list)):
        if not isinstance(document.get(key), expected):
            raise PolicyError(
                f"DSSE envelope needs {key!r} as a JSON {'string' if expected is str else 'array'}",
                code=DSSE_ENVELOPE_INVALID,
                field=key,
            )
    if _has_lone_surrogate(document["payloadType"]):
        raise PolicyError(
            "DSSE payloadType is invalid: it contains a lone surrogate, which has no UTF-8 form",
            code=DSSE_ENVELOPE_INVALID,
            field="payloadType",
        )

    payload = _decode_base64(document["payload"])
    if payload is None:
        raise PolicyError("DSSE payload is not valid base64", code=DSSE_ENVELOPE_INVALID, field="payload")

    signatures = []
    for index, item in enumerate(document["signatures"]):
        if not isinstance(item, Mapping) or not isinstance(item.get("sig"), str):
            raise PolicyError(
                "DSSE signature needs 'sig' as a string",
                code=DSSE_ENVELOPE_INVALID,
                field=f"signatures[{index}]",
            )
        keyid = item.get("keyid")
        signatures.append(
            EnvelopeSignature(keyid if isinstance(keyid, str) else None, _decode_base64(item["sig"]))
        )
    if not signatures:
        raise PolicyError("DSSE envelope has no signatures", code=DSSE_ENVELOPE_INVALID, field="signatures")
    return Envelope(document["payloadType"], payload, tuple(signatures))


def verify_envelope(
    unverified_envelope: bytes | str | Mapping[str, Any], public_key_pem: bytes
) -> VerifiedPayload:
    """Verify that a signature in the envelope comes from the given ECDSA public key.

    Steps, as the DSSE protocol gives them:

    1. Parse the envelope and decode the payload.
    2. Compute PAE(payloadType, payload).
    3. Accept if any signature verifies over the PAE with the key; the keyid is a hint only.

    Returns the payload. Raises PolicyError: ``dsse-envelope-invalid`` for a malformed
    envelope, ``signing-key-invalid`` for an unusable key, ``dsse-signature-invalid`` when no
    signature verifies.
    """
    public_key = load_public_key(public_key_pem)
    envelope = parse_envelope(unverified_envelope)

    message = pae(envelope.payload_type, envelope.unverified_payload)

    for signature in envelope.signatures:
        if signature.sig is None:
            continue
        try:
            public_key.verify(signature.sig, message, _SIGNATURE_ALGORITHM)
        except InvalidSignature:
            continue
        return VerifiedPayload(envelope.payload_type, envelope.unverified_payload, key_id(public_key))
    raise PolicyError(
        f"no signature of the DSSE envelope verifies with key {key_id(public_key)} "
        f"({len(envelope.signatures)} signature(s) tried)",
        code=DSSE_SIGNATURE_INVALID,
        field="signatures",
    )


def sign_envelope(
    payload: bytes,
    private_key_pem: bytes,
    *,
    payload_type: str = KEYLIME_PAYLOAD_TYPE,
    password: bytes | None = None,
) -> str:
    """Sign a payload with an ECDSA private key and return the DSSE envelope as JSON text."""
    private_key = load_private_key(private_key_pem, password)
    signature = private_key.sign(pae(payload_type, payload), _SIGNATURE_ALGORITHM)
    envelope = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": [
            {
                "keyid": key_id(private_key.public_key()),
                "sig": base64.b64encode(signature).decode("ascii"),
            }
        ],
    }
    return json.dumps(envelope)


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Load an ECDSA public key (PEM SubjectPublicKeyInfo). Raises PolicyError."""
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"public key is not a PEM public key: {exc}", code=SIGNING_KEY_INVALID) from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PolicyError(
            f"public key is {type(public_key).__name__}, expected an EC (ECDSA) key",
            code=SIGNING_KEY_INVALID,
        )
    return public_key


def load_private_key(pem: bytes, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an ECDSA private key (PEM, PKCS#8 or SEC 1). Raises PolicyError."""
    try:
        private_key = serialization.load_pem_private_key(pem, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"private key cannot be loaded: {exc}", code=SIGNING_KEY_INVALID) from None
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise PolicyError(
            f"private key is {type(private_key).__name__}, expected an EC (ECDSA) key",
            code=SIGNING_KEY_INVALID,
        )
    return private_key


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return Keylime's DSSE key id: the SHA-256 hex of the PEM SubjectPublicKeyInfo."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _decode_base64(text: str) -> bytes | None:
    """Decode standard or URL-safe base64, as DSSE allows either; None if it is neither."""
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(text, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None
