"""cosign signature verification against a real registry on 127.0.0.1, in both formats."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from policies.image_signature import parse_image_signature_policy
from tests.support.registry import (
    HangingServer,
    PrivateKey,
    Registry,
    closed_port,
    generate_key,
    policy_document,
    registry_available,
    running_registry,
)
from verifier.cosign import (
    CosignVerifier,
    ImageSignatureChecker,
    ImageSignatureError,
    SignatureCache,
    SignaturePolicy,
    VerifiedImage,
)
from verifier.registry import Deadline, RegistryClient

pytestmark = pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed")

CAR = "donkeycar/car"


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with running_registry() as registry:
        yield registry


@pytest.fixture(scope="module")
def release_key() -> PrivateKey:
    return generate_key()


@pytest.fixture(scope="module")
def tools_key() -> PrivateKey:
    return generate_key()


def make_policy(registry: Registry, keys: dict[str, PrivateKey],
                rules: dict[str, list[str]] | None = None, version: int = 1) -> SignaturePolicy:
    rules = rules or {f"{registry.host}/donkeycar/*": list(keys)}
    document = policy_document(keys, rules)
    return SignaturePolicy("images", version, parse_image_signature_policy(document))


@pytest.fixture
def policy(registry: Registry, release_key: PrivateKey, tools_key: PrivateKey) -> SignaturePolicy:
    # The tools key may sign only the tools repository.
    return make_policy(registry, {"release": release_key, "tools": tools_key},
                       {f"{registry.host}/donkeycar/*": ["release"],
                        f"{registry.host}/tools/*": ["tools"]})


def make_verifier(registry_hosts: list[str], cache: SignatureCache | None = None) -> CosignVerifier:
    client = RegistryClient(plain_http_registries=registry_hosts, request_timeout=5)
    return CosignVerifier(client, cache or SignatureCache(max_entries=100, ttl=600))


@pytest.fixture
def verifier(registry: Registry) -> CosignVerifier:
    return make_verifier([registry.host])


def verify(verifier: CosignVerifier, reference: str, policy: SignaturePolicy) -> VerifiedImage:
    return verifier.verify(reference, policy, Deadline.after(10))


def failure(verifier: CosignVerifier, reference: str, policy: SignaturePolicy) -> ImageSignatureError:
    with pytest.raises(ImageSignatureError) as raised:
        verify(verifier, reference, policy)
    return raised.value


# --- passing signatures ---


def test_simple_signing_signature_verifies(registry: Registry, verifier: CosignVerifier,
                                           policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key)

    verified = verify(verifier, image.pinned, policy)

    assert verified.digest == image.digest
    assert verified.repository == image.repository
    assert verified.key_name == "release"
    assert verified.signature_format == "simple-signing"
    assert verified.cached is False


def test_bundle_referrer_verifies(registry: Registry, verifier: CosignVerifier,
                                  policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key)

    verified = verify(verifier, image.pinned, policy)

    assert verified.signature_format == "sigstore-bundle"
    assert verified.key_name == "release"


@pytest.mark.parametrize("kind", ["ecdsa-p384", "rsa", "ed25519"])
@pytest.mark.parametrize("signature_format", ["simple", "bundle"])
def test_other_key_types_verify(registry: Registry, verifier: CosignVerifier, kind: str,
                                signature_format: str) -> None:
    key = generate_key(kind)
    policy = make_policy(registry, {kind: key})
    image = registry.push_image(CAR)
    if signature_format == "simple":
        registry.sign_simple(image, key)
    else:
        registry.sign_bundle(image, key)

    assert verify(verifier, image.pinned, policy).key_name == kind


def test_tagged_and_pinned_reference_verifies(registry: Registry, verifier: CosignVerifier,
                                              policy: SignaturePolicy,
                                              release_key: PrivateKey) -> None:
    image = registry.push_image(CAR, tag="4.5")
    registry.sign_simple(image, release_key)

    verified = verify(verifier, f"{image.tagged}@{image.digest}", policy)

    assert verified.reference == f"{image.tagged}@{image.digest}"


def test_one_good_signature_among_bad_ones(registry: Registry, verifier: CosignVerifier,
                                           policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, generate_key())
    registry.sign_simple(image, release_key, claimed_digest="sha256:" + "0" * 64)
    registry.sign_simple(image, release_key)

    assert verify(verifier, image.pinned, policy).key_name == "release"


# --- failures ---


def test_tag_only_reference_not_pinned(registry: Registry, verifier: CosignVerifier,
                                       policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR, tag="tagged")
    registry.sign_simple(image, release_key)

    error = failure(verifier, image.tagged, policy)

    assert error.code == "image-not-pinned"
    assert image.tagged in error.message
    assert registry.requests_for(CAR + "/manifests/tagged") == []


def test_invalid_reference_rejected(verifier: CosignVerifier, policy: SignaturePolicy) -> None:
    error = failure(verifier, "Registry.Example/Car@sha256:abc", policy)

    assert error.code == "image-reference-invalid"


def test_unsigned_image_signature_missing(registry: Registry, verifier: CosignVerifier,
                                          policy: SignaturePolicy) -> None:
    image = registry.push_image(CAR)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-missing"
    assert image.digest in error.message


def test_unknown_key_signature_invalid(registry: Registry, verifier: CosignVerifier,
                                       policy: SignaturePolicy) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, generate_key())

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "'release'" in error.message


def test_other_repository_key_not_allowed(registry: Registry, verifier: CosignVerifier,
                                          policy: SignaturePolicy, tools_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, tools_key)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-key-not-allowed"
    assert "'tools'" in error.message


def test_repository_without_rule_key_not_allowed(registry: Registry, verifier: CosignVerifier,
                                                 policy: SignaturePolicy,
                                                 release_key: PrivateKey) -> None:
    image = registry.push_image("elsewhere/car")
    registry.sign_simple(image, release_key)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-key-not-allowed"
    assert "allows no key" in error.message
    assert registry.requests_for("elsewhere/car/manifests/sha256-" + image.digest[7:] + ".sig") == []


def test_payload_for_other_digest_mismatch(registry: Registry, verifier: CosignVerifier,
                                           policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    other = registry.push_image(CAR)
    registry.sign_simple(image, release_key, claimed_digest=other.digest)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-digest-mismatch"
    assert other.digest in error.message


def test_payload_for_other_repository_mismatch(registry: Registry, verifier: CosignVerifier,
                                               policy: SignaturePolicy,
                                               release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key, docker_reference=f"{registry.host}/donkeycar/other")

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-reference-mismatch"


def test_signature_over_other_bytes_invalid(registry: Registry, verifier: CosignVerifier,
                                            policy: SignaturePolicy, release_key: PrivateKey) -> None:
    from tests.support.registry import sign

    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key, signature=sign(release_key, b"something else"))

    assert failure(verifier, image.pinned, policy).code == "image-signature-invalid"


def test_signature_not_base64_invalid(registry: Registry, verifier: CosignVerifier,
                                      policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key, annotation="MEUCIQ*not base64*")

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "not valid base64" in error.message


def test_signature_annotation_missing_invalid(registry: Registry, verifier: CosignVerifier,
                                              policy: SignaturePolicy,
                                              release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key, annotation="")

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "has no dev.cosignproject.cosign/signature annotation" in error.message


def test_payload_of_other_type_invalid(registry: Registry, verifier: CosignVerifier,
                                       policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key, payload_type="atomic container signature")

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "atomic container signature" in error.message


def test_most_informative_failure_reported(registry: Registry, verifier: CosignVerifier,
                                       policy: SignaturePolicy, release_key: PrivateKey,
                                       tools_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, generate_key())
    registry.sign_simple(image, tools_key)
    registry.sign_simple(image, release_key, claimed_digest="sha256:" + "1" * 64)

    assert failure(verifier, image.pinned, policy).code == "image-signature-digest-mismatch"


def test_bundle_message_digest_mismatch(registry: Registry, verifier: CosignVerifier,
                                        policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, claimed_digest="sha256:" + "2" * 64)

    assert failure(verifier, image.pinned, policy).code == "image-signature-digest-mismatch"


def test_bundle_for_other_subject_mismatch(registry: Registry, verifier: CosignVerifier,
                                           policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    other = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, subject_digest=other.digest)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-digest-mismatch"
    assert other.digest in error.message


def test_bundle_over_other_bytes_invalid(registry: Registry, verifier: CosignVerifier,
                                         policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, message=b"another manifest")

    assert failure(verifier, image.pinned, policy).code == "image-signature-invalid"


def test_bundle_with_dsse_envelope_invalid(registry: Registry, verifier: CosignVerifier,
                                           policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, dsse=True)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "DSSE envelope" in error.message


def test_key_material_in_bundle_ignored(registry: Registry, verifier: CosignVerifier,
                                        policy: SignaturePolicy) -> None:
    import base64

    from tests.support.registry import self_signed_certificate

    attacker = generate_key()
    image = registry.push_image(CAR)
    material = {"certificate": {"rawBytes": base64.b64encode(self_signed_certificate(attacker)).decode()},
                "publicKey": {"hint": "release"}, "tlogEntries": []}
    registry.sign_bundle(image, attacker, verification_material=material)

    assert failure(verifier, image.pinned, policy).code == "image-signature-invalid"


def test_malformed_referrer_skipped(registry: Registry, verifier: CosignVerifier,
                                   policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, omit_subject=True)
    registry.sign_bundle(image, release_key)

    assert verify(verifier, image.pinned, policy).signature_format == "sigstore-bundle"


def test_malformed_referrer_alone_invalid(registry: Registry, verifier: CosignVerifier,
                                          policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, release_key, omit_subject=True)

    error = failure(verifier, image.pinned, policy)

    assert error.code == "image-signature-invalid"
    assert "subject of" in error.message


def test_bundle_by_other_repository_key(registry: Registry, verifier: CosignVerifier,
                                        policy: SignaturePolicy, tools_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_bundle(image, tools_key)

    assert failure(verifier, image.pinned, policy).code == "image-signature-key-not-allowed"


# --- cache ---


def test_second_check_makes_no_registry_request(registry: Registry, verifier: CosignVerifier,
                                                policy: SignaturePolicy,
                                                release_key: PrivateKey) -> None:
    image = registry.push_image("donkeycar/cached")
    registry.sign_simple(image, release_key)
    verify(verifier, image.pinned, policy)
    before = registry.requests_for("donkeycar/cached")

    second = verify(verifier, image.pinned, policy)

    assert second.cached is True
    assert registry.requests_for("donkeycar/cached") == before


def test_failure_not_cached(registry: Registry, verifier: CosignVerifier, policy: SignaturePolicy,
                            release_key: PrivateKey) -> None:
    image = registry.push_image("donkeycar/late")
    assert failure(verifier, image.pinned, policy).code == "image-signature-missing"
    registry.sign_simple(image, release_key)
    before = len(registry.requests_for("donkeycar/late"))

    verified = verify(verifier, image.pinned, policy)

    assert verified.cached is False
    assert len(registry.requests_for("donkeycar/late")) > before


def test_new_policy_version_checks_again(registry: Registry, verifier: CosignVerifier,
                                         release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key)
    verify(verifier, image.pinned, make_policy(registry, {"release": release_key}, version=1))

    again = verify(verifier, image.pinned, make_policy(registry, {"release": release_key},
                                                       version=2))

    assert again.cached is False


def test_cache_entry_expires() -> None:
    now = [0.0]
    cache = SignatureCache(max_entries=2, ttl=60, clock=lambda: now[0])
    from verifier.cosign import CacheKey

    key = CacheKey("r/x", "sha256:" + "a" * 64, "keys", "images", 1)
    image = VerifiedImage("r/x@sha256:" + "a" * 64, "r/x", "sha256:" + "a" * 64, "k", "id",
                          "simple-signing")
    cache.put(key, image)

    now[0] = 59.0
    assert cache.get(key) == image
    now[0] = 60.0
    assert cache.get(key) is None


def test_cache_evicts_least_recently_used() -> None:
    from verifier.cosign import CacheKey

    cache = SignatureCache(max_entries=2, ttl=60)
    keys = [CacheKey("r/x", f"sha256:{i:064x}", "keys", "images", 1) for i in range(3)]
    image = VerifiedImage("r/x", "r/x", "sha256:" + "a" * 64, "k", "id", "simple-signing")
    cache.put(keys[0], image)
    cache.put(keys[1], image)
    cache.get(keys[0])
    cache.put(keys[2], image)

    assert cache.get(keys[0]) == image
    assert cache.get(keys[1]) is None
    assert len(cache) == 2


# --- registry failures ---


def test_registry_down_unavailable(release_key: PrivateKey) -> None:
    host = f"127.0.0.1:{closed_port()}"
    verifier = make_verifier([host])
    policy = SignaturePolicy("images", 1, parse_image_signature_policy(
        policy_document({"release": release_key}, {f"{host}/donkeycar/*": ["release"]})))

    error = failure(verifier, f"{host}/donkeycar/car@sha256:{'3' * 64}", policy)

    assert error.code == "registry-unavailable"
    assert host in error.message


def test_hanging_registry_times_out_by_deadline(release_key: PrivateKey) -> None:
    with HangingServer() as server:
        verifier = make_verifier([server.host])
        policy = SignaturePolicy("images", 1, parse_image_signature_policy(
            policy_document({"release": release_key}, {f"{server.host}/donkeycar/*": ["release"]})))
        started = time.monotonic()

        with pytest.raises(ImageSignatureError) as raised:
            verifier.verify(f"{server.host}/donkeycar/car@sha256:{'4' * 64}", policy,
                            Deadline.after(1.0))

        elapsed = time.monotonic() - started
    assert raised.value.code == "registry-timeout"
    assert elapsed < 3.0


def test_checker_returns_by_deadline(registry: Registry, verifier: CosignVerifier,
                                     policy: SignaturePolicy, release_key: PrivateKey) -> None:
    image = registry.push_image(CAR)
    registry.sign_simple(image, release_key)
    with HangingServer() as server:
        hanging_reference = f"{server.host}/donkeycar/car@sha256:{'5' * 64}"
        both = SignaturePolicy("images", 1, parse_image_signature_policy(policy_document(
            {"release": release_key},
            {f"{registry.host}/donkeycar/*": ["release"], f"{server.host}/donkeycar/*": ["release"]},
        )))
        checker = ImageSignatureChecker(make_verifier([registry.host, server.host]), threads=4)
        started = time.monotonic()

        results = checker.check([image.pinned, hanging_reference, image.pinned], both,
                                Deadline.after(1.0))

        elapsed = time.monotonic() - started
        checker.shutdown()
    assert list(results) == [image.pinned, hanging_reference]
    assert isinstance(results[image.pinned], VerifiedImage)
    hanging = results[hanging_reference]
    assert isinstance(hanging, ImageSignatureError)
    assert hanging.code == "registry-timeout"
    assert elapsed < 3.0


def test_resolve_digest_of_tag(registry: Registry) -> None:
    from verifier.registry import parse_image_reference

    image = registry.push_image(CAR, tag="resolve-me")
    client = RegistryClient(plain_http_registries=[registry.host])

    found = client.resolve_digest(parse_image_reference(image.tagged), Deadline.after(5))

    assert found == image.digest
    assert client.resolve_digest(parse_image_reference(f"{image.repository}:absent"),
                                 Deadline.after(5)) is None


def test_referrers_fallback_lists_bundle(registry: Registry, release_key: PrivateKey) -> None:
    from verifier.registry import parse_image_reference

    image = registry.push_image(CAR)
    referrer = registry.sign_bundle(image, release_key)
    client = RegistryClient(plain_http_registries=[registry.host])

    found = client.list_referrers(parse_image_reference(image.pinned), image.digest,
                                  Deadline.after(5))

    assert [descriptor.digest for descriptor in found] == [referrer]
    assert found[0].artifact_type == "application/vnd.dev.sigstore.bundle.v0.3+json"


def test_image_reference_normalisation() -> None:
    from verifier.registry import parse_image_reference

    assert parse_image_reference("nginx").repository == "docker.io/library/nginx"
    assert parse_image_reference("index.docker.io/library/nginx:1").repository == (
        "docker.io/library/nginx")
    assert parse_image_reference("donkeycar/car:4").repository == "docker.io/donkeycar/car"
    reference = parse_image_reference("127.0.0.1:5000/donkeycar/car:4.5@sha256:" + "a" * 64)
    assert reference.registry == "127.0.0.1:5000"
    assert reference.path == "donkeycar/car"
    assert reference.tag == "4.5"
    assert reference.digest == "sha256:" + "a" * 64
