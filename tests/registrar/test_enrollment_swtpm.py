"""End-to-end enrollment with a real TPM: swtpm provisioned by swtpm_setup with EK certificates
from swtpm_localca, EK and AK created with tpm2-pytss, the credential activated in the TPM."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from edgetrust.settings import Settings
from evidence.credential import parse_credential_file
from evidence.ekcert import load_ek_certificate
from evidence.tpm import parse_tpm2b_public
from registrar.services import ek_public_area_from_certificate
from tests.registrar.conftest import Registrar, serve_registrar
from tests.registrar.helpers import auth_tag, b64
from tests.support import ekca
from tests.support.swtpm import AK_TEMPLATES, AkBlobs, EkHandle, SwtpmProcess, TpmDevice
from tests.support.swtpm_setup import LocalCa, ProvisionedTpm, missing_tools, provision_tpm_state

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

DEVICE_ID = "8c2f5e0a-3b61-4d8e-9f0a-5d1c7e2b9a44"


@dataclass(frozen=True)
class Provisioned:
    tpm: ProvisionedTpm
    bundle_dir: Path  # swtpm_localca's root and intermediate, and test_ca's root
    test_ca: ekca.TestCa  # issues an EK certificate for the P-256 EK, which swtpm_setup lacks


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    missing = missing_tools()
    if missing:
        pytest.skip(f"swtpm tools not installed: {', '.join(missing)} (Debian swtpm, swtpm-tools)")
    pytest.importorskip("tpm2_pytss")
    base = tmp_path_factory.mktemp("swtpm-ek")
    ca = LocalCa.create(base / "localca")
    tpm = provision_tpm_state(base / "tpm", ca)
    bundle_dir = ca.write_bundle(base / "bundle")
    test_ca = ekca.root_ca("Test EK P-256 Root CA", "ec-p256")
    (bundle_dir / "test-root.pem").write_bytes(test_ca.pem())
    return Provisioned(tpm=tpm, bundle_dir=bundle_dir, test_ca=test_ca)


@pytest.fixture
def device(provisioned: Provisioned, tmp_path: Path) -> Iterator[TpmDevice]:
    # Each test starts from a copy of the provisioned state. swtpm stops without
    # TPM2_Shutdown, so a reused state counts a DA failure per stop and soon locks out.
    state_dir = tmp_path / "tpm-state"
    shutil.copytree(provisioned.tpm.state_dir, state_dir)
    with SwtpmProcess(state_dir) as tpm, TpmDevice(tpm) as device:
        yield device


@pytest.fixture
def swtpm_registrar(migrated_engine: Engine, provisioned: Provisioned,
                    tmp_path: Path) -> Iterator[Registrar]:
    settings = Settings(data_dir=tmp_path, ek_ca_dir=provisioned.bundle_dir, api_auth=False)
    yield from serve_registrar(migrated_engine, settings)


@dataclass(frozen=True)
class EkCase:
    template: str  # TCG EK template name in tpm2-pytss (create_ek_template)
    ak_kind: str  # key of tests.support.swtpm.AK_TEMPLATES
    certificate_file: str | None  # attribute of ProvisionedTpm; None: test_ca issues one


EK_CASES = {
    "rsa-2048": EkCase("EK-RSA2048", "rsassa-sha256", "ek_rsa2048_certificate"),
    "ecc-p384": EkCase("EK-HIGH-ECC384", "ecdsa-sha256", "ek_ecc_p384_certificate"),
    "ecc-p256": EkCase("EK-ECC256", "ecdsa-sha256", None),
}


def is_high_range(ek: EkCase) -> bool:
    return ek.template.startswith("EK-HIGH-")


def create_keys(device: TpmDevice, case: EkCase) -> tuple[EkHandle, Any]:
    """Create the EK and an AK under it.

    High-range EKs (userWithAuth set) authorize with their empty password, because
    ``TpmDevice`` only builds the low-range EK policy session (PolicySecret, SHA-256).
    """
    ek = device.create_ek(case.template)
    if not is_high_range(case):
        return ek, device.create_ak(ek, case.ak_kind)
    t = device.t
    attributes = (
        t.TPMA_OBJECT.RESTRICTED | t.TPMA_OBJECT.SIGN_ENCRYPT | t.TPMA_OBJECT.FIXEDTPM
        | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | t.TPMA_OBJECT.USERWITHAUTH
    )
    template = t.TPM2B_PUBLIC.parse(AK_TEMPLATES[case.ak_kind], objectAttributes=attributes)
    private, public, *_ = device.esapi.create(ek.handle, None, template)
    return ek, AkBlobs(private, public)


def activate_in_tpm(device: TpmDevice, case: EkCase, ek: EkHandle, ak: Any, blob: bytes) -> bytes:
    """Run TPM2_ActivateCredential in swtpm and return the released secret."""
    if not is_high_range(case):
        with device.loaded(ek, ak) as ak_handle:
            return device.activate_credential(ek, ak_handle, blob)
    t = device.t
    ak_handle = device.esapi.load(ek.handle, ak.private, ak.public)
    try:
        credential = parse_credential_file(blob)
        secret = device.esapi.activate_credential(
            ak_handle, ek.handle,
            t.TPM2B_ID_OBJECT(credential=credential.id_object),
            t.TPM2B_ENCRYPTED_SECRET(secret=credential.encrypted_secret),
        )
    finally:
        device.esapi.flush_context(ak_handle)
    return bytes(secret)


def ek_certificate(provisioned: Provisioned, case: EkCase, ek: EkHandle) -> bytes:
    if case.certificate_file is not None:
        path: Path = getattr(provisioned.tpm, case.certificate_file)
        return path.read_bytes()
    ek_key = parse_tpm2b_public(ek.public_bytes).public_key
    return ekca.der(provisioned.test_ca.issue_ek_certificate(ek_key))


def enroll_with_tpm(registrar: Registrar, device: TpmDevice, case: EkCase, ek: EkHandle, ak: Any,
                    body: dict[str, Any]) -> None:
    """Register, activate the blob in the TPM, send the auth_tag; assert each step succeeds."""
    response = registrar.register(DEVICE_ID, body)
    assert response.status_code == 200, response.text
    blob = base64.b64decode(response.json()["results"]["blob"])

    secret = activate_in_tpm(device, case, ek, ak, blob)

    assert len(secret) == 32
    assert secret.isalnum()
    response = registrar.activate(DEVICE_ID, auth_tag(secret, DEVICE_ID))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("ek_case", sorted(EK_CASES))
def test_enrollment_with_swtpm(swtpm_registrar: Registrar, device: TpmDevice,
                               provisioned: Provisioned, ek_case: str) -> None:
    case = EK_CASES[ek_case]
    ek, ak = create_keys(device, case)
    ekcert = ek_certificate(provisioned, case, ek)

    enroll_with_tpm(swtpm_registrar, device, case, ek, ak, {
        "ek_tpm": b64(ek.public_bytes),
        "ekcert": b64(ekcert),
        "aik_tpm": b64(ak.public_bytes),
        "ip": "127.0.0.1",
        "port": 9002,
        "mtls_cert": "disabled",
    })

    listed = swtpm_registrar.get("/v2.3/agents/").json()["results"]["uuids"]
    assert listed == [DEVICE_ID]
    served = swtpm_registrar.get(f"/v2.3/agents/{DEVICE_ID}").json()["results"]
    assert served["aik_tpm"] == b64(ak.public_bytes)
    assert served["ek_tpm"] == b64(ek.public_bytes)
    assert served["ekcert"] == b64(load_ek_certificate(ekcert).der)
    assert (served["ip"], served["port"], served["regcount"]) == ("127.0.0.1", 9002, 1)
    row = swtpm_registrar.row(DEVICE_ID)
    assert row.active is True
    assert row.challenge_secret is None


@pytest.mark.parametrize("ek_case", sorted(EK_CASES))
def test_enrollment_with_ekcert_only(swtpm_registrar: Registrar, device: TpmDevice,
                                     provisioned: Provisioned, ek_case: str) -> None:
    case = EK_CASES[ek_case]
    ek, ak = create_keys(device, case)
    ekcert = ek_certificate(provisioned, case, ek)

    enroll_with_tpm(swtpm_registrar, device, case, ek, ak, {
        "ekcert": b64(ekcert), "aik_tpm": b64(ak.public_bytes),
    })

    assert swtpm_registrar.row(DEVICE_ID).active is True


@pytest.mark.parametrize("ek_case", sorted(EK_CASES))
def test_template_from_certificate_matches_tpm(device: TpmDevice, provisioned: Provisioned,
                                               ek_case: str) -> None:
    case = EK_CASES[ek_case]
    ek = device.create_ek(case.template)
    ekcert = load_ek_certificate(ek_certificate(provisioned, case, ek))

    derived = ek_public_area_from_certificate(ekcert)

    assert derived.to_tpm2b() == ek.public_bytes
    assert derived.name == parse_tpm2b_public(ek.public_bytes).name


def test_takeover_with_other_tpm_rejected(swtpm_registrar: Registrar, device: TpmDevice,
                                          provisioned: Provisioned) -> None:
    case = EK_CASES["rsa-2048"]
    ek, ak = create_keys(device, case)
    ekcert = ek_certificate(provisioned, case, ek)
    body = {"ek_tpm": b64(ek.public_bytes), "ekcert": b64(ekcert), "aik_tpm": b64(ak.public_bytes)}
    enroll_with_tpm(swtpm_registrar, device, case, ek, ak, body)
    new_ak = device.create_ak(ek, "ecdsa-sha256")

    response = swtpm_registrar.register(DEVICE_ID, {**body, "aik_tpm": b64(new_ak.public_bytes)})

    assert response.status_code == 403
    assert response.json()["results"]["error"]["code"] == "identity-mismatch"
    assert swtpm_registrar.row(DEVICE_ID).aik_tpm == ak.public_bytes
