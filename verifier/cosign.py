"""Verify cosign signatures of container images with the keys of an image-signature policy.

Two storage formats are read, both from the image's own repository:

- **Signature tag** (cosign's SIGNATURE_SPEC): a manifest tagged ``sha256-<hex>.sig`` whose
  layers are simple-signing payloads (``application/vnd.dev.cosign.simplesigning.v1+json``).
  A layer's annotation ``dev.cosignproject.cosign/signature`` contains the base64 signature over
  the payload blob's bytes, and the payload names the image digest and repository it covers.
- **Sigstore bundle referrer** (cosign's BUNDLE_SPEC, OCI 1.1 referrers): a manifest with
  ``artifactType`` ``application/vnd.dev.sigstore.bundle.v0.3+json`` whose ``subject`` is the
  image and whose one layer is a Sigstore bundle. Its ``messageSignature`` is a signature over
  the image manifest's bytes, beside the manifest's SHA-256 digest.

Only keys from the policy count, and only the ones the policy allows for the image's
repository. Key material inside an artifact (a certificate annotation, a bundle's
verification material) is never used.

NOTE: there is no keyless verification. Fulcio certificates, Rekor transparency-log entries and
timestamps in a bundle are ignored, so a signature is exactly as strong as the configured key.
TODO: bundles carrying a DSSE envelope (an in-toto statement about the image) are not accepted
as signatures yet; only ``messageSignature`` bundles are.

Successful verifications are cached by repository, image digest, key-set fingerprint and
policy version. Failures are never cached, so a signature pushed after a denial counts at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from policies.image_signature import AllowedKey, ImageSignaturePolicy
from verifier.registry import (
    REGISTRY_RESPONSE_INVALID,
    REGISTRY_TIMEOUT,
    Deadline,
    Descriptor,
    ImageReference,
    InvalidImageReference,
    RegistryClient,
    RegistryError,
    parse_descriptor,
    parse_image_reference,
    parse_json_document,
)

log = logging.getLogger(__name__)

SIMPLE_SIGNING_MEDIA_TYPE: Final = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION: Final = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_TYPE: Final = "cosign container image signature"
BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
SIGNATURE_TAG_SUFFIX: Final = ".sig"

FORMAT_SIMPLE_SIGNING: Final = "simple-signing"
FORMAT_SIGSTORE_BUNDLE: Final = "sigstore-bundle"

# Error codes. Registry failures keep the codes of verifier.registry.
IMAGE_NOT_PINNED: Final = "image-not-pinned"
IMAGE_REFERENCE_INVALID: Final = "image-reference-invalid"
IMAGE_SIGNATURE_MISSING: Final = "image-signature-missing"
IMAGE_SIGNATURE_INVALID: Final = "image-signature-invalid"
IMAGE_SIGNATURE_DIGEST_MISMATCH: Final = "image-signature-digest-mismatch"
IMAGE_SIGNATURE_REFERENCE_MISMATCH: Final = "image-signature-reference-mismatch"
IMAGE_SIGNATURE_KEY_NOT_ALLOWED: Final = "image-signature-key-not-allowed"

# Which failure to report when an image has several signatures and none passes: the one that
# gives the operator the most information. A valid signature by an allowed key over another
# image ranks first, then a signature by a key of another repository, then one that no policy
# key verifies.
_FAILURE_RANK: Final = {
    IMAGE_SIGNATURE_DIGEST_MISMATCH: 0,
    IMAGE_SIGNATURE_REFERENCE_MISMATCH: 1,
    IMAGE_SIGNATURE_KEY_NOT_ALLOWED: 2,
    IMAGE_SIGNATURE_INVALID: 3,
}

# Maximum number of signatures examined per image, so that an artifact with thousands of layers
# cannot keep a check busy. Each `cosign sign` adds one layer, so most images have a few.
MAX_SIGNATURES: Final = 32


class ImageSignatureError(Exception):
    """An image whose signature does not pass, or could not be checked; ``code`` is stable."""

    def __init__(self, code: str, message: str, *, image: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.image = image


@dataclass(frozen=True)
class SignaturePolicy:
    """An image-signature policy with the store name and version it was loaded from."""

    name: str
    version: int
    policy: ImageSignaturePolicy


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose signature verified with an allowed key."""

    reference: str
    repository: str
    digest: str
    key_name: str
    key_id: str
    signature_format: str
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "repository": self.repository,
                "digest": self.digest, "allowed": True, "key": self.key_name,
                "key_id": self.key_id, "format": self.signature_format, "cached": self.cached}


