"""Signed verdicts checked offline: only ``cryptography`` and the JWK, as a device would."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from verifier import jws

VERDICT = {
    "verdict_id": "6f1c2a52-8c55-4bd6-9b0b-3f6f1d3c2a10",
    "device_id": "car-1",
    "status": "trusted",
    "reasons": [],
    "issued_at": "2026-12-04T12:00:00+00:00",
    "attested_at": "2026-12-04T12:00:00+00:00",
    "expires_at": "2026-12-04T12:00:30+00:00",
    "policies": [{"kind": "runtime", "name": "fleet", "version": 3, "content_hash": "ab" * 32}],
}
NOW = datetime(2026, 12, 4, 12, 0, 1, tzinfo=UTC)


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_offline(token: str, jwk: dict[str, str]) -> dict[str, Any]:
    """Verify a compact ES256 JWS with the JWK alone, written apart from verifier.jws."""
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(_b64decode(header_b64))
    assert header["alg"] == "ES256"
    assert header["kid"] == jwk["kid"]
    x = int.from_bytes(_b64decode(jwk["x"]), "big")
    y = int.from_bytes(_b64decode(jwk["y"]), "big")
    public_key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    raw = _b64decode(signature_b64)
    signature = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    claims: dict[str, Any] = json.loads(_b64decode(payload_b64))
    return claims


@pytest.fixture
def signer() -> jws.VerdictSigner:
    return jws.VerdictSigner(ec.generate_private_key(ec.SECP256R1()), "edgetrust-test")


def test_jws_verifies_offline(signer: jws.VerdictSigner) -> None:
    token = signer.sign_verdict(VERDICT, NOW)

    claims = verify_offline(token, signer.jwks()["keys"][0])

    assert claims["iss"] == "edgetrust-test"
    assert claims["sub"] == "car-1"
    assert claims["iat"] == int(NOW.timestamp())
    assert claims["exp"] == int(datetime(2026, 12, 4, 12, 0, 30, tzinfo=UTC).timestamp())
    assert claims["status"] == "trusted"
    assert claims["verdict_id"] == VERDICT["verdict_id"]
    assert claims["policies"] == VERDICT["policies"]


def test_tampered_payload_fails_offline(signer: jws.VerdictSigner) -> None:
    header_b64, payload_b64, signature_b64 = signer.sign_verdict(
        {**VERDICT, "status": "untrusted", "expires_at": None}, NOW).split(".")
    claims = json.loads(_b64decode(payload_b64))
    claims["status"] = "trusted"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header_b64}.{forged_payload}.{signature_b64}"

    with pytest.raises(InvalidSignature):
        verify_offline(forged, signer.jwks()["keys"][0])
    with pytest.raises(jws.JwsError) as raised:
        jws.verify_compact(forged, ec.generate_private_key(ec.SECP256R1()).public_key())
    assert raised.value.code == "jws-signature-invalid"


def test_other_key_fails(signer: jws.VerdictSigner) -> None:
    token = signer.sign_verdict(VERDICT, NOW)
    other = jws.VerdictSigner(ec.generate_private_key(ec.SECP256R1()), "edgetrust-test")
    other_jwk = {**other.jwks()["keys"][0], "kid": signer.kid}

    with pytest.raises(InvalidSignature):
        verify_offline(token, other_jwk)


@pytest.mark.parametrize(("token", "code"), [
    ("a.b", "jws-malformed"),
    ("a.b.c.d", "jws-malformed"),
    ("e30.e30.AAAA", "jws-algorithm-invalid"),
    ("eyJhbGciOiJub25lIn0.e30.", "jws-algorithm-invalid"),
    ("eyJhbGciOiJFUzI1NiJ9.e30.AAAA", "jws-signature-invalid"),
    ("!!!.e30.AAAA", "jws-malformed"),
    # A header nested too deeply for the JSON decoder.
    (base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode().rstrip("=") + ".e30.AAAA",
     "jws-malformed"),
])
def test_verify_compact_rejects(signer: jws.VerdictSigner, token: str, code: str) -> None:
    with pytest.raises(jws.JwsError) as raised:
        jws.verify_compact(token, signer._key.public_key())  # noqa: SLF001 - the signer's own key

    assert raised.value.code == code


def test_verify_compact_returns_claims(signer: jws.VerdictSigner) -> None:
    token = signer.sign({"sub": "car-1"})

    assert jws.verify_compact(token, signer._key.public_key()) == {"sub": "car-1"}  # noqa: SLF001


def test_kid_is_rfc7638_thumbprint(signer: jws.VerdictSigner) -> None:
    jwk = signer.jwks()["keys"][0]
    members = json.dumps({"crv": "P-256", "kty": "EC", "x": jwk["x"], "y": jwk["y"]},
                         separators=(",", ":")).encode()

    expected = base64.urlsafe_b64encode(hashlib.sha256(members).digest()).rstrip(b"=").decode()

    assert jwk["kid"] == expected


def test_key_file_created_once(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "jws.pem"

    first = jws.load_or_create_signing_key(path)
    second = jws.load_or_create_signing_key(path)

    assert path.stat().st_mode & 0o777 == 0o600
    assert jws.public_jwk(first.public_key()) == jws.public_jwk(second.public_key())
    assert [p.name for p in path.parent.iterdir()] == ["jws.pem"]


def test_key_file_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "jws.pem"
    path.write_text("not a key")

    with pytest.raises(jws.JwsError) as raised:
        jws.load_signing_key(path)

    assert raised.value.code == "signing-key-invalid"
