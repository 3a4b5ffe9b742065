"""swtpm and registrar fixtures for the device tests.

Three kinds of TPM:

- ``provisioned_swtpm``: swtpm_setup state with an RSA-2048 EK (persistent 0x81010001, certificate
  in NV 0x01c00002) and an ECC P-384 EK (0x81010016, NV 0x01c00016), certified by swtpm_localca;
- ``p256_swtpm``: a fresh state whose ECC P-256 EK (made from the TCG template, never persisted)
  has a certificate from ``p256_ek_ca`` in NV 0x01c0000a, padded with 0xFF like real NV indexes;
- ``blank_swtpm``: a fresh state with no EK certificates at all.

swtpm_setup takes about a second, so one provisioned state is made per session and copied.

``running_registrar`` serves the real edgetrust app on a migrated SQLite database in a temporary
directory, on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from tests.support import ekca
from tests.support.swtpm import SwtpmProcess, require_swtpm

pytest.importorskip("tpm2_pytss")

from device.tpm import DeviceTpm  # noqa: E402 - needs tpm2_pytss, checked just above
from evidence.tpm import parse_tpm2b_public  # noqa: E402

os.environ.setdefault("TSS2_LOG", "all+none")

P256_CERTIFICATE_INDEX = 0x01C0000A
NV_SIZE = 1600


@dataclass(frozen=True)
class TpmUnderTest:
    """A running swtpm and copies of the EK certificates that its fixture provisioned."""

    swtpm: SwtpmProcess
    rsa_certificate: bytes | None = None  # DER
    ecc_certificate: bytes | None = None  # DER, P-384 or P-256 depending on the fixture
    ca_bundle: Path | None = None  # directory of PEM CA certificates for the registrar

    @property
    def tcti(self) -> str:
        return self.swtpm.tcti

    def connect(self) -> DeviceTpm:
        return DeviceTpm.connect(self.tcti)


@pytest.fixture(scope="session")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.swtpm_setup import LocalCa, missing_tools

    missing = missing_tools()
    if missing:
        pytest.skip(f"swtpm tools missing: {', '.join(missing)} (Debian package swtpm-tools)")
    return LocalCa.create(tmp_path_factory.mktemp("swtpm-localca"))


@pytest.fixture(scope="session")
def provisioned_state(tmp_path_factory: pytest.TempPathFactory, local_ca: Any) -> Any:
    from tests.support.swtpm_setup import provision_tpm_state

    return provision_tpm_state(tmp_path_factory.mktemp("provisioned"), local_ca)


@pytest.fixture(scope="session")
def localca_bundle(tmp_path_factory: pytest.TempPathFactory, provisioned_state: Any,
                   local_ca: Any) -> Path:
    """PEM bundle of the swtpm_localca root and intermediate."""
    return Path(local_ca.write_bundle(tmp_path_factory.mktemp("localca-bundle")))


@pytest.fixture
def provisioned_swtpm(tmp_path: Path, provisioned_state: Any,
                      localca_bundle: Path) -> Iterator[TpmUnderTest]:
    state_dir = tmp_path / "tpm-state"
    shutil.copytree(provisioned_state.state_dir, state_dir)
    with SwtpmProcess(state_dir) as swtpm:
        yield TpmUnderTest(
            swtpm=swtpm,
            rsa_certificate=provisioned_state.ek_rsa2048_certificate.read_bytes(),
            ecc_certificate=provisioned_state.ek_ecc_p384_certificate.read_bytes(),
            ca_bundle=localca_bundle,
        )


@pytest.fixture
def blank_swtpm(tmp_path: Path) -> Iterator[TpmUnderTest]:
    require_swtpm()
    with SwtpmProcess(tmp_path / "blank-state") as swtpm:
        yield TpmUnderTest(swtpm=swtpm)


@pytest.fixture(scope="session")
def p256_ek_ca() -> ekca.TestCa:
    return ekca.root_ca("edgetrust test P-256 EK CA", "ec-p256")


@pytest.fixture(scope="session")
def p256_ca_bundle(tmp_path_factory: pytest.TempPathFactory, p256_ek_ca: ekca.TestCa) -> Path:
    directory = tmp_path_factory.mktemp("p256-ca-bundle")
    (directory / "p256-ek-ca.pem").write_bytes(p256_ek_ca.pem())
    return directory


@pytest.fixture
def p256_swtpm(tmp_path: Path, p256_ek_ca: ekca.TestCa,
               p256_ca_bundle: Path) -> Iterator[TpmUnderTest]:
    require_swtpm()
    with SwtpmProcess(tmp_path / "p256-state") as swtpm:
        certificate = ekca.der(p256_ek_ca.issue_ek_certificate(template_ek_key(swtpm, "EK-ECC256")))
        store_nv(swtpm, P256_CERTIFICATE_INDEX, ekca.nv_padded(certificate, NV_SIZE))
        yield TpmUnderTest(swtpm=swtpm, ecc_certificate=certificate, ca_bundle=p256_ca_bundle)


def template_ek_key(swtpm: SwtpmProcess, template_name: str) -> Any:
    """Create the EK from a TCG template with plain tpm2-pytss and return its public key."""
    from tpm2_pytss import ESYS_TR
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    esapi = swtpm.esapi()
    try:
        _, template = create_ek_template(template_name, NVReadEK(esapi))
        handle, public, *_ = esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        esapi.flush_context(handle)
        return parse_tpm2b_public(bytes(public.marshal())).public_key
    finally:
        esapi.close()


def store_nv(swtpm: SwtpmProcess, index: int, data: bytes) -> None:
    """Define ``index`` under the platform hierarchy (empty auth on swtpm) and write ``data``
    with the attributes TPM makers give EK certificate indexes."""
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2B_NV_PUBLIC,
        TPMA_NV,
        TPMS_NV_PUBLIC,
    )

    attributes = (TPMA_NV.PPWRITE | TPMA_NV.PPREAD | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD
                  | TPMA_NV.NO_DA | TPMA_NV.PLATFORMCREATE)
    esapi = swtpm.esapi()
    try:
        public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attributes, dataSize=len(data)))
        nv_handle = esapi.nv_define_space(None, public, ESYS_TR.PLATFORM)
        for offset in range(0, len(data), 512):
            esapi.nv_write(nv_handle, data[offset:offset + 512], offset, ESYS_TR.PLATFORM)
    finally:
        esapi.close()


# --- Registrar ------------------------------------------------------------------------------

REGISTRAR_API = "v2.3"


@dataclass(frozen=True)
class RegistrarUnderTest:
    """The edgetrust app serving on 127.0.0.1, with admin look-ups for assertions."""

    url: str
    app: Flask

    def device(self, agent_id: str) -> requests.Response:
        return requests.get(f"{self.url}/{REGISTRAR_API}/agents/{agent_id}", timeout=10)

    def device_ids(self) -> list[str]:
        response = requests.get(f"{self.url}/{REGISTRAR_API}/agents/", timeout=10)
        response.raise_for_status()
        ids: list[str] = response.json()["results"]["uuids"]
        return ids


def build_registrar_app(directory: Path, ca_bundles: list[Path], *,
                        require_ek_certificate: bool = True) -> Flask:
    """Build the edgetrust app on a fresh, migrated SQLite database in ``directory``."""
    from edgetrust.app import create_app
    from edgetrust.db import make_engine, upgrade
    from edgetrust.settings import Settings

    # The registrar rejects an empty CA directory but accepts a missing one.
    ca_dir = directory / "ek-ca"
    if ca_bundles:
        ca_dir.mkdir(parents=True)
    for bundle in ca_bundles:
        for pem_file in bundle.glob("*.pem"):
            shutil.copy(pem_file, ca_dir / f"{bundle.name}-{pem_file.name}")
    settings = Settings(
        data_dir=directory / "server",
        database_url=f"sqlite:///{directory / 'registrar.db'}",
        ek_ca_dir=ca_dir,
        require_ek_certificate=require_ek_certificate,
        api_auth=False,
    )
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    return create_app(settings, engine=engine)


@contextmanager
def serving_on_port(app: Flask, port: int = 0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:``port`` (0 picks a free port) and yield its base URL.

    TODO: move the port parameter into tests/support/server.py, which always picks a free
    port. The registrar-down test must start the server on the port the agent already retries.
    """
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def running_registrar(directory: Path, ca_bundles: list[Path], *, require_ek_certificate: bool = True,
                      port: int = 0,
                      middleware: Callable[[Any], Any] | None = None) -> Iterator[RegistrarUnderTest]:
    """Serve the registrar; ``middleware`` wraps the WSGI app, to inject failures."""
    app = build_registrar_app(directory, ca_bundles, require_ek_certificate=require_ek_certificate)
    if middleware is not None:
        app.wsgi_app = middleware(app.wsgi_app)  # type: ignore[method-assign]
    with serving_on_port(app, port) as url:
        yield RegistrarUnderTest(url=url, app=app)