def failure_json(error: ImageSignatureError) -> dict[str, Any]:
    """Return the JSON form of a failed image check, shaped like ``VerifiedImage.to_json``."""
    return {"reference": error.image, "allowed": False, "code": error.code,
            "message": error.message}


def key_set_fingerprint(keys: Sequence[AllowedKey]) -> str:
    """Return the SHA-256 hex over the sorted key ids: equal for equal key sets."""
    return hashlib.sha256("\n".join(sorted(key.key_id for key in keys)).encode()).hexdigest()


# --- cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    repository: str
    digest: str
    key_set: str
    policy_name: str
    policy_version: int


class SignatureCache:
    """Successful verifications, least recently used first out, each kept ``ttl`` seconds.

    Thread-safe. The time-to-live bounds how long a signature deleted from the registry still
    counts. A new policy version or key set never reuses an entry, because both are in the key.
    """

    def __init__(self, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, VerifiedImage]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> VerifiedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, image = entry
            if self._clock() - stored_at >= self.ttl:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return image

    def put(self, key: CacheKey, image: VerifiedImage) -> None:
        if self.max_entries < 1 or self.ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock(), image)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# --- signatures -------------------------------------------------------------------------------


def _signature_hashes(public_key: ec.EllipticCurvePublicKey) -> tuple[hashes.HashAlgorithm, ...]:
    # cosign's signature specification hashes with SHA-256, the registry's digest algorithm.
    # P-384 and P-521 keys are also tried with their matching hash, which other signers use.
    if isinstance(public_key.curve, ec.SECP384R1):
        return (hashes.SHA256(), hashes.SHA384())
    if isinstance(public_key.curve, ec.SECP521R1):
        return (hashes.SHA256(), hashes.SHA512())
    return (hashes.SHA256(),)


def verify_signature(key: AllowedKey, signature: bytes, message: bytes) -> None:
    """Verify ``signature`` over ``message`` with ``key``: ECDSA (DER), RSA PKCS #1 v1.5 with
    SHA-256 (not RSA-PSS), or Ed25519. Raises cryptography's InvalidSignature."""
    public_key = key.public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for algorithm in _signature_hashes(public_key):
            try:
                public_key.verify(signature, message, ec.ECDSA(algorithm))
                return
            except InvalidSignature:
                continue
        raise InvalidSignature
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        return
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, message)
        return
    raise InvalidSignature


def find_signer(keys: Sequence[AllowedKey], signature: bytes, message: bytes) -> AllowedKey | None:
    """Return the first of ``keys`` that verifies ``signature`` over ``message``, or None."""
    for key in keys:
        try:
            verify_signature(key, signature, message)
        except InvalidSignature:
            continue
        return key
    return None


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    """One signature found for an image, with the bytes it signs still to be fetched."""

    signature_format: str
    descriptor: Descriptor


@dataclass(frozen=True)
class _Keys:
    allowed: tuple[AllowedKey, ...]
    # Keys the policy names for other repositories only.
    others: tuple[AllowedKey, ...]


