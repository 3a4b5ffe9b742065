"""device.tpm against a real swtpm: EK selection, EK certificates, AKs, credential activation,
and that no transient object or session stays loaded after any operation."""

from __future__ import annotations

import dataclasses
import secrets
import socket

import pytest

from device.errors import AgentSettingsError, EndorsementKeyError, TpmError
from device.tpm import DeviceTpm, EndorsementKey
from evidence.credential import make_credential, parse_credential_file
from evidence.tpm import (
    EccCurve,
    ObjectAttributes,
    TpmAlg,
    check_ak_attributes,
    parse_tpm2b_public,
)
from tests.device.conftest import TpmUnderTest, store_nv
from tests.support import ekca

pytestmark = pytest.mark.swtpm


def assert_nothing_loaded(tpm: DeviceTpm) -> None:
    assert tpm.transient_handles() == []
    assert tpm.session_handles() == []


def activate_fresh_credential(tpm: DeviceTpm, ek: EndorsementKey, ak_type: str) -> None:
    ak = tpm.create_ak(ek, ak_type)
    assert_nothing_loaded(tpm)
    secret = secrets.token_bytes(32)
    blob = make_credential(ek.public_area, ak.name, secret)

    recovered = tpm.activate_credential(ek, ak, parse_credential_file(blob))

    assert recovered == secret
    assert_nothing_loaded(tpm)


def test_rsa_ek_uses_persistent_certified_key(provisioned_swtpm: TpmUnderTest) -> None:
    with provisioned_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("rsa")

        assert ek.persistent_handle == 0x81010001
        assert ek.template is None
        assert ek.certificate == provisioned_swtpm.rsa_certificate
        assert ek.public_area.type == TpmAlg.RSA
        assert ek.public_area.key_bits == 2048
        assert_nothing_loaded(tpm)


def test_ecc_ek_falls_back_to_p384(provisioned_swtpm: TpmUnderTest) -> None:
    with provisioned_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("ecc")

        assert ek.persistent_handle == 0x81010016
        assert ek.profile.template == "EK-HIGH-ECC384"
        assert ek.certificate == provisioned_swtpm.ecc_certificate
        assert ek.public_area.curve == EccCurve.NIST_P384
        assert "persistent handle 0x81010016" in ek.describe()
        assert_nothing_loaded(tpm)


def test_ecc_p256_ek_from_template_cuts_padding(p256_swtpm: TpmUnderTest) -> None:
    with p256_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("ecc")

        assert ek.persistent_handle is None
        assert ek.template is not None
        assert ek.profile.certificate_index == 0x01C0000A
        assert ek.certificate == p256_swtpm.ecc_certificate
        assert ek.public_area.curve == EccCurve.NIST_P256
        assert "created from TCG template EK-ECC256" in ek.describe()
        assert_nothing_loaded(tpm)


def test_ek_without_certificate_uses_template(blank_swtpm: TpmUnderTest) -> None:
    with blank_swtpm.connect() as tpm:
        for ek_type, template in (("rsa", "EK-RSA2048"), ("ecc", "EK-ECC256")):
            ek = tpm.read_endorsement_key(ek_type)

            assert ek.certificate is None
            assert ek.persistent_handle is None
            assert ek.profile.template == template
            assert "no EK certificate" in ek.describe()
            assert_nothing_loaded(tpm)


def test_ek_certificate_for_other_key_rejected(blank_swtpm: TpmUnderTest,
                                               p256_ek_ca: ekca.TestCa) -> None:
    other_key = ekca.generate_key("ec-p256").public_key()
    certificate = ekca.der(p256_ek_ca.issue_ek_certificate(other_key))
    store_nv(blank_swtpm.swtpm, 0x01C0000A, certificate)

    with blank_swtpm.connect() as tpm:
        with pytest.raises(EndorsementKeyError) as raised:
            tpm.read_endorsement_key("ecc")

        assert raised.value.code == "ek-certificate-mismatch"
        assert "0x01c0000a" in raised.value.message
        assert_nothing_loaded(tpm)


def test_ek_certificate_not_der_rejected(blank_swtpm: TpmUnderTest) -> None:
    store_nv(blank_swtpm.swtpm, 0x01C00002, b"\xff" * 64)

    with blank_swtpm.connect() as tpm, pytest.raises(EndorsementKeyError) as raised:
        tpm.read_endorsement_key("rsa")

    assert raised.value.code == "ek-certificate-malformed"
    assert "0x01c00002" in raised.value.message


def test_unknown_ek_type_rejected(blank_swtpm: TpmUnderTest) -> None:
    with blank_swtpm.connect() as tpm, pytest.raises(AgentSettingsError, match="agent_ek_type"):
        tpm.read_endorsement_key("ecc521")


