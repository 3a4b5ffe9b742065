"""Registration checks, identity takeover, activation and the admin routes, over real HTTP with
software EKs and AKs (the swtpm tests drive a real TPM)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgetrust.settings import Settings
from evidence.tpm import ObjectAttributes as A
from evidence.tpm import TpmAlg
from tests.registrar.conftest import EkCas, Registrar, error_of, serve_registrar
from tests.registrar.helpers import (
    AK_ATTRIBUTES,
    SoftwareDevice,
    ak_public,
    auth_tag,
    b64,
    ek_public,
)
from tests.support import ekca

DEVICE_ID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"


def register_ok(registrar: Registrar, device: SoftwareDevice, device_id: str = DEVICE_ID,
                **overrides: Any) -> str:
    """Register ``device`` and return the blob; fail the test unless the response is 200."""
    response = registrar.register(device_id, device.body(**overrides))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["code"] == 200
    blob: str = body["results"]["blob"]
    return blob


def enroll(registrar: Registrar, device: SoftwareDevice, device_id: str = DEVICE_ID,
           **overrides: Any) -> None:
    blob = register_ok(registrar, device, device_id, **overrides)
    response = registrar.activate(device_id, device.auth_tag_for(blob, device_id))
    assert response.status_code == 200, response.text


def assert_rejected(registrar: Registrar, response: Any, status: int, code: str,
                    field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code
    if field is not None:
        assert error["field"] == field
    return error


# --- Version --------------------------------------------------------------------------------


def test_version_lists_api_versions(registrar: Registrar) -> None:
    response = registrar.get("/version")

    assert response.status_code == 200
    results = response.json()["results"]
    assert results["current_version"] == "2.3"
    assert results["supported_versions"] == ["2.1", "2.2", "2.3", "2.4", "2.5"]


# --- Accepted registrations -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.4", "2.5"])
def test_enrollment_on_each_api_version(registrar: Registrar, ek_cas: EkCas, version: str) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)

    response = registrar.register(DEVICE_ID, device.body(), version=version)

    assert response.status_code == 200
    tag = device.auth_tag_for(response.json()["results"]["blob"], DEVICE_ID)
    assert registrar.activate(DEVICE_ID, tag).status_code == 200
    assert registrar.row(DEVICE_ID).active is True


def test_enrollment_rsa_ek_rsa_ak(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice(ek_key=ekca.shared_rsa_key("ek"), ak_key=ekca.shared_rsa_key("ak"),
                            ca=ek_cas.rsa_issuer)

    enroll(registrar, device)

    row = registrar.row(DEVICE_ID)
    assert row.active is True
    assert row.regcount == 1
    assert row.challenge_secret is None


def test_enrollment_stores_contact_details(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    mtls = ekca.pem(ek_cas.untrusted.certificate).decode()

    enroll(registrar, device, ip="192.0.2.7", port="9002", mtls_cert=mtls)
    assert device.ekcert is not None

    response = registrar.get(f"/v2.3/agents/{DEVICE_ID}")
    assert response.status_code == 200
    results = response.json()["results"]
    assert results["ip"] == "192.0.2.7"
    assert results["port"] == 9002
    assert results["mtls_cert"] == mtls
    assert results["aik_tpm"] == b64(device.aik_tpm)
    assert results["ek_tpm"] == b64(device.ek_tpm)
    assert results["ekcert"] == b64(ekca.der(device.ekcert))
    assert results["regcount"] == 1


def test_enrollment_with_mtls_disabled_and_ipv6(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)

    enroll(registrar, device, ip="::1", port=9002, mtls_cert="disabled")

    results = registrar.get(f"/v2.3/agents/{DEVICE_ID}").json()["results"]
    assert results["mtls_cert"] == "disabled"
    assert results["ip"] == "::1"


def test_activation_via_post_activate(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    blob = register_ok(registrar, device)

    response = registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID), via_put=False)

    assert response.status_code == 200
    assert response.json() == {"code": 200, "status": "Success", "results": {}}
    assert registrar.row(DEVICE_ID).active is True


def test_activation_accepts_uppercase_tag(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    blob = register_ok(registrar, device)

    response = registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID).upper())

    assert response.status_code == 200


def test_ekcert_as_pem(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    assert device.ekcert is not None

    enroll(registrar, device, ekcert=ekca.pem(device.ekcert).decode())

    assert registrar.row(DEVICE_ID).ekcert == ekca.der(device.ekcert)


@pytest.mark.parametrize(("ek_kind", "name_alg", "aes_bits"), [
    ("ec-p256", TpmAlg.SHA256, 128),
    ("ec-p384", TpmAlg.SHA384, 256),
    ("rsa-2048", TpmAlg.SHA256, 128),
])
def test_ekcert_only_uses_tcg_template(registrar: Registrar, ek_cas: EkCas,
                                       ek_kind: ekca.KeyKind, name_alg: TpmAlg,
                                       aes_bits: int) -> None:
    ek_key = ekca.shared_rsa_key("ek") if ek_kind == "rsa-2048" else ekca.generate_key(ek_kind)
    device = SoftwareDevice(ek_key=ek_key, ak_key=ekca.generate_key("ec-p256"), ca=ek_cas.issuer,
                            ek_tpm=ek_public(ek_key, name_alg=name_alg, aes_bits=aes_bits))

    enroll(registrar, device, ek_tpm=None)

    row = registrar.row(DEVICE_ID)
    assert row.active is True
    assert row.ek_tpm is None


def test_ek_without_certificate_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(None)

    response = registrar.register(DEVICE_ID, device.body())

    assert_rejected(registrar, response, 403, "ek-certificate-missing", "ekcert")
    assert registrar.row_count() == 0


def test_ek_without_certificate_allowed_by_setting(
    migrated_engine: Any, registrar_settings: Settings
) -> None:
    settings = registrar_settings.replace(require_ek_certificate=False)
    for registrar in serve_registrar(migrated_engine, settings):
        device = SoftwareDevice.create(None)

        enroll(registrar, device)

        row = registrar.row(DEVICE_ID)
        assert row.active is True
        assert row.ekcert is None


# --- EK certificate edge cases ----------------------------------------------------------------


def test_ekcert_with_nv_padding(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    assert device.ekcert is not None
    padded = ekca.nv_padded(ekca.der(device.ekcert), 1600)

    enroll(registrar, device, ekcert=b64(padded))

    assert registrar.row(DEVICE_ID).ekcert == ekca.der(device.ekcert)


def test_ekcert_with_unsorted_issuer_rdn(registrar: Registrar, ek_cas: EkCas) -> None:
    ca = ek_cas.unsorted_rdn_issuer
    device = SoftwareDevice.create(ca)
    assert device.ekcert is not None
    unsorted = ekca.with_unsorted_rdns(device.ekcert, ca, ek_cas.unsorted_rdn_name)

    enroll(registrar, device, ekcert=b64(unsorted))

    assert registrar.row(DEVICE_ID).ekcert == unsorted


def test_ekcert_tcg_profile_with_critical_san(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    assert device.ekcert is not None
    san = device.ekcert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert device.ekcert.subject == x509.Name([])

    enroll(registrar, device)

    assert registrar.row(DEVICE_ID).active is True


@pytest.mark.parametrize("ca_name", ["issuer", "p384_root", "rsa_issuer"])
def test_ekcert_from_each_ca_type(registrar: Registrar, ek_cas: EkCas, ca_name: str) -> None:
    ca: ekca.TestCa = getattr(ek_cas, ca_name)
    device = SoftwareDevice.create(ca)

    enroll(registrar, device)

    assert registrar.row(DEVICE_ID).active is True


# --- Rejected registrations -------------------------------------------------------------------


def test_ekcert_not_chaining_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.untrusted)

    response = registrar.register(DEVICE_ID, device.body())

    error = assert_rejected(registrar, response, 403, "ek-certificate-untrusted", "ekcert")
    assert "Untrusted EK CA" in error["message"]
    assert registrar.row_count() == 0


def test_ekcert_for_other_key_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_cert = ek_cas.issuer.issue_ek_certificate(other_key.public_key())

    response = registrar.register(DEVICE_ID, device.body(ekcert=b64(ekca.der(other_cert))))

    assert_rejected(registrar, response, 403, "ek-certificate-key-mismatch", "ekcert")
    assert registrar.row_count() == 0


def test_expired_ekcert_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(None)
    device.ekcert = ek_cas.issuer.issue_ek_certificate(
        device.ek_key.public_key(), not_before=ekca.NOW - 20 * ekca.ONE_DAY,
        not_after=ekca.NOW - 10 * ekca.ONE_DAY,
    )

    response = registrar.register(DEVICE_ID, device.body())

    assert_rejected(registrar, response, 403, "ek-certificate-expired", "ekcert")
    assert registrar.row_count() == 0


_MISSING_ATTRIBUTE_CASES = {
    "not restricted": AK_ATTRIBUTES & ~A.RESTRICTED,
    "not sign": AK_ATTRIBUTES & ~A.SIGN_ENCRYPT,
    "not fixedTPM": AK_ATTRIBUTES & ~A.FIXED_TPM,
    "not fixedParent": AK_ATTRIBUTES & ~A.FIXED_PARENT,
    "not sensitiveDataOrigin": AK_ATTRIBUTES & ~A.SENSITIVE_DATA_ORIGIN,
}


@pytest.mark.parametrize("case", sorted(_MISSING_ATTRIBUTE_CASES))
def test_ak_missing_attribute_rejected(registrar: Registrar, ek_cas: EkCas, case: str) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    aik = ak_public(device.ak_key, attributes=_MISSING_ATTRIBUTE_CASES[case])

    response = registrar.register(DEVICE_ID, device.body(aik_tpm=b64(aik)))

    error = assert_rejected(registrar, response, 403, "ak-attributes-invalid", "aik_tpm")
    assert case.removeprefix("not ") in error["message"]
    assert registrar.row_count() == 0


def test_ak_with_decrypt_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    aik = ak_public(device.ak_key, attributes=AK_ATTRIBUTES | A.DECRYPT)

    response = registrar.register(DEVICE_ID, device.body(aik_tpm=b64(aik)))

    assert_rejected(registrar, response, 403, "ak-attribute-decrypt-set", "aik_tpm")
    assert registrar.row_count() == 0


@pytest.mark.parametrize(("scheme", "scheme_hash"), [
    (TpmAlg.ECDSA, TpmAlg.SHA1),
    (TpmAlg.NULL, TpmAlg.SHA256),
])
def test_ak_disallowed_algorithm_rejected(registrar: Registrar, ek_cas: EkCas, scheme: TpmAlg,
                                          scheme_hash: TpmAlg) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    aik = ak_public(device.ak_key, scheme=scheme, scheme_hash=scheme_hash)

    response = registrar.register(DEVICE_ID, device.body(aik_tpm=b64(aik)))

    assert_rejected(registrar, response, 403, "ak-algorithm-not-allowed", "aik_tpm")
    assert registrar.row_count() == 0


def test_ak_algorithm_limited_by_setting(migrated_engine: Any, registrar_settings: Settings,
                                         ek_cas: EkCas) -> None:
    settings = registrar_settings.replace(ak_allowed_algorithms=["rsassa-sha256"])
    for registrar in serve_registrar(migrated_engine, settings):
        device = SoftwareDevice.create(ek_cas.issuer)

        response = registrar.register(DEVICE_ID, device.body())

        error = assert_rejected(registrar, response, 403, "ak-algorithm-not-allowed", "aik_tpm")
        assert "rsa:rsassa-sha256" in error["message"]


def test_ek_without_symmetric_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    signing_ek = ak_public(device.ek_key)

    response = registrar.register(DEVICE_ID, device.body(ek_tpm=b64(signing_ek)))

    assert_rejected(registrar, response, 403, "ek-not-storage-key", "ek_tpm")
    assert registrar.row_count() == 0


# --- Identity takeover ------------------------------------------------------------------------


def _takeover_cases(ek_cas: EkCas, original: SoftwareDevice) -> dict[str, SoftwareDevice]:
    other_ek = ekca.generate_key("ec-p256")
    other_ak = ekca.generate_key("ec-p256")
    return {
        "different EK": SoftwareDevice(ek_key=other_ek, ak_key=other_ak, ca=ek_cas.issuer),
        "same EK, new AK": SoftwareDevice(ek_key=original.ek_key, ak_key=other_ak,
                                          ca=None, ekcert=original.ekcert),
        "same EK and AK, new EK certificate": SoftwareDevice(
            ek_key=original.ek_key, ak_key=original.ak_key, ca=ek_cas.p384_root),
    }


@pytest.mark.parametrize("case", ["different EK", "same EK, new AK",
                                  "same EK and AK, new EK certificate"])
@pytest.mark.parametrize("activated", [True, False])
def test_identity_takeover_rejected(registrar: Registrar, ek_cas: EkCas,
                                    caplog: pytest.LogCaptureFixture, case: str,
                                    activated: bool) -> None:
    original = SoftwareDevice.create(ek_cas.issuer)
    if activated:
        enroll(registrar, original, ip="192.0.2.1", port=9002)
    else:
        register_ok(registrar, original, ip="192.0.2.1", port=9002)
    before = registrar.row(DEVICE_ID)
    attacker = _takeover_cases(ek_cas, original)[case]

    with caplog.at_level(logging.WARNING, logger="registrar"):
        response = registrar.register(DEVICE_ID, attacker.body(ip="198.51.100.9", port=1234))

    error = assert_rejected(registrar, response, 403, "identity-mismatch")
    assert "delete the device" in error["message"]
    expected_reason = "re-enrollment needed" if case == "same EK, new AK" else "identity takeover"
    assert expected_reason in error["message"]
    assert registrar.row(DEVICE_ID) == before
    events = [record for record in caplog.records
              if record.levelno == logging.WARNING and "security event" in record.getMessage()]
    assert len(events) == 1
    assert events[0].device_id == DEVICE_ID  # type: ignore[attr-defined]


def test_reenrollment_after_delete(registrar: Registrar, ek_cas: EkCas) -> None:
    original = SoftwareDevice.create(ek_cas.issuer)
    enroll(registrar, original)
    replacement = SoftwareDevice.create(ek_cas.issuer)

    assert registrar.delete(DEVICE_ID).status_code == 200
    enroll(registrar, replacement)

    row = registrar.row(DEVICE_ID)
    assert row.aik_tpm == replacement.aik_tpm
    assert row.regcount == 1


# --- Same identity again ----------------------------------------------------------------------


def test_same_identity_gets_new_challenge(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    enroll(registrar, device, ip="192.0.2.1", port=9002)

    blob = register_ok(registrar, device, ip="192.0.2.2", port=9003)

    row = registrar.row(DEVICE_ID)
    assert row.regcount == 2
    assert row.active is True
    assert row.challenge_secret is not None
    served = registrar.get(f"/v2.3/agents/{DEVICE_ID}").json()["results"]
    assert (served["ip"], served["port"], served["regcount"]) == ("192.0.2.1", 9002, 2)

    assert registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID)).status_code == 200

    served = registrar.get(f"/v2.3/agents/{DEVICE_ID}").json()["results"]
    assert (served["ip"], served["port"]) == ("192.0.2.2", 9003)
    assert registrar.row(DEVICE_ID).challenge_secret is None


def test_older_challenge_tag_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    first_blob = register_ok(registrar, device)
    register_ok(registrar, device)

    response = registrar.activate(DEVICE_ID, device.auth_tag_for(first_blob, DEVICE_ID))

    assert_rejected(registrar, response, 403, "activation-failed", "auth_tag")
    assert registrar.row(DEVICE_ID).active is False


# --- Activation -------------------------------------------------------------------------------


def test_wrong_auth_tag_rejected(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    register_ok(registrar, device)

    response = registrar.activate(DEVICE_ID, auth_tag(b"not the secret", DEVICE_ID))

    assert_rejected(registrar, response, 403, "activation-failed", "auth_tag")
    row = registrar.row(DEVICE_ID)
    assert row.active is False
    assert row.failed_activations == 1
    assert row.challenge_secret is not None


def test_challenge_void_after_three_wrong_tags(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    blob = register_ok(registrar, device)
    wrong = "ab" * 48

    for attempt in range(1, 4):
        response = registrar.activate(DEVICE_ID, wrong)
        error = assert_rejected(registrar, response, 403, "activation-failed")
        assert ("void" in error["message"]) == (attempt == 3)

    response = registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID))

    assert_rejected(registrar, response, 409, "challenge-not-pending")
    row = registrar.row(DEVICE_ID)
    assert row.active is False
    assert row.challenge_secret is None

    enroll(registrar, device)
    assert registrar.row(DEVICE_ID).active is True


def test_void_challenge_keeps_active_device(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    enroll(registrar, device, ip="192.0.2.1", port=9002)
    register_ok(registrar, device, ip="198.51.100.9", port=1234)

    for _ in range(3):
        assert registrar.activate(DEVICE_ID, "cd" * 48).status_code == 403

    row = registrar.row(DEVICE_ID)
    assert row.active is True
    assert (row.ip, row.port) == ("192.0.2.1", 9002)
    assert row.pending_ip is None
    assert row.challenge_secret is None


def test_activation_unknown_device(registrar: Registrar) -> None:
    for via_put in (True, False):
        response = registrar.activate("unknown-device", "ab" * 48, via_put=via_put)

        assert_rejected(registrar, response, 404, "device-not-found")


def test_activation_without_challenge(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    blob = register_ok(registrar, device)
    tag = device.auth_tag_for(blob, DEVICE_ID)
    assert registrar.activate(DEVICE_ID, tag).status_code == 200

    response = registrar.activate(DEVICE_ID, tag)

    assert_rejected(registrar, response, 409, "challenge-not-pending")


def test_secret_never_logged(registrar: Registrar, ek_cas: EkCas,
                             caplog: pytest.LogCaptureFixture) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)

    with caplog.at_level(logging.DEBUG):
        blob = register_ok(registrar, device)
        secret = registrar.row(DEVICE_ID).challenge_secret
        registrar.activate(DEVICE_ID, "ab" * 48)
        registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID))

    assert secret
    for record in caplog.records:
        assert secret.decode() not in record.getMessage()
    device_lines = [record for record in caplog.records if record.name.startswith("registrar")]
    assert device_lines
    for record in device_lines:
        assert getattr(record, "device_id", None) == DEVICE_ID, record.getMessage()


# --- Admin routes -----------------------------------------------------------------------------


def test_device_hidden_until_activated(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    blob = register_ok(registrar, device)

    response = registrar.get(f"/v2.3/agents/{DEVICE_ID}")

    error = assert_rejected(registrar, response, 404, "device-not-found")
    assert "not activated" in error["message"]

    registrar.activate(DEVICE_ID, device.auth_tag_for(blob, DEVICE_ID))
    assert registrar.get(f"/v2.3/agents/{DEVICE_ID}").status_code == 200


def test_list_and_delete(registrar: Registrar, ek_cas: EkCas) -> None:
    for device_id in ("dev-b", "dev-a"):
        enroll(registrar, SoftwareDevice.create(ek_cas.issuer), device_id)

    listed = registrar.get("/v2.3/agents/")

    assert listed.status_code == 200
    assert listed.json()["results"] == {"uuids": ["dev-a", "dev-b"]}
    assert registrar.get("/v2.5/agents").json()["results"]["uuids"] == ["dev-a", "dev-b"]

    assert registrar.delete("dev-a").status_code == 200
    assert registrar.get("/v2.3/agents/").json()["results"]["uuids"] == ["dev-b"]
    assert_rejected(registrar, registrar.get("/v2.3/agents/dev-a"), 404, "device-not-found")
    assert_rejected(registrar, registrar.delete("dev-a"), 404, "device-not-found")


def test_missing_ca_bundle_rejects_certificates(
    migrated_engine: Any, registrar_settings: Settings, ek_cas: EkCas, tmp_path: Path
) -> None:
    settings = registrar_settings.replace(ek_ca_dir=tmp_path / "no-such-bundle")
    for registrar in serve_registrar(migrated_engine, settings):
        device = SoftwareDevice.create(ek_cas.issuer)

        response = registrar.register(DEVICE_ID, device.body())

        assert_rejected(registrar, response, 403, "ek-certificate-untrusted", "ekcert")