class CosignVerifier:
    """Verifier of the cosign signature of one image reference per call. Thread-safe."""

    def __init__(self, registry: RegistryClient, cache: SignatureCache):
        self.registry = registry
        self.cache = cache

    def verify(self, unverified_reference: str, policy: SignaturePolicy,
               deadline: Deadline) -> VerifiedImage:
        """Check that the image is pinned by digest and carries a valid cosign signature.

        1. Parse the reference; it must name a sha256 digest.
        2. Take the keys the policy allows for the image's repository; none means denied.
        3. Return a cached success for the same repository, digest, key set and policy version.
        4. Collect signatures: the ``.sig`` tag's layers, then Sigstore bundle referrers.
        5. Verify each with the allowed keys and check what it claims, until one passes.
        6. Cache and return the first that passes; otherwise raise the most telling failure.

        Raises ImageSignatureError.
        """
        image = _pinned_image(unverified_reference)

        keys = _keys_for(policy.policy, image.repository)
        if not keys.allowed:
            raise ImageSignatureError(
                IMAGE_SIGNATURE_KEY_NOT_ALLOWED,
                f"image-signature policy {policy.name!r} version {policy.version} allows no key "
                f"to sign images of {image.repository}",
                image=unverified_reference,
            )

        assert image.digest is not None  # _pinned_image checked it
        cache_key = CacheKey(image.repository, image.digest, key_set_fingerprint(keys.allowed),
                             policy.name, policy.version)
        cached = self.cache.get(cache_key)
        if cached is not None:
            return _with_reference(cached, unverified_reference, cached=True)

        try:
            verified = self._verify_uncached(image, keys, unverified_reference, deadline)
        except RegistryError as error:
            raise ImageSignatureError(error.code, f"{error.message} (checking "
                                      f"{unverified_reference})", image=unverified_reference) from None

        self.cache.put(cache_key, verified)
        return verified

    def _verify_uncached(self, image: ImageReference, keys: _Keys, reference: str,
                         deadline: Deadline) -> VerifiedImage:
        failures: list[ImageSignatureError] = []
        found = 0
        for candidate in self._candidates(image, deadline):
            found += 1
            if found > MAX_SIGNATURES:
                break
            try:
                key = self._check(candidate, image, keys, reference, deadline)
            except ImageSignatureError as failure:
                failures.append(failure)
                continue
            except RegistryError as error:
                # A malformed signature artifact fails that signature only; an unreachable or
                # slow registry fails the whole check.
                if error.code != REGISTRY_RESPONSE_INVALID:
                    raise
                failures.append(ImageSignatureError(IMAGE_SIGNATURE_INVALID, error.message,
                                                    image=reference))
                continue
            assert image.digest is not None
            return VerifiedImage(reference=reference, repository=image.repository,
                                 digest=image.digest, key_name=key.name, key_id=key.key_id,
                                 signature_format=candidate.signature_format)

        if not failures:
            raise ImageSignatureError(
                IMAGE_SIGNATURE_MISSING,
                f"image {reference} has no cosign signature: no {image.digest} signature tag "
                "and no Sigstore bundle referrer in its repository",
                image=reference,
            )
        raise min(failures, key=lambda failure: _FAILURE_RANK.get(failure.code, 99))

    def _candidates(self, image: ImageReference, deadline: Deadline) -> Iterator[_Candidate]:
        """Yield the signatures of the image: signature-tag layers first, then bundles. The
        caller stops at the first signature that passes, so the referrers are requested only
        when no signature-tag layer passed."""
        assert image.digest is not None
        tag = image.digest.replace(":", "-", 1) + SIGNATURE_TAG_SUFFIX
        manifest = self.registry.get_manifest(image, tag, deadline)
        if manifest is not None:
            document = parse_json_document(manifest.body, f"signature manifest {tag}")
            for position, layer in enumerate(_layers(document, tag)):
                descriptor = parse_descriptor(layer, f"layer {position} of {tag}")
                if descriptor.media_type == SIMPLE_SIGNING_MEDIA_TYPE:
                    yield _Candidate(FORMAT_SIMPLE_SIGNING, descriptor)

        for descriptor in self.registry.list_referrers(image, image.digest, deadline,
                                                       artifact_type=BUNDLE_MEDIA_TYPE):
            yield _Candidate(FORMAT_SIGSTORE_BUNDLE, descriptor)

    def _check(self, candidate: _Candidate, image: ImageReference, keys: _Keys, reference: str,
               deadline: Deadline) -> AllowedKey:
        if candidate.signature_format == FORMAT_SIMPLE_SIGNING:
            return _SimpleSigningCheck(self.registry, image, keys, reference, deadline).run(
                candidate.descriptor)
        return _BundleCheck(self.registry, image, keys, reference, deadline).run(
            candidate.descriptor)


