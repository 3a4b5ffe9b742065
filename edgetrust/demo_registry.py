"""A local OCI registry for ``edgetrust demo``: Debian's Docker distribution registry
(``/usr/bin/docker-registry``) on 127.0.0.1, a car image pushed into it, and a cosign
signature of that image made with a key generated here.

The signature has cosign's simple-signing format, which ``cosign sign --key`` writes to a
registry without the OCI 1.1 referrers API. It is a manifest tagged ``sha256-<hex>.sig`` whose
layer is the simple-signing payload. The layer annotation ``dev.cosignproject.cosign/signature``
contains the base64 ECDSA P-256 / SHA-256 signature over the payload bytes, which is what
``verifier.cosign`` verifies.

The registry keeps its blobs in the directory it is given, has no authentication and speaks
plain HTTP, so the server that checks its images needs it in ``registry_plain_http``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

REGISTRY_BINARY: Final = Path("/usr/bin/docker-registry")
START_TIMEOUT_SECONDS: Final = 15.0
STOP_TIMEOUT_SECONDS: Final = 10.0
REQUEST_TIMEOUT_SECONDS: Final = 10.0

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
SIMPLE_SIGNING: Final = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION: Final = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_TYPE: Final = "cosign container image signature"

# The registry's configuration: filesystem storage in our directory, loopback only, an access
# log line per request on standard output.
_CONFIG: Final = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: 127.0.0.1:{port}
"""


class RegistryError(Exception):
    """docker-registry is missing, did not start, or rejected a push. The message names which."""

    code = "demo-registry-failed"


@dataclass(frozen=True)
class PushedImage:
    """An image manifest stored in the registry."""

    repository: str
    """Registry host and path, such as ``127.0.0.1:5000/donkeycar/car``."""
    digest: str
    tag: str
    manifest: bytes

    @property
    def pinned(self) -> str:
        """The reference pinned by digest, as admission and the rollout gate require."""
        return f"{self.repository}@{self.digest}"

    @property
    def path(self) -> str:
        return self.repository.split("/", 1)[1]


def registry_available() -> bool:
    return os.access(REGISTRY_BINARY, os.X_OK)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalRegistry:
    """A docker-registry child process on 127.0.0.1 that stores its data in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = directory / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()
        self._http.trust_env = False  # use no proxy from the environment for 127.0.0.1

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> LocalRegistry:
        """Start docker-registry and wait until ``/v2/`` returns 200."""
        if not registry_available():
            raise RegistryError(f"{REGISTRY_BINARY} is missing. Install the Debian package "
                                "docker-registry.")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "config.yml"
        config.write_text(_CONFIG.format(root=self.directory / "data", port=self.port))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen([str(REGISTRY_BINARY), "serve", str(config)],
                                             stdout=log, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RegistryError(f"docker-registry exited with status {self._process.returncode}: "
                                    f"{self.log_path.read_text(errors='replace')[-500:]}")
            try:
                if self._http.get(f"{self.url}/v2/", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RegistryError(f"docker-registry did not respond on {self.url}/v2/ within "
                            f"{START_TIMEOUT_SECONDS:.0f} s. Its log is {self.log_path}")

    def stop(self) -> None:
        """Terminate docker-registry and wait for it. Calling it again does nothing."""
        self._http.close()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_SECONDS)

    # Pushing.

    def push_image(self, path: str, tag: str, files: Mapping[str, bytes]) -> PushedImage:
        """Push an image of one gzip layer holding ``files`` (archive name to content)."""
        layer_tar = _tar(files)
        layer = gzip.compress(layer_tar, mtime=0)
        config = _canonical({
            "architecture": "arm64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
        })
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.push_blob(path, config),
                       "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": self.push_blob(path, layer),
                        "size": len(layer)}],
        })
        digest = self.push_manifest(path, tag, manifest)
        return PushedImage(f"{self.host}/{path}", digest, tag, manifest)

    def sign_image(self, image: PushedImage, key: ec.EllipticCurvePrivateKey) -> str:
        """Store a cosign simple-signing signature of ``image`` made with ``key``, and return
        the signature tag."""
        payload = simple_signing_payload(image)
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
        empty_config = _canonical({"architecture": "", "os": "",
                                   "rootfs": {"type": "layers", "diff_ids": []}})
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.push_blob(image.path, empty_config),
                       "size": len(empty_config)},
            "layers": [{
                "mediaType": SIMPLE_SIGNING,
                "digest": self.push_blob(image.path, payload),
                "size": len(payload),
                "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
            }],
        })
        tag = image.digest.replace(":", "-") + ".sig"
        self.push_manifest(image.path, tag, manifest)
        return tag

    def push_blob(self, path: str, data: bytes) -> str:
        """Upload ``data`` in one monolithic PUT and return its digest."""
        digest = _digest(data)
        started = self._request("POST", f"/v2/{path}/blobs/uploads/", expected=202)
        location = started.headers.get("Location", "")
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        self._request("PUT", f"{location}{separator}digest={digest}", expected=201, data=data,
                      headers={"Content-Type": "application/octet-stream"})
        return digest

    def push_manifest(self, path: str, reference: str, body: bytes) -> str:
        """Store a manifest under a tag or digest and return its digest."""
        self._request("PUT", f"/v2/{path}/manifests/{reference}", expected=201, data=body,
                      headers={"Content-Type": OCI_MANIFEST})
        return _digest(body)

    def _request(self, method: str, url: str, *, expected: int, **kwargs: Any) -> requests.Response:
        if url.startswith("/"):
            url = self.url + url
        try:
            response = self._http.request(method, url, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
        except requests.RequestException as error:
            raise RegistryError(f"{method} {url} failed: {error}") from None
        if response.status_code != expected:
            raise RegistryError(f"{method} {url} returned {response.status_code}, expected "
                                f"{expected}: {response.text[:200]}")
        return response


# --- keys and payloads ---------------------------------------------------------------------------


def generate_signing_key() -> ec.EllipticCurvePrivateKey:
    """Return a new ECDSA P-256 key, the key type of ``cosign generate-key-pair``."""
    return ec.generate_private_key(ec.SECP256R1())


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def simple_signing_payload(image: PushedImage) -> bytes:
    """Return the simple-signing payload that names ``image``'s repository and digest."""
    return _canonical({
        "critical": {
            "identity": {"docker-reference": image.repository},
            "image": {"docker-manifest-digest": image.digest},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": {"creator": "edgetrust demo"},
    })


def _tar(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
