"""``edgetrust agent`` as a subprocess, configured with EDGETRUST_* variables, against swtpm and
the real registrar on 127.0.0.1: enrollment, a registrar that starts after the agent, identity
takeover, signals and start-up errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device.identity import IDENTITY_FILE_NAME
from tests.device.conftest import TpmUnderTest, running_registrar

pytestmark = [pytest.mark.swtpm, pytest.mark.slow]

EDGETRUST = Path(sys.executable).parent / "edgetrust"
WAIT_SECONDS = 60.0


class AgentProcess:
    """``edgetrust agent`` running as a child process, with its log collected line by line."""

    def __init__(self, environment: dict[str, str], *arguments: str):
        if not EDGETRUST.exists():
            pytest.skip(f"{EDGETRUST} is missing; install the project into the venv")
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._process = subprocess.Popen(
            [str(EDGETRUST), "agent", *arguments], env=environment, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return them."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while True:
                matches = [line for line in self._lines if regex.search(line)]
                if len(matches) >= count:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._process.poll() is not None
                                      and not self._reader.is_alive()):
                    raise AssertionError(f"no {count} log lines match {pattern!r}; log:\n"
                                         + "\n".join(self._lines))
                self._changed.wait(min(remaining, 0.2))

    def send_signal(self, signal_number: int) -> None:
        self._process.send_signal(signal_number)

    def wait(self) -> int:
        try:
            status = self._process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"agent did not exit in {WAIT_SECONDS} s; log:\n{self.log}") from None
        self._reader.join(timeout=10)
        return status

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


def agent_environment(tmp_path: Path, tpm_under_test: TpmUnderTest, registrar_url: str,
                      **settings: str) -> dict[str, str]:
    """Environment for the agent: only the EDGETRUST_* variables given here, data in tmp_path."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("EDGETRUST_")}
    environment.update({
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "TSS2_LOG": "all+none",
        "EDGETRUST_AGENT_TCTI": tpm_under_test.tcti,
        "EDGETRUST_AGENT_STATE_DIR": str(tmp_path / "agent"),
        "EDGETRUST_AGENT_REGISTRAR_URL": registrar_url,
        "EDGETRUST_AGENT_RETRY_INITIAL": "0.2",
        "EDGETRUST_AGENT_RETRY_MAX": "0.5",
        # The agent API serves after enrollment: plain HTTP, since these tests have no client
        # CA, on a free port.
        "EDGETRUST_AGENT_ENABLE_MTLS": "false",
        "EDGETRUST_AGENT_CONTACT_PORT": str(closed_port()),
    })
    environment.update({f"EDGETRUST_{key.upper()}": value for key, value in settings.items()})
    return environment


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stored_uuid(tmp_path: Path) -> str:
    uuid: str = json.loads((tmp_path / "agent" / IDENTITY_FILE_NAME).read_text())["uuid"]
    return uuid


def test_agent_once_enrolls(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        agent = AgentProcess(agent_environment(tmp_path, provisioned_swtpm, registrar.url,
                                               agent_ek_type="ecc"), "--once")

        assert agent.wait() == 0, agent.log
        uuid = stored_uuid(tmp_path)
        assert registrar.device(uuid).status_code == 200

    line = agent.wait_for("registered and activated with the registrar at")[0]
    assert f"registered and activated with the registrar at {registrar.url}: uuid {uuid}, " \
           "AK name 000b" in line
    assert f"[device={uuid}]" in line
    assert "ECC NIST P-384 EK at persistent handle 0x81010016" in agent.log


def test_agent_waits_for_late_registrar(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    agent = AgentProcess(agent_environment(tmp_path, provisioned_swtpm, url), "--once")
    try:
        retries = agent.wait_for(
            rf"WARNING .*registrar at {re.escape(url)} unreachable: GET /version failed: "
            r"connection refused; retrying in \d+\.\d s", count=2)

        with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle],
                               port=port) as registrar:
            assert agent.wait() == 0, agent.log
            assert registrar.device(stored_uuid(tmp_path)).status_code == 200
    finally:
        agent.kill()

    assert "(attempt 1 failed)" in retries[0]
    assert "(attempt 2 failed)" in retries[1]
    assert f"registered and activated with the registrar at {url}" in agent.log


