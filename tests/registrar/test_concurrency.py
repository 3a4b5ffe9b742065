"""Concurrent registrations of one device id leave exactly one consistent row and no 500."""

from __future__ import annotations

import base64
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.registrar.conftest import EkCas, Registrar
from tests.registrar.helpers import SoftwareDevice, activate_credential, auth_tag

THREADS = 16
DEVICE_ID = "concurrent-device"


def register_all_at_once(registrar: Registrar, bodies: list[dict[str, Any]]) -> list[requests.Response]:
    """POST every body from its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(bodies))

    def register(body: dict[str, Any]) -> requests.Response:
        with requests.Session() as session:
            barrier.wait(timeout=30)
            return session.post(f"{registrar.url}/v2.3/agents/{DEVICE_ID}", json=body, timeout=60)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(register, bodies))


def test_same_identity_concurrently(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)

    responses = register_all_at_once(registrar, [device.body()] * THREADS)

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: THREADS}, [response.text for response in responses]
    assert registrar.row_count() == 1
    row = registrar.row(DEVICE_ID)
    assert row.regcount == THREADS
    assert row.aik_tpm == device.aik_tpm
    assert row.active is False


def test_same_identity_one_challenge_pending(registrar: Registrar, ek_cas: EkCas) -> None:
    device = SoftwareDevice.create(ek_cas.issuer)
    responses = register_all_at_once(registrar, [device.body()] * THREADS)
    stored = registrar.row(DEVICE_ID).challenge_secret

    secrets = [
        activate_credential(device.ek_key, device.ek_tpm, device.aik_tpm,
                            base64.b64decode(response.json()["results"]["blob"]))
        for response in responses
    ]

    # Each registration issued its own challenge, and the one stored last is pending.
    assert len(set(secrets)) == THREADS
    assert secrets.count(stored) == 1
    response = registrar.activate(DEVICE_ID, auth_tag(stored, DEVICE_ID))
    assert response.status_code == 200
    assert registrar.row(DEVICE_ID).active is True


def test_different_identities_concurrently(registrar: Registrar, ek_cas: EkCas) -> None:
    devices = [SoftwareDevice.create(ek_cas.issuer) for _ in range(THREADS)]

    responses = register_all_at_once(registrar, [device.body() for device in devices])

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: 1, 403: THREADS - 1}, [response.text for response in responses]
    for response in responses:
        if response.status_code == 403:
            assert response.json()["results"]["error"]["code"] == "identity-mismatch"
    assert registrar.row_count() == 1

    winner = devices[[response.status_code for response in responses].index(200)]
    row = registrar.row(DEVICE_ID)
    assert row.aik_tpm == winner.aik_tpm
    assert row.ek_tpm == winner.ek_tpm
    assert row.regcount == 1
