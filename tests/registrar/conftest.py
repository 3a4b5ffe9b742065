"""Fixtures for registrar tests: test EK CAs, and the edgetrust app served over real HTTP on
127.0.0.1 with a migrated SQLite or PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, func, select

from edgetrust.app import create_app
from edgetrust.settings import Settings
from registrar.models import RegisteredDevice
from tests.support import ekca
from tests.support.server import serving


@dataclass(frozen=True)
class EkCas:
    """The CAs in the registrar's EK CA bundle, and one CA outside it."""

    issuer: ekca.TestCa  # ECDSA P-256 intermediate under an ECDSA P-256 root
    p384_root: ekca.TestCa  # ECDSA P-384 root that issues directly
    rsa_issuer: ekca.TestCa  # RSA intermediate under an RSA root
    unsorted_rdn_issuer: ekca.TestCa  # subject is one multi-valued RDN (CN, O, C)
    unsorted_rdn_name: x509.Name  # that subject as built, members in CN, O, C order
    untrusted: ekca.TestCa  # not in the bundle
    bundle_dir: Path


@pytest.fixture(scope="session")
def ek_cas(tmp_path_factory: pytest.TempPathFactory) -> EkCas:
    bundle_dir = tmp_path_factory.mktemp("ek-ca")

    root = ekca.root_ca("Test EK Root CA", "ec-p256")
    issuer = root.issue_ca("Test EK Issuing CA", "ec-p256")
    p384_root = ekca.root_ca("Test EK P-384 Root CA", "ec-p384")
    rsa_root = ekca.root_ca("Test EK RSA Root CA", key=ekca.shared_rsa_key("rsa-root"))
    rsa_issuer = rsa_root.issue_ca("Test EK RSA Issuing CA", key=ekca.shared_rsa_key("rsa-issuer"))
    multi_valued = x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "Nuvoton TPM Root CA 2110"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Nuvoton Technology Corporation"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "TW"),
    ])])
    unsorted_rdn_issuer = ekca.root_ca(multi_valued, "ec-p256")
    untrusted = ekca.root_ca("Untrusted EK CA", "ec-p256")

    for name, ca in (("root", root), ("issuer", issuer), ("p384-root", p384_root),
                     ("rsa-root", rsa_root), ("rsa-issuer", rsa_issuer),
                     ("unsorted-rdn-root", unsorted_rdn_issuer)):
        (bundle_dir / f"{name}.pem").write_bytes(ca.pem())

    return EkCas(issuer=issuer, p384_root=p384_root, rsa_issuer=rsa_issuer,
                 unsorted_rdn_issuer=unsorted_rdn_issuer, unsorted_rdn_name=multi_valued,
                 untrusted=untrusted,
                 bundle_dir=bundle_dir)


class Registrar:
    """The registrar API of a running server, and a view of its table."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self.http = requests.Session()

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url + path, timeout=30, **kwargs)

    def register(self, device_id: str, body: Any, version: str = "2.3") -> requests.Response:
        return self.post(f"/v{version}/agents/{device_id}", json=body)

    def activate(self, device_id: str, tag: str, *, via_put: bool = True) -> requests.Response:
        if via_put:
            return self.http.put(f"{self.url}/v2.3/agents/{device_id}", json={"auth_tag": tag},
                                 timeout=30)
        return self.post(f"/v2.1/agents/{device_id}/activate", json={"auth_tag": tag})

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.url + path, timeout=30)

    def delete(self, device_id: str) -> requests.Response:
        return self.http.delete(f"{self.url}/v2.3/agents/{device_id}", timeout=30)

    def row_count(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(RegisteredDevice)).scalar_one()

    def row(self, device_id: str) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(
                select(RegisteredDevice.__table__).where(RegisteredDevice.device_id == device_id)
            ).one_or_none()


def serve_registrar(engine: Engine, settings: Settings) -> Iterator[Registrar]:
    app = create_app(settings, engine=engine)
    with serving(app) as server:
        registrar = Registrar(server.url, engine)
        yield registrar
        registrar.http.close()


@pytest.fixture
def registrar_settings(tmp_path: Path, ek_cas: EkCas, migrated_engine: Engine) -> Settings:
    return Settings(data_dir=tmp_path, ek_ca_dir=ek_cas.bundle_dir,
                    database_url=migrated_engine.url.render_as_string(hide_password=False),
                    api_auth=False)


@pytest.fixture
def registrar(migrated_engine: Engine, registrar_settings: Settings) -> Iterator[Registrar]:
    yield from serve_registrar(migrated_engine, registrar_settings)


def error_of(response: requests.Response) -> dict[str, Any]:
    """Return the ``results.error`` object of a Keylime error envelope."""
    body = response.json()
    assert body["code"] == response.status_code
    error: dict[str, Any] = body["results"]["error"]
    return error