@dataclass
class _Check:
    """State shared by the checks of one signature."""

    registry: RegistryClient
    image: ImageReference
    keys: _Keys
    reference: str
    deadline: Deadline

    def fail(self, code: str, message: str) -> ImageSignatureError:
        return ImageSignatureError(code, message, image=self.reference)

    def signer(self, signature: bytes, message: bytes, what: str) -> AllowedKey:
        """Return the allowed key that made ``signature``. Raise key-not-allowed when a key
        that the policy allows only for other repositories made it. Raise invalid when no
        policy key did."""
        key = find_signer(self.keys.allowed, signature, message)
        if key is not None:
            return key
        other = find_signer(self.keys.others, signature, message)
        if other is not None:
            raise self.fail(
                IMAGE_SIGNATURE_KEY_NOT_ALLOWED,
                f"{what} of image {self.reference} is signed by key {other.name!r}, which the "
                f"image-signature policy does not allow for {self.image.repository}; allowed: "
                f"{', '.join(repr(k.name) for k in self.keys.allowed)}",
            )
        raise self.fail(
            IMAGE_SIGNATURE_INVALID,
            f"{what} of image {self.reference} does not verify with any of the "
            f"{len(self.keys.allowed)} key(s) allowed for {self.image.repository} "
            f"({', '.join(repr(k.name) for k in self.keys.allowed)})",
        )

    def blob(self, digest: str, what: str) -> bytes:
        body = self.registry.get_blob(self.image, digest, self.deadline)
        if body is None:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"{what} {digest} of image {self.reference} is missing from "
                            f"{self.image.repository}")
        return body


class _SimpleSigningCheck(_Check):
    def run(self, layer: Descriptor) -> AllowedKey:
        """1. Decode the layer's signature annotation.
        2. Fetch the simple-signing payload blob.
        3. Find the allowed key whose signature it is.
        4. Check the signed claims: type, image digest and repository."""
        signature = self._signature(layer)

        payload = self.blob(layer.digest, "simple-signing payload")

        key = self.signer(signature, payload, f"simple-signing payload {layer.digest}")

        self._check_claims(payload, layer.digest)
        return key

    def _signature(self, layer: Descriptor) -> bytes:
        encoded = layer.annotations.get(SIGNATURE_ANNOTATION)
        if not encoded:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"simple-signing layer {layer.digest} of image {self.reference} has "
                            f"no {SIGNATURE_ANNOTATION} annotation")
        return _b64decode(encoded, lambda: self.fail(
            IMAGE_SIGNATURE_INVALID, f"the {SIGNATURE_ANNOTATION} annotation of layer "
            f"{layer.digest} of image {self.reference} is not valid base64"))

    def _check_claims(self, payload: bytes, payload_digest: str) -> None:
        try:
            document = json.loads(payload)
            critical = document["critical"]
            claim_type = critical["type"]
            claimed_digest = critical["image"]["docker-manifest-digest"]
            claimed_reference = critical["identity"]["docker-reference"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"signed payload {payload_digest} of image {self.reference} is not "
                            "a simple-signing document with critical.type, critical.image and "
                            "critical.identity") from None

        if claim_type != COSIGN_SIGNATURE_TYPE:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"signed payload {payload_digest} has type {claim_type!r}; expected "
                            f"{COSIGN_SIGNATURE_TYPE!r}")
        if claimed_digest != self.image.digest:
            raise self.fail(IMAGE_SIGNATURE_DIGEST_MISMATCH,
                            f"signature of image {self.reference} covers digest "
                            f"{claimed_digest!r}; expected {self.image.digest}")
        self._check_reference(claimed_reference)

    def _check_reference(self, claimed_reference: object) -> None:
        # cosign's specification lets verifiers ignore the identity; edgetrust checks it so
        # that a signature copied from another repository does not count.
        # NOTE: an image mirrored to another registry keeps the original repository in its
        # signature and is therefore denied under the mirror's name.
        repository = None
        if isinstance(claimed_reference, str):
            try:
                repository = parse_image_reference(claimed_reference).repository
            except InvalidImageReference:
                repository = None
        if repository != self.image.repository:
            raise self.fail(IMAGE_SIGNATURE_REFERENCE_MISMATCH,
                            f"signature of image {self.reference} names repository "
                            f"{claimed_reference!r}; expected {self.image.repository}")