@pytest.mark.parametrize(
    ("ak_type", "key_type", "scheme"),
    [("rsa", TpmAlg.RSA, TpmAlg.RSASSA), ("ecc", TpmAlg.ECC, TpmAlg.ECDSA)],
)
def test_ak_is_restricted_signing_key(provisioned_swtpm: TpmUnderTest, ak_type: str,
                                      key_type: TpmAlg, scheme: TpmAlg) -> None:
    with provisioned_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("rsa")
        ak = tpm.create_ak(ek, ak_type)
        assert_nothing_loaded(tpm)

    area = parse_tpm2b_public(ak.public)
    required = (ObjectAttributes.RESTRICTED | ObjectAttributes.SIGN_ENCRYPT
                | ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
                | ObjectAttributes.SENSITIVE_DATA_ORIGIN)
    assert area.object_attributes & required == required
    assert not area.object_attributes & ObjectAttributes.DECRYPT
    assert area.type == key_type
    assert area.scheme == scheme
    assert area.scheme_hash == TpmAlg.SHA256
    assert area.name_alg == TpmAlg.SHA256
    if key_type == TpmAlg.ECC:
        assert area.curve == EccCurve.NIST_P256
    check_ak_attributes(area)


@pytest.mark.parametrize("ak_type", ["rsa", "ecc"])
def test_credential_activates_under_rsa_ek(provisioned_swtpm: TpmUnderTest, ak_type: str) -> None:
    with provisioned_swtpm.connect() as tpm:
        activate_fresh_credential(tpm, tpm.read_endorsement_key("rsa"), ak_type)


def test_credential_activates_under_p384_ek(provisioned_swtpm: TpmUnderTest) -> None:
    with provisioned_swtpm.connect() as tpm:
        activate_fresh_credential(tpm, tpm.read_endorsement_key("ecc"), "ecc")


def test_credential_activates_under_p256_ek(p256_swtpm: TpmUnderTest) -> None:
    with p256_swtpm.connect() as tpm:
        activate_fresh_credential(tpm, tpm.read_endorsement_key("ecc"), "ecc")


def test_credential_activates_under_uncertified_rsa_ek(blank_swtpm: TpmUnderTest) -> None:
    with blank_swtpm.connect() as tpm:
        activate_fresh_credential(tpm, tpm.read_endorsement_key("rsa"), "ecc")


def test_credential_for_other_ak_fails(provisioned_swtpm: TpmUnderTest) -> None:
    with provisioned_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("ecc")
        ak = tpm.create_ak(ek, "ecc")
        other = tpm.create_ak(ek, "ecc")
        blob = make_credential(ek.public_area, other.name, secrets.token_bytes(32))

        with pytest.raises(TpmError) as raised:
            tpm.activate_credential(ek, ak, parse_credential_file(blob))

        assert raised.value.command == "TPM2_ActivateCredential"
        assert raised.value.response_code != 0
        assert f"{raised.value.response_code:#x}" in raised.value.message
        assert isinstance(raised.value.__cause__, Exception)
        assert_nothing_loaded(tpm)


def test_ak_loads_only_under_its_ek(provisioned_swtpm: TpmUnderTest) -> None:
    with provisioned_swtpm.connect() as tpm:
        rsa_ek = tpm.read_endorsement_key("rsa")
        ecc_ek = tpm.read_endorsement_key("ecc")
        ak = tpm.create_ak(rsa_ek, "ecc")

        tpm.check_ak_loads(rsa_ek, ak)
        with pytest.raises(TpmError) as raised:
            tpm.check_ak_loads(ecc_ek, ak)

        assert raised.value.command == "TPM2_Load"
        assert_nothing_loaded(tpm)


def test_changed_ek_detected(blank_swtpm: TpmUnderTest) -> None:
    with blank_swtpm.connect() as tpm:
        ek = tpm.read_endorsement_key("rsa")
        other = tpm.read_endorsement_key("ecc")
        stale = dataclasses.replace(ek, public=other.public)

        with pytest.raises(EndorsementKeyError) as raised:
            tpm.create_ak(stale, "ecc")

        assert raised.value.code == "ek-changed"
        assert_nothing_loaded(tpm)


def test_connect_flushes_stale_handles(blank_swtpm: TpmUnderTest) -> None:
    from tpm2_pytss import ESYS_TR

    esapi = blank_swtpm.swtpm.esapi()
    esapi.create_primary(None, "ecc256", ESYS_TR.OWNER)
    esapi.close()

    with blank_swtpm.connect() as tpm:
        assert_nothing_loaded(tpm)


def test_connect_failure_names_esys_initialize() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(TpmError) as raised:
        DeviceTpm.connect(f"swtpm:host=127.0.0.1,port={closed_port}")

    assert raised.value.command == "Esys_Initialize"
    assert raised.value.response_code == 0xA000A
    assert f"port={closed_port}" in raised.value.message
