"""A real OCI registry for tests: Debian's Docker distribution registry on 127.0.0.1, images
pushed into it, and cosign signatures of both formats made with keys the tests generate.

The registry (``/usr/bin/docker-registry serve``) keeps its blobs in a temporary directory,
has no authentication, and writes an access log line per request, which ``requests_for``
counts. It has no referrers API, so bundle signatures are listed in the referrers tag schema's
index (tag ``sha256-<hex>``), as cosign does on such registries.

Also here: ``HangingServer``, a TCP server that accepts connections and never responds, and
``closed_port``, a port with nothing listening.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/\S*) HTTP/[0-9.]+" (\d{3})')
_CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def registry_available() -> bool:
    return os.access(REGISTRY_BINARY, os.X_OK)


# --- keys -------------------------------------------------------------------------------------


def generate_key(kind: str = "ecdsa-p256") -> PrivateKey:
    """Return a new private key of ``kind``: ecdsa-p256, ecdsa-p384, rsa or ed25519."""
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def public_pem(key: PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(key: PrivateKey, message: bytes) -> bytes:
    """Sign as cosign does: ECDSA with SHA-256 (DER), RSA PKCS #1 v1.5 SHA-256, or Ed25519."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(message)


def self_signed_certificate(key: PrivateKey) -> bytes:
    """Return a DER certificate for ``key``, valid for a day, issued by itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust tests")])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def policy_document(keys: Mapping[str, PrivateKey],
                    rules: Mapping[str, list[str]]) -> dict[str, Any]:
    """Return an image-signature policy document: ``rules`` maps repository globs to key names."""
    return {
        "keys": {name: public_pem(key) for name, key in keys.items()},
        "rules": [{"repository": repository, "keys": names} for repository, names in rules.items()],
    }


# --- registry ---------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class PushedImage:
    repository: str
    digest: str
    tag: str
    manifest: bytes

    @property
    def pinned(self) -> str:
        return f"{self.repository}@{self.digest}"

    @property
    def tagged(self) -> str:
        return f"{self.repository}:{self.tag}"


class Registry:
    """A docker-registry child process on 127.0.0.1 and helpers to fill it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = workdir / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()

    # --- process ---

    def start(self) -> None:
        config = self.workdir / "config.yml"
        config.write_text(_CONFIG.format(root=self.workdir / "data", port=self.port))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)],
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self._http.get(f"{self.url}/v2/", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not answer /v2/ within 15 s")

    def stop(self) -> None:
        self._http.close()
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    # --- request counting ---

    def requests_for(self, path: str) -> list[tuple[str, str]]:
        """Return the (method, path) of every logged request under ``/v2/<path>/``.

        A marker request is logged after every earlier request finished, so waiting for it
        makes the log complete up to now.
        """
        marker = f"/v2/edgetrust-log-marker/{uuid.uuid4().hex}/manifests/latest"
        self._http.get(self.url + marker, timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if marker in text:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("the registry did not log the marker request within 5 s")
        found = [(m.group(1), m.group(2)) for m in _ACCESS_LINE.finditer(text)]
        return [entry for entry in found if entry[1].startswith(f"/v2/{path}/")]

    # --- pushing ---

    def push_blob(self, path: str, data: bytes) -> str:
        digest = _digest(data)
        started = self._http.post(f"{self.url}/v2/{path}/blobs/uploads/", timeout=10)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        finished = self._http.put(f"{location}{separator}digest={digest}", data=data,
                                  headers={"Content-Type": "application/octet-stream"}, timeout=10)
        assert finished.status_code == 201, finished.text
        return digest

    def push_manifest(self, path: str, reference: str, body: bytes,
                      media_type: str = OCI_MANIFEST) -> str:
        response = self._http.put(f"{self.url}/v2/{path}/manifests/{reference}", data=body,
                                  headers={"Content-Type": media_type}, timeout=10)
        assert response.status_code == 201, response.text
        return _digest(body)

    def get_manifest(self, path: str, reference: str) -> bytes | None:
        response = self._http.get(f"{self.url}/v2/{path}/manifests/{reference}",
                                  headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}, timeout=10)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return response.content

    def push_image(self, path: str = "donkeycar/car", tag: str = "latest") -> PushedImage:
        """Push an image of one random layer and return where it is."""
        config = _canonical({"architecture": "arm64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}})
        layer = secrets.token_bytes(64)
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.push_blob(path, config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": self.push_blob(path, layer), "size": len(layer)}],
        })
        digest = self.push_manifest(path, tag, manifest)
        return PushedImage(f"{self.host}/{path}", digest, tag, manifest)

    # --- signing: the .sig tag with simple-signing payloads ---

    def sign_simple(self, image: PushedImage, key: PrivateKey, *,
                    docker_reference: str | None = None, claimed_digest: str | None = None,
                    signature: bytes | None = None, annotation: str | None = None,
                    payload_type: str | None = None) -> None:
        """Add a simple-signing layer to the image's ``sha256-<hex>.sig`` manifest.

        The keyword arguments make wrong signatures: another repository or digest in the
        payload, a signature of other bytes, a raw annotation value, another payload type.
        """
        path = image.repository.split("/", 1)[1]
        payload = _canonical({
            "critical": {
                "identity": {"docker-reference": docker_reference or image.repository},
                "image": {"docker-manifest-digest": claimed_digest or image.digest},
                "type": payload_type or "cosign container image signature",
            },
            "optional": {"creator": "edgetrust tests"},
        })
        layer = {
            "mediaType": SIMPLE_SIGNING,
            "digest": self.push_blob(path, payload),
            "size": len(payload),
            "annotations": {SIGNATURE_ANNOTATION: annotation if annotation is not None else (
                base64.b64encode(signature if signature is not None else sign(key, payload)).decode())},
        }

        tag = image.digest.replace(":", "-") + ".sig"
        existing = self.get_manifest(path, tag)
        layers = json.loads(existing)["layers"] if existing else []
        config = _canonical({"architecture": "", "os": "", "rootfs": {"type": "layers",
                                                                      "diff_ids": []}})
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.push_blob(path, config), "size": len(config)},
            "layers": [*layers, layer],
        }
        self.push_manifest(path, tag, _canonical(manifest))

    # --- signing: Sigstore bundle referrers ---

    def sign_bundle(self, image: PushedImage, key: PrivateKey, *,
                    claimed_digest: str | None = None, message: bytes | None = None,
                    subject_digest: str | None = None, dsse: bool = False,
                    verification_material: dict[str, Any] | None = None,
                    omit_subject: bool = False) -> str:
        """Push a Sigstore bundle referrer signing the image manifest and list it in the
        referrers tag schema's index. Returns the referrer manifest's digest.

        The keyword arguments make wrong signatures. ``claimed_digest`` changes the bundle's
        messageDigest, ``message`` the signed bytes and ``subject_digest`` the referrer's
        subject, which ``omit_subject`` leaves out. ``verification_material`` replaces the key
        material the bundle carries, and ``dsse`` writes a DSSE envelope instead of a
        messageSignature.
        """
        path = image.repository.split("/", 1)[1]
        signed = message if message is not None else image.manifest
        claimed = claimed_digest or image.digest
        bundle: dict[str, Any] = {
            "mediaType": BUNDLE,
            "verificationMaterial": verification_material or {
                "publicKey": {"hint": "edgetrust-tests"}, "tlogEntries": []},
        }
        if dsse:
            bundle["dsseEnvelope"] = {"payload": base64.b64encode(b"{}").decode(),
                                      "payloadType": "application/vnd.in-toto+json",
                                      "signatures": [{"sig": base64.b64encode(sign(key, b"{}")).decode()}]}
        else:
            bundle["messageSignature"] = {
                "messageDigest": {"algorithm": "SHA2_256",
                                  "digest": base64.b64encode(bytes.fromhex(claimed.split(":")[1])).decode()},
                "signature": base64.b64encode(sign(key, signed)).decode(),
            }
        bundle_bytes = _canonical(bundle)

        subject = subject_digest or image.digest
        referrer_document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE,
            "config": {"mediaType": OCI_EMPTY, "digest": self.push_blob(path, b"{}"), "size": 2},
            "layers": [{"mediaType": BUNDLE, "digest": self.push_blob(path, bundle_bytes),
                        "size": len(bundle_bytes)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(image.manifest)},
        }
        if omit_subject:
            del referrer_document["subject"]
        referrer = _canonical(referrer_document)
        referrer_digest = self.push_manifest(path, _digest(referrer), referrer)
        self._add_referrer(path, image.digest, referrer_digest, len(referrer))
        return referrer_digest

    def _add_referrer(self, path: str, subject: str, digest: str, size: int) -> None:
        tag = subject.replace(":", "-")
        existing = self.get_manifest(path, tag)
        manifests = json.loads(existing)["manifests"] if existing else []
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                          "artifactType": BUNDLE,
                          "annotations": {"dev.sigstore.bundle.content": "message-signature"}})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        self.push_manifest(path, tag, _canonical(index), OCI_INDEX)


@contextmanager
def running_registry() -> Iterator[Registry]:
    """Run a fresh registry for the duration of the block."""
    workdir = Path(tempfile.mkdtemp(prefix="edgetrust-registry-"))
    registry = Registry(workdir)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- servers that fail --------------------------------------------------------------------------


class HangingServer:
    """A TCP server on 127.0.0.1 that accepts connections, reads nothing and never responds."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._socket.getsockname()[1])
        self.host = f"127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self._socket.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(connection)

    def __enter__(self) -> HangingServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        for connection in self.connections:
            connection.close()
        self._socket.close()


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (bound, then released)."""
    return free_port()