class _BundleCheck(_Check):
    def run(self, descriptor: Descriptor) -> AllowedKey:
        """1. Fetch the referrer manifest; its subject must be the image.
        2. Fetch the bundle blob and read its messageSignature.
        3. Fetch the image manifest, which the signature covers.
        4. Find the allowed key whose signature it is.
        5. Check that the bundle's message digest is the image digest."""
        layer = self._bundle_layer(descriptor)

        message_signature = self._message_signature(self.blob(layer.digest, "Sigstore bundle"),
                                                    layer.digest)

        manifest = self._image_manifest()

        signature = _b64decode(message_signature.get("signature"), lambda: self.fail(
            IMAGE_SIGNATURE_INVALID, f"Sigstore bundle {layer.digest} of image "
            f"{self.reference} has no base64 messageSignature.signature"))
        key = self.signer(signature, manifest, f"Sigstore bundle {layer.digest}")

        self._check_message_digest(message_signature, layer.digest)
        return key

    def _bundle_layer(self, descriptor: Descriptor) -> Descriptor:
        manifest = self.registry.get_manifest(self.image, descriptor.digest, self.deadline)
        if manifest is None:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"referrer {descriptor.digest} of image {self.reference} is listed "
                            "but missing from the repository")
        document = parse_json_document(manifest.body, f"referrer manifest {descriptor.digest}")
        if document.get("artifactType") != BUNDLE_MEDIA_TYPE:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"referrer {descriptor.digest} has artifactType "
                            f"{document.get('artifactType')!r}; expected {BUNDLE_MEDIA_TYPE}")
        subject = parse_descriptor(document.get("subject"), f"subject of {descriptor.digest}")
        if subject.digest != self.image.digest:
            raise self.fail(IMAGE_SIGNATURE_DIGEST_MISMATCH,
                            f"referrer {descriptor.digest} refers to {subject.digest}; expected "
                            f"{self.image.digest}")
        layers = _layers(document, f"referrer manifest {descriptor.digest}")
        if len(layers) != 1:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"referrer {descriptor.digest} has {len(layers)} layers; a bundle "
                            "referrer has exactly one")
        return parse_descriptor(layers[0], f"layer of {descriptor.digest}")

    def _message_signature(self, body: bytes, digest: str) -> dict[str, Any]:
        try:
            bundle = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            bundle = None
        if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"blob {digest} of image {self.reference} is not a Sigstore bundle "
                            f"with mediaType {BUNDLE_MEDIA_TYPE}")
        message_signature = bundle.get("messageSignature")
        if not isinstance(message_signature, dict):
            content = "a DSSE envelope" if "dsseEnvelope" in bundle else "no messageSignature"
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"Sigstore bundle {digest} of image {self.reference} holds {content}; "
                            "only messageSignature bundles are accepted as image signatures")
        return message_signature

    def _image_manifest(self) -> bytes:
        assert self.image.digest is not None
        manifest = self.registry.get_manifest(self.image, self.image.digest, self.deadline)
        if manifest is None:
            raise self.fail(IMAGE_SIGNATURE_INVALID,
                            f"image manifest {self.image.digest} is missing from "
                            f"{self.image.repository}, so its bundle signature cannot be checked")
        return manifest.body

    def _check_message_digest(self, message_signature: dict[str, Any], digest: str) -> None:
        unverified_digest = message_signature.get("messageDigest")
        if unverified_digest is None:
            return
        algorithm = unverified_digest.get("algorithm") if isinstance(unverified_digest, dict) else None
        value = unverified_digest.get("digest") if isinstance(unverified_digest, dict) else None
        decoded = _b64decode(value, lambda: self.fail(
            IMAGE_SIGNATURE_INVALID, f"Sigstore bundle {digest} has an invalid messageDigest"))
        claimed = f"sha256:{decoded.hex()}" if algorithm == "SHA2_256" else f"{algorithm}:{decoded.hex()}"
        if claimed != self.image.digest:
            raise self.fail(IMAGE_SIGNATURE_DIGEST_MISMATCH,
                            f"Sigstore bundle {digest} of image {self.reference} claims message "
                            f"digest {claimed}; expected {self.image.digest}")


