"""Tests for evidence.ekcert: EK certificate parsing, CA bundles and chain verification.

Inputs are made here with the test CAs in tests/support/ekca.py, and real EK certificates come
from swtpm_setup + swtpm_localca (tests/support/swtpm_setup.py) and from a running swtpm.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.ekcert import (
    EkCertificate,
    TrustStore,
    load_ek_certificate,
    verify_ek_certificate,
)
from evidence.errors import EvidenceError, ParseError, TrustStoreError, VerificationError
from evidence.tpm import parse_tpm2b_public
from tests.support import ekca
from tests.support.ekca import NOW, ONE_DAY, TestCa
from tests.support.swtpm import SwtpmProcess, TpmDevice
from tests.support.swtpm_setup import LocalCa, ProvisionedTpm, missing_tools, provision_tpm_state

NUVOTON_ISSUER = x509.Name(
    [
        x509.RelativeDistinguishedName(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "Nuvoton TPM Root CA 2111"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Nuvoton Technology Corporation"),
                x509.NameAttribute(NameOID.COUNTRY_NAME, "TW"),
            ]
        )
    ]
)


def store_of(*cas: TestCa) -> TrustStore:
    return TrustStore(load_ek_certificate(ca.pem()) for ca in cas)


def ek_key(kind: ekca.KeyKind = "ec-p256") -> ekca.PrivateKey:
    if kind == "rsa-2048":
        return ekca.shared_rsa_key("ek")
    return ekca.generate_key(kind)


def verify_error(
    cert: EkCertificate, store: TrustStore, key: ekca.PublicKey, code: str, **kwargs: object
) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        verify_ek_certificate(cert, store, key, **kwargs)  # type: ignore[arg-type]
    assert caught.value.code == code, caught.value.message
    return caught.value


@pytest.fixture(scope="module")
def root() -> TestCa:
    return ekca.root_ca("Test EK Root CA", "ec-p384")


@pytest.fixture(scope="module")
def intermediate(root: TestCa) -> TestCa:
    return root.issue_ca("Test EK Intermediate CA", "ec-p256")


# --- Loading ---------------------------------------------------------------------------------------


def test_load_der_and_pem_agree(root: TestCa) -> None:
    certificate = root.issue_ek_certificate(ek_key().public_key())

    from_der = load_ek_certificate(ekca.der(certificate))
    from_pem = load_ek_certificate(ekca.pem(certificate))

    assert from_der.der == ekca.der(certificate)
    assert from_pem.der == from_der.der
    assert from_pem.tbs == certificate.tbs_certificate_bytes
    assert from_der.serial_number == certificate.serial_number
    assert from_der.not_before == certificate.not_valid_before_utc
    assert from_der.not_after == certificate.not_valid_after_utc
    assert from_der.issuer == certificate.issuer.rfc4514_string()


def test_load_cuts_nv_padding() -> None:
    root = ekca.root_ca("Padding Root", "ec-p256")
    certificate_der = ekca.der(root.issue_ek_certificate(ek_key().public_key()))
    unverified = ekca.nv_padded(certificate_der, 1600)
    assert len(unverified) == 1600

    cert = load_ek_certificate(unverified)

    assert cert.der == certificate_der
    assert cert.certificate is not None
    assert verify_ek_certificate(cert, store_of(root), cert.public_key) == ["", "CN=Padding Root"]


def test_load_rejects_padding_other_than_ff(root: TestCa) -> None:
    certificate_der = ekca.der(root.issue_ek_certificate(ek_key().public_key()))

    with pytest.raises(ParseError, match="not all 0xFF NV padding") as caught:
        load_ek_certificate(certificate_der + b"\xff" * 10 + b"\x00")

    assert caught.value.code == "ek-certificate-malformed"


@pytest.mark.parametrize(
    ("unverified", "expected_message"),
    [
        (b"", "input is empty"),
        (b"hello world", "starts with byte 0x68"),
        (b"\x30\x82\x05\x00" + b"\x00" * 10, "declares 1280 content bytes, only 10 remain"),
        (b"\x30\x80\x00\x00", "indefinite length"),
        (b"\x30\x81\x05" + b"\x00" * 5, "not in minimal DER form"),
        (b"\x30\x03\x02\x01\x01", "tbsCertificate"),
        (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "not valid base64"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "expected one CERTIFICATE"),
        (b"\x30" + b"\xff" * 70000, "expected at most 65536"),
    ],
    ids=[
        "empty",
        "text",
        "truncated",
        "indefinite-length",
        "non-minimal-length",
        "not-a-certificate",
        "bad-base64",
        "wrong-pem-label",
        "oversized",
    ],
)
def test_load_rejects_garbage(unverified: bytes, expected_message: str) -> None:
    with pytest.raises(ParseError) as caught:
        load_ek_certificate(unverified)

    assert caught.value.code == "ek-certificate-malformed"
    assert expected_message in caught.value.message


def test_load_rejects_two_pem_certificates(root: TestCa) -> None:
    two = root.pem() + root.pem()

    with pytest.raises(ParseError, match=r"blocks \['CERTIFICATE', 'CERTIFICATE'\]") as caught:
        load_ek_certificate(two)

    assert caught.value.code == "ek-certificate-malformed"


# --- Unsorted RDN SET (Nuvoton) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nuvoton_root() -> TestCa:
    return ekca.root_ca(NUVOTON_ISSUER, "ec-p384")


@pytest.fixture(scope="module")
def unsorted_ek(nuvoton_root: TestCa) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = nuvoton_root.issue_ek_certificate(key.public_key())
    return ekca.with_unsorted_rdns(certificate, nuvoton_root, NUVOTON_ISSUER), key


def test_unsorted_rdn_rejected_by_cryptography(
    unsorted_ek: tuple[bytes, ec.EllipticCurvePrivateKey],
) -> None:
    unsorted_der, _ = unsorted_ek

    with pytest.raises(ValueError, match="InvalidSetOrdering"):
        x509.load_der_x509_certificate(unsorted_der)


def test_unsorted_rdn_issuer_verifies(
    nuvoton_root: TestCa, unsorted_ek: tuple[bytes, ec.EllipticCurvePrivateKey]
) -> None:
    unsorted_der, key = unsorted_ek

    cert = load_ek_certificate(unsorted_der)
    chain = verify_ek_certificate(cert, store_of(nuvoton_root), key.public_key())

    assert cert.certificate is None
    assert cert.der == unsorted_der
    # Printed in the encoded (unsorted) order: CN, O, C.
    assert cert.issuer == "CN=Nuvoton TPM Root CA 2111+O=Nuvoton Technology Corporation+C=TW"
    assert cert.issuer_name.der != nuvoton_root.certificate.subject.public_bytes()
    assert chain == ["", nuvoton_root.certificate.subject.rfc4514_string()]


def test_unsorted_rdn_tampered_tbs_fails(
    nuvoton_root: TestCa, unsorted_ek: tuple[bytes, ec.EllipticCurvePrivateKey]
) -> None:
    unsorted_der, key = unsorted_ek
    tampered = ekca.replace_in_tbs(unsorted_der, b"NPCT75x", b"NPCT76x")

    cert = load_ek_certificate(tampered)

    assert cert.tpm_model == "NPCT76x"
    verify_error(cert, store_of(nuvoton_root), key.public_key(), "ek-certificate-signature-invalid")


def test_unsorted_rdn_ca_subject_matches(nuvoton_root: TestCa) -> None:
    """A CA whose own subject is unsorted anchors an EK certificate whose issuer is sorted.

    The names differ in their bytes, so they match only by normalized value.
    """
    unsorted_root_der = ekca.with_unsorted_rdns(nuvoton_root.certificate, nuvoton_root, NUVOTON_ISSUER)
    unsorted_root = load_ek_certificate(unsorted_root_der)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = load_ek_certificate(ekca.der(nuvoton_root.issue_ek_certificate(key.public_key())))

    chain = verify_ek_certificate(cert, TrustStore([unsorted_root]), key.public_key())

    assert unsorted_root.certificate is None
    assert unsorted_root.subject_name.der != cert.issuer_name.der
    assert chain == ["", "CN=Nuvoton TPM Root CA 2111+O=Nuvoton Technology Corporation+C=TW"]


def test_name_cryptography_cannot_read_still_loads(root: TestCa) -> None:
    """A CN holding a BIT STRING makes ``cryptography`` raise TypeError, and it prints as hex."""
    key = ek_key()
    unique_id = x509.NameAttribute(
        NameOID.X500_UNIQUE_IDENTIFIER, b"\x00\x01", _type=x509.name._ASN1Type.BitString
    )
    certificate = root.issue_ek_certificate(key.public_key(), subject=x509.Name([unique_id]))
    # Same length OID swap: x500UniqueIdentifier (2.5.4.45) becomes commonName (2.5.4.3).
    odd_der = ekca.with_tbs_replacement(
        certificate, root, bytes.fromhex("060355042d"), bytes.fromhex("0603550403")
    )

    cert = load_ek_certificate(odd_der)

    assert cert.certificate is None
    assert cert.subject == "CN=#03020001"
    assert verify_ek_certificate(cert, store_of(root), key.public_key())[0] == "CN=#03020001"


def test_negative_serial_number_loads(root: TestCa) -> None:
    key = ek_key()
    certificate = root.issue_ek_certificate(key.public_key())
    serial = ekca.encode_tlv(0x02, certificate.serial_number.to_bytes(20, "big", signed=True))
    negative = ekca.encode_tlv(0x02, b"\xff" + serial[3:])

    cert = load_ek_certificate(ekca.with_tbs_replacement(certificate, root, serial, negative))

    assert cert.serial_number < 0
    assert cert.certificate is None
    assert verify_ek_certificate(cert, store_of(root), key.public_key()) == ["", "CN=Test EK Root CA"]


# --- TPM EK profile and extensions -----------------------------------------------------------------


def test_tpm_ek_profile_accepted(root: TestCa) -> None:
    key = ek_key("rsa-2048")
    certificate = root.issue_ek_certificate(
        key.public_key(),
        directory_name=ekca.tpm_directory_name("id:49465800", "SLB9670", "id:00070055"),
    )

    cert = load_ek_certificate(ekca.der(certificate))
    chain = verify_ek_certificate(cert, store_of(root), key.public_key())

    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert cert.subject == ""
    assert cert.tpm_manufacturer == "id:49465800"
    assert cert.tpm_model == "SLB9670"
    assert cert.tpm_version == "id:00070055"
    assert cert.extensions.extended_key_usage == ("2.23.133.8.1",)
    assert cert.extensions.key_usage == frozenset({"keyEncipherment"})
    assert chain == ["", "CN=Test EK Root CA"]


def test_tpm_attributes_in_one_rdn(root: TestCa) -> None:
    key = ek_key()
    directory_name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(ekca.OID_TPM_MANUFACTURER, "id:4E544300"),
                    x509.NameAttribute(ekca.OID_TPM_MODEL, "NPCT75x"),
                    x509.NameAttribute(ekca.OID_TPM_VERSION, "id:00070002"),
                ]
            )
        ]
    )

    cert = load_ek_certificate(
        ekca.der(root.issue_ek_certificate(key.public_key(), directory_name=directory_name))
    )

    assert (cert.tpm_manufacturer, cert.tpm_model, cert.tpm_version) == (
        "id:4E544300",
        "NPCT75x",
        "id:00070002",
    )


def test_unknown_critical_extension_rejected(root: TestCa) -> None:
    key = ek_key()
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    certificate = root.issue_ek_certificate(key.public_key(), extra_extensions=[(unknown, True)])

    cert = load_ek_certificate(ekca.der(certificate))
    error = verify_error(cert, store_of(root), key.public_key(), "ek-certificate-extension-unsupported")

    assert "1.3.6.1.4.1.99999.1" in error.message
    assert "empty subject" in error.message


def test_unknown_noncritical_extension_accepted(root: TestCa) -> None:
    key = ek_key()
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    certificate = root.issue_ek_certificate(key.public_key(), extra_extensions=[(unknown, False)])

    cert = load_ek_certificate(ekca.der(certificate))

    assert verify_ek_certificate(cert, store_of(root), key.public_key()) == ["", "CN=Test EK Root CA"]


def test_critical_name_constraints_on_ca_rejected(root: TestCa) -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
    )
    constrained = root.issue_ca("Constrained CA", extra_extensions=[(constraints, True)])
    key = ek_key()
    cert = load_ek_certificate(ekca.der(constrained.issue_ek_certificate(key.public_key())))

    error = verify_error(
        cert, store_of(root, constrained), key.public_key(), "ek-certificate-extension-unsupported"
    )

    assert "CN=Constrained CA" in error.message
    assert "2.5.29.30" in error.message


# --- CA key types -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ca_kind", ["ec-p256", "ec-p384"])
@pytest.mark.parametrize("ek_kind", ["rsa-2048", "ec-p256", "ec-p384"])
def test_ecdsa_ca_chain_verifies(ca_kind: ekca.KeyKind, ek_kind: ekca.KeyKind) -> None:
    root = ekca.root_ca(f"ECDSA {ca_kind} Root", ca_kind)
    key = ek_key(ek_kind)

    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(key.public_key())))
    chain = verify_ek_certificate(cert, store_of(root), key.public_key())

    assert chain == ["", f"CN=ECDSA {ca_kind} Root"]


def test_rsa_ca_chain_verifies() -> None:
    root = ekca.root_ca("RSA Root", key=ekca.shared_rsa_key("root"))
    key = ek_key("rsa-2048")

    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(key.public_key())))

    assert cert.signature_algorithm.oid == "1.2.840.113549.1.1.11"
    assert verify_ek_certificate(cert, store_of(root), key.public_key()) == ["", "CN=RSA Root"]


def test_rsa_pss_ca_chain_verifies() -> None:
    root = ekca.root_ca("RSA-PSS Root", key=ekca.shared_rsa_key("root"), use_pss=True)
    key = ek_key()

    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(key.public_key())))

    assert cert.signature_algorithm.oid == "1.2.840.113549.1.1.10"
    assert cert.signature_algorithm.scheme is not None
    assert cert.signature_algorithm.scheme.salt_length == 32
    assert verify_ek_certificate(cert, store_of(root), key.public_key()) == ["", "CN=RSA-PSS Root"]


def test_sha1_signature_unsupported() -> None:
    root = ekca.root_ca("SHA-1 Root", key=ekca.shared_rsa_key("root"))
    key = ek_key()
    certificate = root.issue_ek_certificate(key.public_key())

    cert = load_ek_certificate(ekca.with_sha1_signature(certificate, root))
    error = verify_error(cert, store_of(root), key.public_key(), "ek-certificate-algorithm-unsupported")

    assert "1.2.840.113549.1.1.5" in error.message


def test_issuer_key_type_mismatch_rejected() -> None:
    """An RSA-signed certificate that names a CA whose key is ECDSA does not verify."""
    rsa_root = ekca.root_ca("Same Name Root", key=ekca.shared_rsa_key("root"))
    ec_root = ekca.root_ca("Same Name Root", "ec-p256")
    key = ek_key()
    cert = load_ek_certificate(ekca.der(rsa_root.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(ec_root), key.public_key(), "ek-certificate-signature-invalid")

    assert "pkcs1v15" in error.message


# --- Paths through intermediates -------------------------------------------------------------------


def test_intermediate_chain_verifies(root: TestCa, intermediate: TestCa) -> None:
    key = ek_key()
    cert = load_ek_certificate(ekca.der(intermediate.issue_ek_certificate(key.public_key())))

    chain = verify_ek_certificate(cert, store_of(root, intermediate), key.public_key())

    assert chain == ["", "CN=Test EK Intermediate CA", "CN=Test EK Root CA"]


def test_intermediate_without_root_untrusted(intermediate: TestCa) -> None:
    key = ek_key()
    cert = load_ek_certificate(ekca.der(intermediate.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(intermediate), key.public_key(), "ek-certificate-untrusted")

    assert "issuer 'CN=Test EK Root CA'" in error.message


def test_untrusted_ca_rejected(root: TestCa) -> None:
    other_root = ekca.root_ca("Other Vendor Root", "ec-p256")
    key = ek_key()
    cert = load_ek_certificate(ekca.der(other_root.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(root), key.public_key(), "ek-certificate-untrusted")

    assert "issuer 'CN=Other Vendor Root'" in error.message
    assert "not found in the EK CA bundle" in error.message


def test_same_name_wrong_key_signature_invalid(root: TestCa) -> None:
    impostor = ekca.root_ca("Test EK Root CA", "ec-p384")
    key = ek_key()
    cert = load_ek_certificate(ekca.der(impostor.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(root), key.public_key(), "ek-certificate-signature-invalid")

    assert "CA certificate 'CN=Test EK Root CA'" in error.message


def test_same_name_second_candidate_verifies(root: TestCa) -> None:
    """Two CAs share a name after a key rollover, and the one whose key verifies is chosen."""
    rolled_over = ekca.root_ca("Test EK Root CA", "ec-p256")
    key = ek_key()
    cert = load_ek_certificate(ekca.der(rolled_over.issue_ek_certificate(key.public_key())))

    chain = verify_ek_certificate(cert, store_of(root, rolled_over), key.public_key())

    assert chain == ["", "CN=Test EK Root CA"]


def test_non_ca_intermediate_rejected(root: TestCa) -> None:
    not_a_ca = root.issue_ca(
        "Leaf Posing As CA", basic_constraints=x509.BasicConstraints(ca=False, path_length=None)
    )
    key = ek_key()
    cert = load_ek_certificate(ekca.der(not_a_ca.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(root, not_a_ca), key.public_key(), "ek-certificate-untrusted")

    assert "issuer certificate 'CN=Leaf Posing As CA'" in error.message
    assert "basicConstraints cA is absent or false, expected true" in error.message


def test_ca_certificate_as_ek_certificate_rejected(root: TestCa) -> None:
    """A CA certificate from the bundle, presented with its own key as the EK, is rejected."""
    cert = load_ek_certificate(root.pem())

    error = verify_error(cert, store_of(root), root.key.public_key(), "ek-certificate-untrusted")

    assert "basicConstraints cA true, expected an end-entity certificate" in error.message


def test_intermediate_without_key_cert_sign_rejected(root: TestCa) -> None:
    signing_only = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    intermediate = root.issue_ca("No CertSign CA", key_usage=signing_only)
    key = ek_key()
    cert = load_ek_certificate(ekca.der(intermediate.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(root, intermediate), key.public_key(), "ek-certificate-untrusted")

    assert "expected keyCertSign" in error.message


def test_path_length_constraint_enforced(root: TestCa) -> None:
    no_sub_cas = root.issue_ca(
        "Path Length Zero CA", basic_constraints=x509.BasicConstraints(ca=True, path_length=0)
    )
    sub_ca = no_sub_cas.issue_ca("Sub CA")
    key = ek_key()
    cert = load_ek_certificate(ekca.der(sub_ca.issue_ek_certificate(key.public_key())))

    error = verify_error(
        cert, store_of(root, no_sub_cas, sub_ca), key.public_key(), "ek-certificate-untrusted"
    )

    assert "allows 0 intermediate CAs below it, got 1" in error.message


# --- Key match and validity -------------------------------------------------------------------------


def test_key_mismatch_rejected(root: TestCa) -> None:
    certified_key = ek_key()
    presented_key = ek_key()
    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(certified_key.public_key())))

    error = verify_error(cert, store_of(root), presented_key.public_key(), "ek-certificate-key-mismatch")

    assert "expected the EK presented" in error.message
    assert "EC secp256r1 key" in error.message


def test_key_type_mismatch_rejected(root: TestCa) -> None:
    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(ek_key("ec-p256").public_key())))

    error = verify_error(cert, store_of(root), ek_key("rsa-2048").public_key(), "ek-certificate-key-mismatch")

    assert "RSA-2048 key" in error.message


def test_expired_ek_certificate_rejected(root: TestCa) -> None:
    key = ek_key()
    certificate = root.issue_ek_certificate(
        key.public_key(), not_before=NOW - 20 * ONE_DAY, not_after=NOW - 10 * ONE_DAY
    )
    cert = load_ek_certificate(ekca.der(certificate))

    error = verify_error(cert, store_of(root), key.public_key(), "ek-certificate-expired")

    assert "expired at" in error.message
    assert "checked at" in error.message


def test_not_yet_valid_ek_certificate_rejected(root: TestCa) -> None:
    key = ek_key()
    certificate = root.issue_ek_certificate(key.public_key(), not_before=NOW + 10 * ONE_DAY)
    cert = load_ek_certificate(ekca.der(certificate))

    verify_error(cert, store_of(root), key.public_key(), "ek-certificate-not-yet-valid")


def test_validity_checked_at_given_time() -> None:
    root = ekca.root_ca("Old Root", not_before=NOW - 100 * ONE_DAY)
    key = ek_key()
    certificate = root.issue_ek_certificate(
        key.public_key(), not_before=NOW - 20 * ONE_DAY, not_after=NOW - 10 * ONE_DAY
    )
    cert = load_ek_certificate(ekca.der(certificate))

    chain = verify_ek_certificate(cert, store_of(root), key.public_key(), at=NOW - 15 * ONE_DAY)

    assert chain == ["", "CN=Old Root"]


def test_expired_intermediate_rejected(root: TestCa) -> None:
    expired = root.issue_ca("Expired CA", not_before=NOW - 20 * ONE_DAY, not_after=NOW - ONE_DAY)
    key = ek_key()
    cert = load_ek_certificate(ekca.der(expired.issue_ek_certificate(key.public_key())))

    error = verify_error(cert, store_of(root, expired), key.public_key(), "ek-certificate-expired")

    assert "CA certificate 'CN=Expired CA' expired at" in error.message


def test_naive_time_rejected(root: TestCa) -> None:
    key = ek_key()
    cert = load_ek_certificate(ekca.der(root.issue_ek_certificate(key.public_key())))

    with pytest.raises(ValueError, match="timezone-aware"):
        verify_ek_certificate(cert, store_of(root), key.public_key(), at=dt.datetime(2030, 1, 1))


# --- Trust store -------------------------------------------------------------------------------------


def test_trust_store_loads_directory(tmp_path: Path, root: TestCa, intermediate: TestCa) -> None:
    (tmp_path / "root.pem").write_bytes(root.pem())
    (tmp_path / "intermediate.crt").write_bytes(intermediate.pem())
    (tmp_path / ".hidden").write_bytes(b"ignored")

    store = TrustStore.from_directory(tmp_path)

    assert [cert.subject for cert in store.certificates] == [
        "CN=Test EK Intermediate CA",
        "CN=Test EK Root CA",
    ]
    assert [cert.subject for cert in store.anchors] == ["CN=Test EK Root CA"]


def test_trust_store_file_with_two_certificates(tmp_path: Path, root: TestCa, intermediate: TestCa) -> None:
    (tmp_path / "bundle.pem").write_bytes(root.pem() + b"\n" + intermediate.pem())
    key = ek_key()
    cert = load_ek_certificate(ekca.der(intermediate.issue_ek_certificate(key.public_key())))

    store = TrustStore.from_directory(tmp_path)

    assert len(store.certificates) == 2
    assert len(verify_ek_certificate(cert, store, key.public_key())) == 3


@pytest.mark.parametrize(
    ("content", "expected_message"),
    [
        (b"not a certificate\n", "contains no PEM block"),
        (
            b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "certificate 1: EK certificate is malformed",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n",
            "not valid base64",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "PEM block 1 is PRIVATE KEY, expected CERTIFICATE",
        ),
    ],
    ids=["text", "truncated-der", "bad-base64", "private-key"],
)
def test_trust_store_bad_file_named(
    tmp_path: Path, root: TestCa, content: bytes, expected_message: str
) -> None:
    (tmp_path / "a-root.pem").write_bytes(root.pem())
    (tmp_path / "broken.pem").write_bytes(content)

    with pytest.raises(TrustStoreError) as caught:
        TrustStore.from_directory(tmp_path)

    assert caught.value.code == "trust-store-invalid"
    assert str(tmp_path / "broken.pem") in caught.value.message
    assert expected_message in caught.value.message


def test_trust_store_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(TrustStoreError, match="contains no certificates"):
        TrustStore.from_directory(tmp_path)


def test_trust_store_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TrustStoreError, match="is not a directory"):
        TrustStore.from_directory(tmp_path / "absent")


# --- Real EK certificates from swtpm_setup + swtpm_localca -------------------------------------------


def _require_swtpm_tools() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"swtpm tools not installed: {', '.join(missing)}")


@pytest.fixture(scope="session")
def provisioned_tpm(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedTpm:
    """A swtpm state made once per session; creating the local CA is the slow part."""
    _require_swtpm_tools()
    ca = LocalCa.create(tmp_path_factory.mktemp("swtpm-localca"))
    return provision_tpm_state(tmp_path_factory.mktemp("swtpm-device"), ca)


@pytest.fixture(scope="session")
def localca_store(provisioned_tpm: ProvisionedTpm, tmp_path_factory: pytest.TempPathFactory) -> TrustStore:
    bundle = tmp_path_factory.mktemp("ek-ca-bundle")
    (bundle / "root.pem").write_bytes(provisioned_tpm.root_certificate.read_bytes())
    (bundle / "intermediate.pem").write_bytes(provisioned_tpm.intermediate_certificate.read_bytes())
    return TrustStore.from_directory(bundle)


@pytest.fixture
def swtpm(provisioned_tpm: ProvisionedTpm) -> Iterator[SwtpmProcess]:
    with SwtpmProcess(provisioned_tpm.state_dir) as tpm:
        yield tpm


@pytest.mark.swtpm
@pytest.mark.parametrize(
    ("certificate_file", "tpm_ek_type"),
    [("ek_rsa2048_certificate", "EK-RSA2048"), ("ek_ecc_p384_certificate", "EK-HIGH-ECC384")],
    ids=["rsa2048", "ecc-p384"],
)
def test_swtpm_ek_certificate_verifies(
    provisioned_tpm: ProvisionedTpm,
    localca_store: TrustStore,
    swtpm: SwtpmProcess,
    certificate_file: str,
    tpm_ek_type: str,
) -> None:
    pytest.importorskip("tpm2_pytss")
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    certificate_der = getattr(provisioned_tpm, certificate_file).read_bytes()
    with TpmDevice(swtpm) as device:
        nv_certificate, _ = create_ek_template(tpm_ek_type, NVReadEK(device.esapi))
        ek = device.create_ek(tpm_ek_type)
        device.esapi.flush_context(ek.handle)
    ek_public_key = parse_tpm2b_public(ek.public_bytes).public_key

    cert = load_ek_certificate(certificate_der)
    chain = verify_ek_certificate(cert, localca_store, ek_public_key)

    assert nv_certificate == certificate_der
    assert chain == ["CN=unknown", "CN=swtpm-localca", "CN=swtpm-localca-rootca"]
    assert cert.tpm_manufacturer == "id:00001014"
    assert cert.tpm_model == "swtpm"
    assert cert.certificate is not None


@pytest.mark.swtpm
def test_swtpm_ek_certificate_rejects_other_ek(
    provisioned_tpm: ProvisionedTpm, localca_store: TrustStore
) -> None:
    rsa_cert = load_ek_certificate(provisioned_tpm.ek_rsa2048_certificate.read_bytes())
    ecc_cert = load_ek_certificate(provisioned_tpm.ek_ecc_p384_certificate.read_bytes())

    verify_error(rsa_cert, localca_store, ecc_cert.public_key, "ek-certificate-key-mismatch")


@pytest.mark.swtpm
def test_swtpm_ek_certificate_needs_intermediate(provisioned_tpm: ProvisionedTpm) -> None:
    store = TrustStore([load_ek_certificate(provisioned_tpm.root_certificate.read_bytes())])
    cert = load_ek_certificate(provisioned_tpm.ek_rsa2048_certificate.read_bytes())

    error = verify_error(cert, store, cert.public_key, "ek-certificate-untrusted")

    assert "issuer 'CN=swtpm-localca'" in error.message


# --- Property tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seed() -> tuple[bytes, TrustStore, ekca.PublicKey]:
    root = ekca.root_ca(NUVOTON_ISSUER, "ec-p256")
    key = ec.generate_private_key(ec.SECP256R1())
    seed = ekca.with_unsorted_rdns(root.issue_ek_certificate(key.public_key()), root, NUVOTON_ISSUER)
    return seed, store_of(root), key.public_key()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_evidence_errors(unverified: bytes) -> None:
    try:
        load_ek_certificate(unverified)
    except EvidenceError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_certificate_raises_only_evidence_errors(
    fuzz_seed: tuple[bytes, TrustStore, ekca.PublicKey], data: st.DataObject
) -> None:
    seed, store, key = fuzz_seed
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        action = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate"]), label="action")
        if action == "replace":
            mutated[position] = data.draw(st.integers(0, 255), label="byte")
        elif action == "delete":
            del mutated[position]
        elif action == "insert":
            mutated.insert(position, data.draw(st.integers(0, 255), label="byte"))
        else:
            del mutated[position:]
        if not mutated:
            break

    try:
        cert = load_ek_certificate(bytes(mutated))
        verify_ek_certificate(cert, store, key)
    except EvidenceError:
        pass