def test_agent_restart_reregisters(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        environment = agent_environment(tmp_path, provisioned_swtpm, registrar.url)
        first = AgentProcess(environment, "--once")
        assert first.wait() == 0, first.log

        provisioned_swtpm.swtpm.restart()
        environment["EDGETRUST_AGENT_TCTI"] = provisioned_swtpm.tcti
        second = AgentProcess(environment, "--once")
        assert second.wait() == 0, second.log

        uuid = stored_uuid(tmp_path)
        assert registrar.device(uuid).json()["results"]["regcount"] == 2
    assert "loaded the identity from" in second.log


def test_agent_new_ak_exits_nonzero(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        environment = agent_environment(tmp_path, provisioned_swtpm, registrar.url)
        first = AgentProcess(environment, "--once")
        assert first.wait() == 0, first.log
        uuid = stored_uuid(tmp_path)
        (tmp_path / "agent" / IDENTITY_FILE_NAME).unlink()

        second = AgentProcess({**environment, "EDGETRUST_AGENT_UUID": uuid}, "--once")
        status = second.wait()

    assert status == 1
    error = second.wait_for(r"ERROR .*agent failed")[0]
    assert f"[device={uuid}]" in error
    assert "[registrar-rejected]" in error
    assert "HTTP 403 (identity-mismatch:" in error
    assert "retrying" not in second.log


def test_agent_stops_on_sigterm(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        agent = AgentProcess(agent_environment(tmp_path, provisioned_swtpm, registrar.url))
        try:
            agent.wait_for("waiting for SIGTERM or SIGINT")
            agent.send_signal(signal.SIGTERM)
            assert agent.wait() == 0, agent.log
        finally:
            agent.kill()

    assert "agent stopping on SIGTERM" in agent.log


@pytest.mark.parametrize(
    ("arguments", "signal_number", "status"),
    [((), signal.SIGTERM, 0), (("--once",), signal.SIGINT, 1)],
)
def test_agent_stops_while_retrying(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                    arguments: tuple[str, ...], signal_number: int,
                                    status: int) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    agent = AgentProcess(agent_environment(tmp_path, blank_swtpm, url), *arguments)
    try:
        agent.wait_for("retrying in")
        agent.send_signal(signal_number)
        assert agent.wait() == status, agent.log
    finally:
        agent.kill()

    name = signal.Signals(signal_number).name
    assert f"agent stopped by {name} before enrollment finished" in agent.log


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"agent_ek_type": "dsa"}, "[invalid-settings]: setting agent_ek_type is 'dsa'"),
        ({"agent_registrar_url": "registrar.example"}, "setting agent_registrar_url"),
        ({"agent_tcti": "swtpm:host=127.0.0.1,port=1"},
         "[tpm-command-failed]: Esys_Initialize failed while connecting to the TPM"),
    ],
)
def test_agent_start_errors_exit_nonzero(blank_swtpm: TpmUnderTest, tmp_path: Path,
                                         settings: dict[str, str], expected: str) -> None:
    environment = agent_environment(tmp_path, blank_swtpm, "http://127.0.0.1:1", **settings)
    agent = AgentProcess(environment, "--once")

    assert agent.wait() == 1
    assert expected in agent.log


def test_agent_corrupt_identity_exits_nonzero(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    identity_file = tmp_path / "agent" / IDENTITY_FILE_NAME
    identity_file.parent.mkdir()
    identity_file.write_text("{not json")

    agent = AgentProcess(agent_environment(tmp_path, blank_swtpm, "http://127.0.0.1:1"), "--once")

    assert agent.wait() == 1
    assert f"[identity-corrupt]: identity file {identity_file} is corrupt" in agent.log
    assert identity_file.read_text() == "{not json"


def test_agent_reads_config_file(provisioned_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    assert provisioned_swtpm.ca_bundle is not None
    with running_registrar(tmp_path / "registrar", [provisioned_swtpm.ca_bundle]) as registrar:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'agent_tcti = "{provisioned_swtpm.tcti}"\n'
            f'agent_state_dir = "{tmp_path / "agent"}"\n'
            f'agent_registrar_url = "{registrar.url}"\n'
            'agent_uuid = "car-0042"\n'
            'agent_ak_type = "rsa"\n'
            'agent_contact_port = 9443\n'
        )
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith("EDGETRUST_")}
        agent = AgentProcess({**environment, "TSS2_LOG": "all+none"}, "--config", str(config),
                             "--once")

        assert agent.wait() == 0, agent.log
        results = registrar.device("car-0042").json()["results"]
        assert results["port"] == 9443


def test_cli_loads_without_tpm2_pytss(tmp_path: Path) -> None:
    """Control-plane installs lack tpm2-pytss. Every command still loads, and the agent logs
    why it cannot run."""
    program = ("import sys; sys.modules['tpm2_pytss'] = None; from edgetrust.cli import main; "
               "main(sys.argv[1:])")
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("EDGETRUST_")}
    environment["XDG_DATA_HOME"] = str(tmp_path)

    help_run = subprocess.run([sys.executable, "-c", program, "--help"], env=environment,
                              capture_output=True, text=True, timeout=60, check=False)
    agent_run = subprocess.run([sys.executable, "-c", program, "agent", "--once"],
                               env=environment, capture_output=True, text=True, timeout=60,
                               check=False)

    assert help_run.returncode == 0, help_run.stderr
    assert "agent" in help_run.stdout
    assert agent_run.returncode == 1
    assert "the agent needs tpm2-pytss and libtss2" in agent_run.stderr