def _pinned_image(unverified_reference: str) -> ImageReference:
    try:
        image = parse_image_reference(unverified_reference)
    except InvalidImageReference as error:
        raise ImageSignatureError(IMAGE_REFERENCE_INVALID, error.message,
                                  image=unverified_reference) from None
    if image.digest is None:
        raise ImageSignatureError(
            IMAGE_NOT_PINNED,
            f"image {unverified_reference} is not pinned by digest; use "
            f"{image.repository}@sha256:<digest>, because a tag can be moved to other content",
            image=unverified_reference,
        )
    return image


def _keys_for(policy: ImageSignaturePolicy, repository: str) -> _Keys:
    allowed = policy.keys_for(repository)
    allowed_ids = {key.key_id for key in allowed}
    others = tuple(key for key in policy.keys.values() if key.key_id not in allowed_ids)
    return _Keys(allowed=allowed, others=others)


def _layers(document: dict[str, Any], what: str) -> list[Any]:
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(REGISTRY_RESPONSE_INVALID, f"{what} has no layers array")
    return layers


def _b64decode(value: object, failure: Callable[[], ImageSignatureError]) -> bytes:
    if not isinstance(value, str) or not value:
        raise failure()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise failure() from None


def _with_reference(image: VerifiedImage, reference: str, *, cached: bool) -> VerifiedImage:
    return VerifiedImage(reference=reference, repository=image.repository, digest=image.digest,
                         key_name=image.key_name, key_id=image.key_id,
                         signature_format=image.signature_format, cached=cached)


# --- several images under one deadline --------------------------------------------------------


ImageResult = VerifiedImage | ImageSignatureError


class ImageSignatureChecker:
    """Checker of the images of one request, in parallel and by a deadline.

    A check still running at the deadline is reported as ``registry-timeout``. Its thread
    finishes in the background soon after, because every registry request is bounded by the
    same deadline.
    """

    def __init__(self, verifier: CosignVerifier, threads: int):
        self.verifier = verifier
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-check")

    def check(self, references: Sequence[str], policy: SignaturePolicy,
              deadline: Deadline) -> dict[str, ImageResult]:
        """Return the result for each distinct reference, in the order given."""
        futures: dict[str, Future[VerifiedImage]] = {}
        for reference in references:
            if reference not in futures:
                futures[reference] = self._pool.submit(self.verifier.verify, reference, policy,
                                                       deadline)
        return {reference: _result_by(future, reference, deadline)
                for reference, future in futures.items()}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _result_by(future: Future[VerifiedImage], reference: str, deadline: Deadline) -> ImageResult:
    try:
        return future.result(timeout=max(deadline.remaining(), 0.0))
    except FutureTimeout:
        future.cancel()
        return ImageSignatureError(REGISTRY_TIMEOUT,
                                   f"checking the signature of image {reference} did not finish "
                                   "before the deadline", image=reference)
    except ImageSignatureError as error:
        return error
