"""The registry client's anonymous bearer-token flow, through a token-checking proxy in front of
the real registry on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from flask import Flask, Response, request

from policies.image_signature import parse_image_signature_policy
from tests.support.registry import (
    Registry,
    generate_key,
    policy_document,
    registry_available,
    running_registry,
)
from tests.support.server import ServerThread, serving
from verifier.cosign import (
    CosignVerifier,
    ImageSignatureError,
    SignatureCache,
    SignaturePolicy,
)
from verifier.registry import Deadline, RegistryClient

pytestmark = pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed")

TOKEN = "anonymous-pull-token"


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with running_registry() as registry:
        yield registry


def token_proxy(registry: Registry, token_requests: list[dict[str, str]],
                scheme: str = "Bearer") -> Flask:
    """Return an app that serves /token and forwards /v2/ requests that carry the token. A
    request without it gets a 401 with a challenge of ``scheme``."""
    app = Flask("token-proxy")

    @app.get("/token")
    def token() -> Response | dict[str, object]:
        token_requests.append(dict(request.args))
        return {"token": TOKEN, "expires_in": 300}

    @app.get("/v2/<path:rest>")
    def forward(rest: str) -> Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = f"{request.host_url}token"
            challenge = (f'Bearer realm="{realm}",service="edgetrust-tests",'
                         f'scope="repository:donkeycar/car:pull"')
            if scheme != "Bearer":
                challenge = 'Basic realm="registry"'
            return Response("{}", status=401, headers={"WWW-Authenticate": challenge})
        upstream = requests.get(f"{registry.url}/v2/{rest}", params=request.args.to_dict(),
                                headers={"Accept": request.headers.get("Accept", "*/*")}, timeout=5)
        return Response(upstream.content, status=upstream.status_code,
                        content_type=upstream.headers.get("Content-Type"))

    return app


def verifier_for(server: ServerThread) -> CosignVerifier:
    client = RegistryClient(plain_http_registries=[f"127.0.0.1:{server.port}"])
    return CosignVerifier(client, SignatureCache(max_entries=10, ttl=60))


def test_anonymous_token_fetched_once(registry: Registry) -> None:
    key = generate_key()
    token_requests: list[dict[str, str]] = []
    image = registry.push_image("donkeycar/car")

    with serving(token_proxy(registry, token_requests)) as server:
        host = f"127.0.0.1:{server.port}"
        registry.sign_simple(image, key, docker_reference=f"{host}/donkeycar/car")
        policy = SignaturePolicy("images", 1, parse_image_signature_policy(
            policy_document({"release": key}, {f"{host}/donkeycar/*": ["release"]})))
        verifier = verifier_for(server)

        verified = verifier.verify(f"{host}/donkeycar/car@{image.digest}", policy, Deadline.after(10))

    assert verified.key_name == "release"
    assert token_requests == [{"scope": "repository:donkeycar/car:pull", "service": "edgetrust-tests"}]


def test_basic_challenge_access_denied(registry: Registry) -> None:
    key = generate_key()
    with serving(token_proxy(registry, [], scheme="Basic")) as server:
        host = f"127.0.0.1:{server.port}"
        policy = SignaturePolicy("images", 1, parse_image_signature_policy(
            policy_document({"release": key}, {f"{host}/donkeycar/*": ["release"]})))

        with pytest.raises(ImageSignatureError) as raised:
            verifier_for(server).verify(f"{host}/donkeycar/car@sha256:{'6' * 64}", policy,
                                        Deadline.after(10))

    assert raised.value.code == "registry-access-denied"
    assert "without credentials" in raised.value.message
