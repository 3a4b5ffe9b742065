"""A minimal client of the OCI distribution API (the Docker registry HTTP API v2), for reading
image manifests, blobs and referrers before a workload is admitted.

It pulls anonymously, over HTTPS unless a registry is listed as plain HTTP. When a registry
replies 401 with a bearer challenge (``WWW-Authenticate: Bearer realm=...``, the Docker
registry token authentication scheme), the client requests an anonymous pull token from that
realm and retries once with it.

Every call takes a ``Deadline``: each HTTP request waits at most the time left, a response
body is read in chunks with the deadline checked between them, and a call that would start
after the deadline raises ``registry-timeout`` at once. Everything fetched by digest is
checked against that digest, so a registry can withhold content but cannot substitute it.

Referrers (OCI distribution specification 1.1) come from ``GET /v2/<name>/referrers/<digest>``.
A registry without that API returns 404, and the client then reads the referrers tag schema:
an image index tagged ``sha256-<hex>`` that lists the referrers. The Docker distribution
registry 2.8 has no referrers API, so it is read that way.

NOTE: registries that need credentials (a private registry, a pull secret) are not supported
yet; their 401 and 403 responses raise ``registry-access-denied``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import requests
from urllib3.exceptions import ReadTimeoutError

log = logging.getLogger(__name__)

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES: Final = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

# Error codes.
REGISTRY_UNAVAILABLE: Final = "registry-unavailable"
REGISTRY_TIMEOUT: Final = "registry-timeout"
REGISTRY_ACCESS_DENIED: Final = "registry-access-denied"
REGISTRY_RESPONSE_INVALID: Final = "registry-response-invalid"
IMAGE_REFERENCE_INVALID: Final = "image-reference-invalid"

# Maximum size of a manifest or blob read into memory. Signature manifests, simple-signing
# payloads and Sigstore bundles take a few kilobytes.
MAX_DOCUMENT_BYTES: Final = 4 * 1024 * 1024
# Maximum wait of one HTTP request, even when the deadline leaves more time.
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
# Assumed lifetime of a pull token whose token service gives no expires_in. Too short a value
# only costs another token request.
DEFAULT_TOKEN_SECONDS: Final = 60.0

DOCKER_HUB: Final = "docker.io"
_DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
# Other host names that image references use for Docker Hub.
_DOCKER_HUB_ALIASES: Final = frozenset({"index.docker.io", "registry-1.docker.io"})
_CHUNK_BYTES: Final = 64 * 1024

# Grammar of the OCI distribution specification: a repository path of lowercase components,
# a tag of at most 128 characters, and (the only algorithm accepted here) a sha256 digest.
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_REGISTRY_HOST: Final = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?"
)
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SHA256_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_BEARER_PARAMETER: Final = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """A registry that could not be read; ``code`` is one of the codes above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidImageReference(ValueError):
    """An image reference that is not ``[registry/]path[:tag][@sha256:<hex>]``."""

    code = IMAGE_REFERENCE_INVALID

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` time by which a result is needed."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference. ``registry`` is a host with an optional port."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """The registry and path, without tag or digest, as image-signature policies name it."""
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image_reference(unverified_reference: str) -> ImageReference:
    """Parse an image reference as Kubernetes and the container runtimes read it.

    A first path component without a dot or a colon, other than ``localhost``, is not a
    registry host: such names are on Docker Hub, and one-component names are in its
    ``library/`` namespace (``nginx`` is ``docker.io/library/nginx``).
    Raises InvalidImageReference.
    """
    text = unverified_reference.strip()
    if not text or len(text) > 4096:
        raise InvalidImageReference(f"image reference {text[:80]!r} is empty or too long")

    name, digest = _split_digest(text)
    name, tag = _split_tag(name)
    registry, path = _split_registry(name)

    if not _REGISTRY_HOST.fullmatch(registry):
        raise InvalidImageReference(f"image reference {text!r} has an invalid registry host "
                                    f"{registry!r}")
    if not _PATH.fullmatch(path):
        raise InvalidImageReference(f"image reference {text!r} has an invalid repository path "
                                    f"{path!r}; use lowercase letters, digits and . _ - /")
    if tag is not None and not _TAG.fullmatch(tag):
        raise InvalidImageReference(f"image reference {text!r} has an invalid tag {tag!r}")
    return ImageReference(registry=registry, path=path, tag=tag, digest=digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    name, digest = text.split("@", 1)
    if not SHA256_DIGEST.fullmatch(digest):
        raise InvalidImageReference(
            f"image reference {text!r} has digest {digest!r}; expected sha256: and 64 "
            "lowercase hex digits"
        )
    return name, digest


def _split_tag(name: str) -> tuple[str, str | None]:
    last_slash = name.rfind("/")
    colon = name.find(":", last_slash + 1)
    if colon == -1:
        return name, None
    return name[:colon], name[colon + 1:]


def _split_registry(name: str) -> tuple[str, str]:
    first, _, rest = name.partition("/")
    if not rest:
        return DOCKER_HUB, f"library/{first}"
    if first in _DOCKER_HUB_ALIASES or first == DOCKER_HUB:
        return DOCKER_HUB, rest if "/" in rest else f"library/{rest}"
    if "." in first or ":" in first or first == "localhost":
        return first, rest
    return DOCKER_HUB, name


@dataclass(frozen=True)
class Manifest:
    """A manifest as served: its media type, its digest (computed here) and its bytes."""

    media_type: str
    digest: str
    body: bytes


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor taken from an image index or a manifest."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


def parse_descriptor(unverified: object, where: str) -> Descriptor:
    """Check one descriptor object. Raises RegistryError ``registry-response-invalid``."""
    if not isinstance(unverified, Mapping):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{where} is not a JSON object")
    media_type = unverified.get("mediaType")
    digest = unverified.get("digest")
    size = unverified.get("size")
    artifact_type = unverified.get("artifactType")
    annotations = unverified.get("annotations") or {}
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{where} is missing mediaType or digest")
    if not SHA256_DIGEST.fullmatch(digest):
        raise RegistryError(REGISTRY_RESPONSE_INVALID,
                            f"{where} has digest {digest[:80]!r}; expected a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{where} has an invalid size {size!r}")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{where} has a non-string artifactType")
    if not isinstance(annotations, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in annotations.items()
    ):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{where} has invalid annotations")
    return Descriptor(media_type, digest, size, artifact_type, dict(annotations))


def parse_json_document(body: bytes, what: str) -> dict[str, Any]:
    """Decode a manifest or index. Raises RegistryError ``registry-response-invalid``."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{what} is not a JSON object")
    return document


def referrers_tag(digest: str) -> str:
    """Return the referrers tag schema's tag for ``digest``: ``sha256-<hex>``."""
    return digest.replace(":", "-", 1)


@dataclass
class _Token:
    value: str
    expires_at: float


class RegistryClient:
    """Client for the manifests, blobs and referrers of any registry. Thread-safe, so one
    client serves a whole process."""

    def __init__(
        self,
        *,
        plain_http_registries: Collection[str] = (),
        ca_bundle: Path | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        pool_size: int = 16,
        user_agent: str = "edgetrust",
    ) -> None:
        self._plain_http = frozenset(plain_http_registries)
        self._verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._request_timeout = request_timeout
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size,
                                                max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = user_agent
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._tokens_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    # --- API ---

    def get_manifest(self, image: ImageReference, reference: str, deadline: Deadline) -> Manifest | None:
        """Fetch the manifest that ``reference`` (a tag or a digest) names, or None if the
        registry has none. A manifest fetched by digest must hash to that digest."""
        response = self._get(image, f"manifests/{reference}", deadline,
                             {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)})
        if response is None:
            return None
        body = self._read(response, deadline, what=f"manifest {image.repository}:{reference}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if SHA256_DIGEST.fullmatch(reference) and digest != reference:
            raise RegistryError(REGISTRY_RESPONSE_INVALID,
                                f"registry {image.registry} served a manifest for {reference} "
                                f"whose digest is {digest}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return Manifest(media_type=media_type, digest=digest, body=body)

    def resolve_digest(self, image: ImageReference, deadline: Deadline) -> str | None:
        """Return the digest of the manifest that the image's tag (or digest) names now, or
        None if the registry has no such manifest."""
        reference = image.digest or image.tag or "latest"
        manifest = self.get_manifest(image, reference, deadline)
        return None if manifest is None else manifest.digest

    def get_blob(self, image: ImageReference, digest: str, deadline: Deadline) -> bytes | None:
        """Fetch a blob by digest, or None if the registry has none."""
        response = self._get(image, f"blobs/{digest}", deadline, {})
        if response is None:
            return None
        body = self._read(response, deadline, what=f"blob {image.repository}@{digest}")
        found = "sha256:" + hashlib.sha256(body).hexdigest()
        if found != digest:
            raise RegistryError(REGISTRY_RESPONSE_INVALID,
                                f"registry {image.registry} served blob {digest} with digest "
                                f"{found}")
        return body

    def list_referrers(self, image: ImageReference, digest: str, deadline: Deadline,
                       artifact_type: str | None = None) -> list[Descriptor]:
        """Return the descriptors of the manifests that refer to ``digest``: from the referrers
        API, or from the referrers tag schema's index when the registry has no such API."""
        params = f"?artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
        response = self._get(image, f"referrers/{digest}{params}", deadline,
                             {"Accept": OCI_INDEX})
        if response is not None:
            body = self._read(response, deadline, what=f"referrers of {image.repository}@{digest}")
        else:
            fallback = self.get_manifest(image, referrers_tag(digest), deadline)
            if fallback is None:
                return []
            body = fallback.body

        index = parse_json_document(body, f"referrers index of {image.repository}@{digest}")
        manifests = index.get("manifests", [])
        if not isinstance(manifests, list):
            raise RegistryError(REGISTRY_RESPONSE_INVALID,
                                f"referrers index of {image.repository}@{digest} has no "
                                "manifests array")
        descriptors = [parse_descriptor(entry, f"referrers index entry {position}")
                       for position, entry in enumerate(manifests)]
        if artifact_type is None:
            return descriptors
        return [d for d in descriptors if d.artifact_type in (None, artifact_type)]

    # --- HTTP ---

    def _base_url(self, registry: str) -> str:
        scheme = "http" if registry in self._plain_http else "https"
        host = _DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        return f"{scheme}://{host}"

    def _get(self, image: ImageReference, path: str, deadline: Deadline,
             headers: Mapping[str, str]) -> requests.Response | None:
        """Send a GET for ``/v2/<name>/<path>``. Return the response of a 200 and None for a
        404. A 401 with a bearer challenge is retried once with an anonymous pull token."""
        url = f"{self._base_url(image.registry)}/v2/{image.path}/{path}"
        token = self._cached_token(image)
        response = self._send(url, deadline, _with_token(headers, token))
        if response.status_code == 401 and token is None:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            token = self._fetch_token(image, challenge, deadline)
            if token is not None:
                response = self._send(url, deadline, _with_token(headers, token))

        status = response.status_code
        if status == 200:
            return response
        response.close()
        if status == 404:
            return None
        if status in (401, 403):
            raise RegistryError(REGISTRY_ACCESS_DENIED,
                                f"registry {image.registry} denied anonymous access to "
                                f"{image.repository} (HTTP {status}); edgetrust pulls without "
                                "credentials")
        raise RegistryError(REGISTRY_UNAVAILABLE,
                            f"registry {image.registry} returned HTTP {status} for {url}")

    def _send(self, url: str, deadline: Deadline, headers: Mapping[str, str]) -> requests.Response:
        timeout = self._timeout(deadline, url)
        try:
            return self._session.get(url, headers=dict(headers), timeout=timeout, stream=True,
                                     verify=self._verify)
        except requests.Timeout:
            raise RegistryError(REGISTRY_TIMEOUT,
                                f"request to {url} timed out after {timeout:.1f} s") from None
        except requests.RequestException as error:
            raise self._failure(url, error, deadline) from None

    def _read(self, response: requests.Response, deadline: Deadline, *, what: str) -> bytes:
        """Read a response body of at most MAX_DOCUMENT_BYTES before ``deadline``."""
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise RegistryError(REGISTRY_RESPONSE_INVALID,
                                        f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
                if deadline.remaining() <= 0:
                    raise RegistryError(REGISTRY_TIMEOUT, f"reading {what} timed out at the deadline")
                chunks.append(chunk)
        except requests.RequestException as error:
            raise self._failure(response.url, error, deadline) from None
        finally:
            response.close()
        return b"".join(chunks)

    def _timeout(self, deadline: Deadline, url: str) -> float:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise RegistryError(REGISTRY_TIMEOUT, f"request to {url} timed out: the deadline passed "
                                "before it was sent")
        return min(remaining, self._request_timeout)

    @staticmethod
    def _failure(url: str, error: requests.RequestException, deadline: Deadline) -> RegistryError:
        # requests reports a read timeout in the middle of a body as a ConnectionError.
        cause = error.args[0] if error.args else None
        if isinstance(cause, ReadTimeoutError) or deadline.remaining() <= 0:
            return RegistryError(REGISTRY_TIMEOUT, f"request to {url} timed out at the deadline")
        return RegistryError(REGISTRY_UNAVAILABLE,
                             f"cannot reach {url}: {type(error).__name__}: {error}")

    # --- anonymous pull tokens ---

    def _cached_token(self, image: ImageReference) -> str | None:
        with self._tokens_lock:
            token = self._tokens.get((image.registry, image.path))
            if token is None or token.expires_at <= time.monotonic():
                return None
            return token.value

    def _fetch_token(self, image: ImageReference, challenge: str, deadline: Deadline) -> str | None:
        """Get an anonymous pull token from the realm of a ``Bearer`` challenge; None when the
        challenge is not a bearer challenge."""
        scheme, _, parameters = challenge.partition(" ")
        if scheme.lower() != "bearer":
            return None
        values = dict(_BEARER_PARAMETER.findall(parameters))
        realm = values.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            return None

        query = {"scope": f"repository:{image.path}:pull"}
        if "service" in values:
            query["service"] = values["service"]
        timeout = self._timeout(deadline, realm)
        try:
            response = self._session.get(realm, params=query, timeout=timeout,
                                         verify=self._verify)
        except requests.Timeout:
            raise RegistryError(REGISTRY_TIMEOUT, f"token request to {realm} timed out after "
                                f"{timeout:.1f} s") from None
        except requests.RequestException as error:
            raise self._failure(realm, error, deadline) from None
        if response.status_code != 200:
            raise RegistryError(REGISTRY_ACCESS_DENIED,
                                f"token service {realm} rejected an anonymous pull token request for "
                                f"{image.repository} (HTTP {response.status_code})")

        token = _token_of(response, realm)
        with self._tokens_lock:
            self._tokens[(image.registry, image.path)] = token
        return token.value


def _token_of(response: requests.Response, realm: str) -> _Token:
    try:
        document = response.json()
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"token service {realm} returned no "
                            "JSON object")
    value = document.get("token") or document.get("access_token")
    if not isinstance(value, str) or not value:
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"token service {realm} returned no token")
    lifetime = document.get("expires_in")
    seconds = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else (
        DEFAULT_TOKEN_SECONDS)
    # Renew a little early so that a token does not expire between check and use.
    return _Token(value, time.monotonic() + seconds * 0.9)


def _with_token(headers: Mapping[str, str], token: str | None) -> dict[str, str]:
    result = dict(headers)
    if token is not None:
        result["Authorization"] = f"Bearer {token}"
    return result
