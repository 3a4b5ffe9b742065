"""``edgetrust guard`` as a real process against the fake trust server on 127.0.0.1.

The workload is a small Python script that records each start and each SIGTERM in files, so
the tests see what the guard did to it. Waits have generous deadlines and assert no timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.device.test_guard_server import (
    DEADLINE,
    DEVICE_ID,
    TOKEN,
    FakeTrustServer,
    verdict,
    wait_for,
)

WORKLOAD = """\
import os, signal, sys, time
from pathlib import Path

state, mode = Path(sys.argv[1]), sys.argv[2]
with (state / "runs").open("a") as runs:
    runs.write(f"{os.getpid()}\\n")

def on_sigterm(signal_number, frame):
    with (state / "signals").open("a") as signals:
        signals.write(f"SIGTERM {os.getpid()}\\n")
    if mode != "ignore-sigterm":
        sys.exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
if mode.startswith("exit-"):
    sys.exit(int(mode.removeprefix("exit-")))
while True:
    time.sleep(0.05)
"""

# Settings that make the guard retry and reread quickly enough for a test.
FAST_GUARD = {
    "EDGETRUST_GUARD_RETRY_INITIAL": "0.2",
    "EDGETRUST_GUARD_RETRY_MAX": "1",
    "EDGETRUST_GUARD_REREAD_INTERVAL": "1",
    "EDGETRUST_GUARD_RESTART_DELAY": "0.3",
    "EDGETRUST_GUARD_REQUEST_TIMEOUT": "5",
    "EDGETRUST_GUARD_STREAM_IDLE_TIMEOUT": "5",
}


@dataclass
class GuardProcess:
    """A running ``edgetrust guard`` whose output goes to ``log_path``."""

    process: subprocess.Popen[bytes]
    log_path: Path
    state: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = DEADLINE) -> None:
        wait_for(lambda: text in self.log(), f"{text!r} in the guard's log", timeout)

    def runs(self) -> list[int]:
        path = self.state / "runs"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def sigterms(self) -> list[str]:
        path = self.state / "signals"
        return path.read_text().splitlines() if path.exists() else []

    def wait_for_runs(self, count: int) -> None:
        wait_for(lambda: len(self.runs()) >= count, f"{count} start(s) of the workload")

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the guard did not exit; its log:\n{self.log()}") from None

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class GuardFactory:
    tmp_path: Path
    server_url: str
    started: list[GuardProcess] = field(default_factory=list)

    def start(self, *, mode: str = "stop-on-sigterm", restart: bool = False, grace_period: float = 1.0,
              token: str = TOKEN, env: dict[str, str] | None = None,
              workload: list[str] | None = None) -> GuardProcess:
        """Start the guard over ``workload``, by default the WORKLOAD script in ``mode``."""
        number = len(self.started) + 1
        state = self.tmp_path / f"workload-{number}"
        state.mkdir()
        script = self.tmp_path / "workload.py"
        script.write_text(WORKLOAD)
        token_file = self.tmp_path / f"token-{number}"
        token_file.write_text(token + "\n")
        if workload is None:
            workload = [sys.executable, str(script), str(state), mode]
        command = [
            sys.executable, "-m", "edgetrust", "guard", "--device", DEVICE_ID, "--server", self.server_url,
            "--token-file", str(token_file), "--grace-period", str(grace_period),
            "--restart" if restart else "--no-restart", "--", *workload,
        ]
        log_path = self.tmp_path / f"guard-{number}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=guard_environment(self.tmp_path, env))
        guard = GuardProcess(process, log_path, state)
        self.started.append(guard)
        return guard

    def cleanup(self) -> None:
        for guard in self.started:
            if guard.process.poll() is None:
                guard.process.kill()
                guard.process.wait()
            for pid in guard.runs():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def guard_environment(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment without edgetrust settings, plus fast guard settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGETRUST_")}
    env.update(FAST_GUARD)
    env["EDGETRUST_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra or {})
    return env


@pytest.fixture
def trust_server() -> Iterator[FakeTrustServer]:
    server = FakeTrustServer().start()
    yield server
    server.stop()


@pytest.fixture
def guards(tmp_path: Path, trust_server: FakeTrustServer) -> Iterator[GuardFactory]:
    factory = GuardFactory(tmp_path, trust_server.url)
    yield factory
    factory.cleanup()


# --- starting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["unknown", "untrusted"])
def test_guard_waits_while_not_trusted(guards: GuardFactory, trust_server: FakeTrustServer,
                                       status: str) -> None:
    if status == "untrusted":
        trust_server.set_verdict(verdict("untrusted", codes=("ima-digest-not-allowed",)))
    guard = guards.start()

    guard.wait_for_log(f"verdict {status}")
    wait_for(lambda: trust_server.verdict_reads >= 3, "three reads of the current verdict")

    assert guard.runs() == []
    assert guard.terminate() == 0
    assert guard.runs() == []


def test_guard_starts_command_when_trusted(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    guard = guards.start()
    guard.wait_for_log("verdict unknown")
    trusted = verdict("trusted")

    trust_server.set_verdict(trusted)

    guard.wait_for_runs(1)
    guard.wait_for_log(f"started CMD (pid {guard.runs()[0]}, run 1): device trusted "
                       f"(verdict_id {trusted['verdict_id']})")
    assert alive(guard.runs()[0])


def test_guard_logs_device_id_on_every_line(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start()
    guard.wait_for_runs(1)

    assert guard.terminate() == 0

    lines = [line for line in guard.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert f"[device={DEVICE_ID}]" in line, line


def test_guard_rejected_token_never_starts(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(token="not-the-token")

    guard.wait_for_log("check the API token")
    wait_for(lambda: trust_server.rejected_tokens >= 3, "three rejected requests")

    assert guard.runs() == []


# --- stopping -----------------------------------------------------------------------------------


def test_guard_stops_command_on_untrusted(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start()
    guard.wait_for_runs(1)
    pid = guard.runs()[0]
    untrusted = verdict("untrusted", codes=("ima-digest-not-allowed", "pcr-mismatch"))

    trust_server.set_verdict(untrusted)

    guard.wait_for_log(f"stopping CMD (pid {pid}): verdict untrusted (reasons: ima-digest-not-allowed, "
                       f"pcr-mismatch; verdict_id {untrusted['verdict_id']})")
    guard.wait_for_log(f"CMD (pid {pid}) stopped with status 0")
    assert guard.sigterms() == [f"SIGTERM {pid}"]
    assert not alive(pid)
    assert guard.process.poll() is None


def test_guard_kills_command_after_grace_period(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(mode="ignore-sigterm", grace_period=1.0)
    guard.wait_for_runs(1)
    pid = guard.runs()[0]

    trust_server.set_verdict(verdict("untrusted", codes=("quote-signature-invalid",)))

    guard.wait_for_log(f"CMD (pid {pid}) ignored SIGTERM for 1.0 s; killed it with SIGKILL")
    assert guard.sigterms() == [f"SIGTERM {pid}"]
    assert not alive(pid)


def test_guard_stops_command_at_expiry(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trusted = verdict("trusted", expires_in=4)
    trust_server.set_verdict(trusted)
    guard = guards.start()
    guard.wait_for_runs(1)
    pid = guard.runs()[0]

    guard.wait_for_log(f"stopping CMD (pid {pid}): verdict {trusted['verdict_id']} expired at "
                       f"{trusted['expires_at']} with no newer verdict")
    guard.wait_for_log(f"CMD (pid {pid}) stopped with status 0")

    assert guard.sigterms() == [f"SIGTERM {pid}"]
    assert len(trust_server.history) == 1


def test_guard_stops_at_expiry_when_unreachable(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trusted = verdict("trusted", expires_in=6)
    trust_server.set_verdict(trusted)
    guard = guards.start()
    guard.wait_for_runs(1)
    pid = guard.runs()[0]

    trust_server.stop()

    guard.wait_for_log("cannot reach the trust API")
    guard.wait_for_log(f"stopping CMD (pid {pid}): verdict {trusted['verdict_id']} expired")
    guard.wait_for_log(f"CMD (pid {pid}) stopped with status 0")
    assert guard.sigterms() == [f"SIGTERM {pid}"]
    assert guard.process.poll() is None


def test_guard_sigterm_stops_command_exits_zero(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start()
    guard.wait_for_runs(1)
    pid = guard.runs()[0]

    status = guard.terminate()

    assert status == 0
    assert guard.sigterms() == [f"SIGTERM {pid}"]
    assert not alive(pid)
    assert "the guard received SIGTERM" in guard.log()


# --- the stream ---------------------------------------------------------------------------------


@pytest.mark.parametrize("replay", [True, False], ids=["server-replays", "no-replay"])
def test_guard_notices_change_while_disconnected(guards: GuardFactory, trust_server: FakeTrustServer,
                                                 replay: bool) -> None:
    trust_server.replay = replay
    trust_server.set_verdict(verdict("trusted", expires_in=3600))
    # Rereads come only from reconnects, so the test shows that a reconnect catches the change.
    guard = guards.start(env={"EDGETRUST_GUARD_REREAD_INTERVAL": "600"})
    guard.wait_for_runs(1)
    wait_for(lambda: trust_server.open_streams == 1, "the guard's stream")
    trust_server.accept_streams = False
    trust_server.drop_streams()
    wait_for(lambda: trust_server.open_streams == 0, "the stream to close")
    untrusted = verdict("untrusted", codes=("ima-digest-not-allowed",))

    trust_server.set_verdict(untrusted, event=replay)
    trust_server.accept_streams = True

    guard.wait_for_log(f"verdict_id {untrusted['verdict_id']})")
    wait_for(lambda: len(guard.sigterms()) == 1, "SIGTERM to the workload")
    assert trust_server.stream_connects[0] == ""
    assert trust_server.stream_connects[-1] == "1"


def test_guard_ignores_verdict_older_than_held(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trusted = verdict("trusted")
    trust_server.set_verdict(trusted)
    guard = guards.start()
    guard.wait_for_runs(1)
    stale = verdict("untrusted", codes=("ima-digest-not-allowed",),
                    issued_at=datetime.fromisoformat(trusted["issued_at"]) - timedelta(seconds=30))

    trust_server.set_verdict(stale, event=True)
    trust_server.set_verdict(trusted, event=False)

    guard.wait_for_log(f"ignoring untrusted verdict {stale['verdict_id']} from the stream")
    assert guard.sigterms() == []


# --- restarting and exiting ---------------------------------------------------------------------


def test_guard_restarts_command_when_trusted_again(guards: GuardFactory,
                                                   trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(restart=True)
    guard.wait_for_runs(1)
    trust_server.set_verdict(verdict("untrusted", codes=("ima-digest-not-allowed",)))
    wait_for(lambda: len(guard.sigterms()) == 1, "SIGTERM to the first run")

    trust_server.set_verdict(verdict("trusted"))

    guard.wait_for_runs(2)
    first, second = guard.runs()
    assert not alive(first)
    assert alive(second)
    guard.wait_for_log(f"started CMD (pid {second}, run 2)")


def test_guard_without_restart_keeps_command_stopped(guards: GuardFactory,
                                                     trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(restart=False)
    guard.wait_for_runs(1)
    trust_server.set_verdict(verdict("untrusted", codes=("ima-digest-not-allowed",)))
    guard.wait_for_log("CMD stays stopped because restart is off")

    trust_server.set_verdict(verdict("trusted"))

    guard.wait_for_log("the device is trusted again, but CMD stays stopped because restart is off")
    assert len(guard.runs()) == 1
    assert guard.process.poll() is None
    assert guard.terminate() == 0


def test_guard_exits_with_command_status(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(mode="exit-3")

    status = guard.wait_exit()

    assert status == 3
    assert len(guard.runs()) == 1
    assert "exited on its own with status 3; the guard exits with it" in guard.log()


def test_guard_restarts_command_that_exited(guards: GuardFactory, trust_server: FakeTrustServer) -> None:
    trust_server.set_verdict(verdict("trusted"))
    guard = guards.start(mode="exit-3", restart=True)

    guard.wait_for_runs(3)

    assert guard.process.poll() is None
    assert "exited on its own with status 3; starting it again" in guard.log()


def test_guard_missing_command_exits_127(guards: GuardFactory, trust_server: FakeTrustServer,
                                         tmp_path: Path) -> None:
    trust_server.set_verdict(verdict("trusted"))
    command = [sys.executable, "-m", "edgetrust", "guard", "--device", DEVICE_ID, "--server",
               trust_server.url, "--token", TOKEN, "--", str(tmp_path / "no-such-program")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE,
                            env=guard_environment(tmp_path))

    assert result.returncode == 127
    assert "cannot start CMD" in result.stderr


def test_guard_rejects_token_and_token_file(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "edgetrust", "guard", "--device", DEVICE_ID, "--token", "a",
               "--token-file", str(tmp_path / "t"), "--", "true"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE,
                            env=guard_environment(tmp_path))

    assert result.returncode == 2
    assert "give --token or --token-file, not both" in result.stderr
