"""The end-to-end demonstration behind ``edgetrust demo``.

It runs the real programs as a fleet would: ``edgetrust serve`` on an embedded SQLite database,
an emulated device (swtpm provisioned with EK certificates by a local CA) and ``edgetrust
agent`` enrolling it over HTTP on 127.0.0.1. Every process and file it makes lives under one
temporary directory that is removed at the end, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

from device.emulator import EmulatorError, LocalCa, SwtpmProcess, provision_tpm_state

SERVER_START_TIMEOUT_SECONDS = 60.0
AGENT_TIMEOUT_SECONDS = 120.0
KEYLIME_API = "v2.5"


class DemoFailed(Exception):
    """A step did not behave as described; the message gives what was expected and seen."""


@dataclass
class DemoContext:
    workdir: Path
    out: TextIO
    server_url: str = ""
    # Admin API token that the demo creates with `edgetrust token create`.
    api_token: str = ""
    device_id: str = "demo-car-1"
    swtpm: SwtpmProcess | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ca_bundle: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "server-data"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[DemoContext], None]


def run_demo(out: TextIO = sys.stdout, keep: bool = False) -> int:
    """Run every step in order; return 0 only if each behaved as described."""
    steps = [
        Step("Provision an emulated TPM with EK certificates from a local CA", provision_device),
        Step("Start the server on an embedded SQLite database", start_server),
        Step("Start the device's TPM (swtpm on 127.0.0.1)", start_tpm),
        Step("Enroll the device: EK certificate, AK, credential activation", enroll_device),
        Step("Show the device as the registrar recorded it", show_registration),
        Step("Reject an identity takeover: same uuid, new AK", reject_takeover),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="edgetrust-demo-"))
    context = DemoContext(workdir=workdir, out=out)
    status = 0
    try:
        for number, step in enumerate(steps, start=1):
            print(f"[{number}/{len(steps)}] {step.title}", file=out, flush=True)
            try:
                with progress(out):
                    step.run(context)
            except (DemoFailed, EmulatorError, requests.RequestException, OSError) as exc:
                print(f"      FAILED: {exc}", file=out, flush=True)
                _print_logs(context)
                status = 1
                break
        else:
            print("Demo finished: every step behaved as described.", file=out, flush=True)
    finally:
        cleanup(context, keep=keep)
    return status


@contextmanager
def progress(out: TextIO, after_seconds: float = 1.0) -> Iterator[None]:
    """Print the elapsed time every second while a step runs longer than ``after_seconds``."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        if done.wait(after_seconds):
            return
        while not done.wait(1.0):
            print(f"      ... {time.monotonic() - started:.0f} s", file=out, flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def say(context: DemoContext, message: str) -> None:
    print(f"      {message}", file=context.out, flush=True)


def provision_device(context: DemoContext) -> None:
    ca = LocalCa.create(context.workdir / "ca")
    provisioned = provision_tpm_state(context.workdir / "device-tpm", ca)
    context.ca_bundle = ca.write_bundle(context.data_dir / "ek-ca")
    say(context, f"EK certificates: {provisioned.ek_rsa2048_certificate.name}, "
                 f"{provisioned.ek_ecc_p384_certificate.name}; CA bundle in {context.ca_bundle}")


def start_server(context: DemoContext) -> None:
    port = _free_port()
    context.server_url = f"http://127.0.0.1:{port}"
    environment = _environment(context, {
        "EDGETRUST_DATA_DIR": str(context.data_dir),
        "EDGETRUST_LISTEN_HOST": "127.0.0.1",
        "EDGETRUST_LISTEN_PORT": str(port),
    })
    server = _spawn(context, "server", ["serve"], environment)
    _wait_for(lambda: _healthy(context.server_url, server), SERVER_START_TIMEOUT_SECONDS,
              f"the server did not answer on {context.server_url}/healthz")
    say(context, f"server listening on {context.server_url}, database "
                 f"{context.data_dir / 'edgetrust.db'}")
    context.api_token = _create_admin_token(environment)
    say(context, "created the admin API token 'demo' with `edgetrust token create`")


def start_tpm(context: DemoContext) -> None:
    context.swtpm = SwtpmProcess(context.workdir / "device-tpm" / "state").start()
    say(context, f"TPM reachable with TCTI {context.swtpm.tcti}")


def enroll_device(context: DemoContext) -> None:
    result = _run_agent(context, context.workdir / "agent-state", "agent")
    if result != 0:
        raise DemoFailed(f"edgetrust agent --once exited with status {result}; expected 0")
    say(context, f"device {context.device_id} registered and activated its credential")


def show_registration(context: DemoContext) -> None:
    listing = _get(context, f"/{KEYLIME_API}/agents/")
    uuids = listing["results"].get("uuids", [])
    if context.device_id not in uuids:
        raise DemoFailed(f"registrar lists {uuids}; expected {context.device_id} among them")
    device = _get(context, f"/{KEYLIME_API}/agents/{context.device_id}")["results"]
    say(context, f"registrar lists {uuids}")
    say(context, f"regcount {device.get('regcount')}, contact {device.get('ip')}:"
                 f"{device.get('port')}, EK certificate {'present' if device.get('ekcert') else 'absent'}")


def reject_takeover(context: DemoContext) -> None:
    # A second agent state directory makes a new AK under the same EK for the same uuid.
    result = _run_agent(context, context.workdir / "intruder-state", "intruder")
    if result == 0:
        raise DemoFailed("a registration with a new AK for a known uuid was accepted")
    log_text = context.log_path("intruder").read_text(errors="replace")
    if "identity-mismatch" not in log_text:
        raise DemoFailed("the agent was rejected, but not with identity-mismatch; see "
                         f"{context.log_path('intruder')}")
    say(context, "registrar rejected the new AK with 403 identity-mismatch, as it must")


def cleanup(context: DemoContext, *, keep: bool) -> None:
    for process in reversed(context.processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    if context.swtpm is not None:
        context.swtpm.stop()
    if keep:
        print(f"Kept {context.workdir}", file=context.out)
    else:
        shutil.rmtree(context.workdir, ignore_errors=True)


def _run_agent(context: DemoContext, state_dir: Path, log_name: str) -> int:
    assert context.swtpm is not None
    environment = _environment(context, {
        "EDGETRUST_DATA_DIR": str(context.workdir / "device-data"),
        "EDGETRUST_AGENT_UUID": context.device_id,
        "EDGETRUST_AGENT_TCTI": context.swtpm.tcti,
        "EDGETRUST_AGENT_STATE_DIR": str(state_dir),
        "EDGETRUST_AGENT_REGISTRAR_URL": context.server_url,
        "EDGETRUST_AGENT_EK_TYPE": "rsa",
        "EDGETRUST_AGENT_AK_TYPE": "ecc",
    })
    process = _spawn(context, log_name, ["agent", "--once"], environment)
    try:
        return process.wait(AGENT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise DemoFailed(f"edgetrust agent did not finish in {AGENT_TIMEOUT_SECONDS:.0f} s") from exc


def _environment(context: DemoContext, values: dict[str, str]) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("EDGETRUST_")}
    environment.update(values)
    environment.setdefault("TSS2_LOG", "all+none")
    return environment


def _spawn(context: DemoContext, name: str, arguments: list[str],
           environment: dict[str, str]) -> subprocess.Popen[bytes]:
    log_file = context.log_path(name).open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgetrust", *arguments],
        stdout=log_file, stderr=subprocess.STDOUT, env=environment, cwd=context.workdir,
    )
    log_file.close()
    context.processes.append(process)
    return process


def _create_admin_token(environment: dict[str, str]) -> str:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgetrust", "token", "create", "--name", "demo", "--scope", "admin"],
            env=environment, capture_output=True, text=True, timeout=60, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoFailed("edgetrust token create did not finish in 60 s") from exc
    if result.returncode != 0:
        raise DemoFailed(f"edgetrust token create exited with status {result.returncode}: "
                         f"{result.stderr.strip()[-200:]}")
    return result.stdout.strip()


def _get(context: DemoContext, path: str) -> dict[str, Any]:
    response = requests.get(context.server_url + path, timeout=10,
                            headers={"Authorization": f"Bearer {context.api_token}"})
    if response.status_code != 200:
        raise DemoFailed(f"GET {path} returned {response.status_code}: {response.text[:200]}")
    body: dict[str, Any] = response.json()
    return body


def _healthy(url: str, server: subprocess.Popen[bytes]) -> bool:
    if server.poll() is not None:
        raise DemoFailed(f"the server exited with status {server.returncode} while starting")
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise DemoFailed(f"{message} within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _print_logs(context: DemoContext) -> None:
    for path in sorted(context.workdir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-15:]
        print(f"      --- last lines of {path.name}:", file=context.out)
        for line in lines:
            print(f"      {line}", file=context.out)
