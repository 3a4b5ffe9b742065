"""``edgetrust guard`` against the real trust API (``edgetrust.app.create_app``) on 127.0.0.1.

Verdicts are written to a migrated SQLite database the way the poller stores them, with the
trust API tests' helpers, and reach the guard through the real verdict route and stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from edgetrust.db import make_engine, upgrade
from tests.device.test_guard import GuardFactory
from tests.device.test_guard_server import DEVICE_ID, wait_for
from tests.support.server import serving
from tests.verifier.test_trust_api import TrustEnv, add_device, make_trust_env, set_verdict


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'edgetrust.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def trust_env(engine: Engine, tmp_path: Path) -> TrustEnv:
    env = make_trust_env(engine, tmp_path, trust_stream_poll_interval=0.2, trust_stream_heartbeat=1.0)
    add_device(env.sessions, DEVICE_ID)
    return env


def test_guard_follows_real_trust_api(trust_env: TrustEnv, tmp_path: Path) -> None:
    with serving(trust_env.app) as server:
        guards = GuardFactory(tmp_path, server.url)
        try:
            guard = guards.start(token=trust_env.read_token)
            guard.wait_for_log("verdict unknown (reasons: not-attested-yet")
            assert guard.runs() == []

            trusted_id = set_verdict(trust_env.sessions, DEVICE_ID, "trusted", expires_in=600)
            guard.wait_for_runs(1)
            guard.wait_for_log(f"device trusted (verdict_id {trusted_id})")
            pid = guard.runs()[0]

            untrusted_id = set_verdict(trust_env.sessions, DEVICE_ID, "untrusted",
                                       codes=("ima-digest-not-allowed",))

            guard.wait_for_log(f"stopping CMD (pid {pid}): verdict untrusted (reasons: "
                               f"ima-digest-not-allowed; verdict_id {untrusted_id})")
            guard.wait_for_log(f"CMD (pid {pid}) stopped with status 0")
            assert guard.sigterms() == [f"SIGTERM {pid}"]
            assert "from the stream" in guard.log()
            assert guard.terminate() == 0
        finally:
            guards.cleanup()


def test_guard_real_trust_api_expiry(trust_env: TrustEnv, tmp_path: Path) -> None:
    trusted_id = set_verdict(trust_env.sessions, DEVICE_ID, "trusted", expires_in=5)

    with serving(trust_env.app) as server:
        guards = GuardFactory(tmp_path, server.url)
        try:
            guard = guards.start(token=trust_env.read_token, restart=True)
            guard.wait_for_runs(1)
            pid = guard.runs()[0]

            guard.wait_for_log(f"stopping CMD (pid {pid}): verdict {trusted_id} expired")
            guard.wait_for_log(f"CMD (pid {pid}) stopped with status 0")

            # A new passing attestation with the same stored status writes no change row, so
            # only the guard's reread of the current verdict can see it.
            renewed_id = set_verdict(trust_env.sessions, DEVICE_ID, "trusted", expires_in=600, record=False)
            guard.wait_for_runs(2)
            guard.wait_for_log(f"device trusted (verdict_id {renewed_id})")
            wait_for(lambda: len(guard.sigterms()) == 1, "exactly one SIGTERM")
        finally:
            guards.cleanup()
