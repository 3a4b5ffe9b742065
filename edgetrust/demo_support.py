"""What the steps of ``edgetrust demo`` share: the run's state, printing, child processes and
calls to the server's API.

Every ``edgetrust`` child runs as ``python -m edgetrust ...`` of this interpreter, without the
``EDGETRUST_*`` variables of the caller's environment, so that no configuration meant for
another server reaches the demo. The output of a long-running child goes to
``<workdir>/<name>.log``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

from device.emulator import SwtpmProcess
from edgetrust.demo_registry import LocalRegistry, PushedImage

# The demo server attests every second, and a passing attestation keeps the device trusted for
# ten poll intervals, so a busy machine does not let a verdict expire between two of them.
POLL_INTERVAL_SECONDS = 1.0
VERDICT_LIFETIME_INTERVALS = 10
# Seconds one call to the server's API may take.
API_TIMEOUT_SECONDS = 10.0
# Seconds one short `edgetrust` command (token create, policy create, gate) may take.
COMMAND_TIMEOUT_SECONDS = 120.0
# Indentation of everything a step prints under its title.
INDENT = "      "


class DemoFailed(Exception):
    """A step did not behave as described; the message gives what was expected and seen."""


@dataclass
class DemoContext:
    """State of one demo run; every file it names lives under ``workdir``."""

    workdir: Path
    out: TextIO
    device_id: str = "demo-car-1"
    # Kubernetes node named in the demo's admission reviews, mapped to the device.
    node_name: str = "donkeycar-1"
    server_url: str = ""
    # Environment of `edgetrust serve`, which `edgetrust token create` also needs.
    server_environment: dict[str, str] = field(default_factory=dict)
    # Admin API token that the demo creates with `edgetrust token create`.
    api_token: str = ""
    # Read API token for the guard, the rollout gate and the admission webhook.
    read_token: str = ""
    swtpm: SwtpmProcess | None = None
    registry: LocalRegistry | None = None
    image: PushedImage | None = None
    # Public key (PEM) that signed the image, and the one the image-signature policy allows.
    signing_public_key: str = ""
    agent_port: int = 0
    guard: subprocess.Popen[bytes] | None = None
    # Process ids of car runs the guard started; each leads its own process group.
    car_pids: set[int] = field(default_factory=set)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ca_bundle: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "server-data"

    @property
    def car_dir(self) -> Path:
        return self.workdir / "car"

    @property
    def model_path(self) -> Path:
        return self.car_dir / "models" / "pilot.json"

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "verifier-tls"

    @property
    def read_token_file(self) -> Path:
        return self.workdir / "car-guard.token"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"


# --- printing ------------------------------------------------------------------------------------


def say(context: DemoContext, message: str) -> None:
    for line in message.splitlines() or [""]:
        print(f"{INDENT}{line}", file=context.out, flush=True)


def show_command(context: DemoContext, words: Sequence[str]) -> None:
    """Print a command line as a user would type it."""
    say(context, "$ " + " ".join(_quote(word) for word in words))


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[A-Za-z0-9_./:=@,+-]+", word) else f"'{word}'"


# --- child processes ---------------------------------------------------------------------------


def environment(values: dict[str, str]) -> dict[str, str]:
    """Return this process's environment without ``EDGETRUST_*`` variables, plus ``values``."""
    result = {key: value for key, value in os.environ.items() if not key.startswith("EDGETRUST_")}
    result.update(values)
    result.setdefault("TSS2_LOG", "all+none")
    return result


def edgetrust_command(arguments: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "edgetrust", *arguments]


def spawn(context: DemoContext, name: str, arguments: Sequence[str],
          env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``edgetrust ARGUMENTS`` with its output in ``<name>.log``, for cleanup to stop.

    The process leads a new process group, so that cleanup can stop it with its children and
    a Ctrl-C in the terminal reaches only the demo, which then stops everything in order.
    """
    with context.log_path(name).open("wb") as log_file:
        process = subprocess.Popen(edgetrust_command(arguments), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, cwd=context.workdir,
                                   start_new_session=True)
    context.processes.append(process)
    return process


def run_command(arguments: Sequence[str], env: dict[str, str],
                timeout: float = COMMAND_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    """Run ``edgetrust ARGUMENTS`` to its end and return its status and output."""
    try:
        return subprocess.run(edgetrust_command(arguments), env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DemoFailed(f"edgetrust {' '.join(arguments[:3])} did not finish in {timeout:.0f} s") from exc


def run_checked(arguments: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``edgetrust ARGUMENTS`` and raise DemoFailed unless it exits with status 0."""
    result = run_command(arguments, env)
    if result.returncode != 0:
        raise DemoFailed(f"edgetrust {' '.join(arguments[:3])} exited with status {result.returncode}, "
                         f"expected 0: {(result.stderr or result.stdout).strip()[-400:]}")
    return result


def read_log(context: DemoContext, name: str) -> str:
    try:
        return context.log_path(name).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_log(context: DemoContext, name: str, pattern: str, timeout: float,
                 process: subprocess.Popen[bytes] | None = None, *, after: int = 0) -> re.Match[str]:
    """Wait until ``<name>.log`` from offset ``after`` on matches the regular expression
    ``pattern``, and return the match. Raise DemoFailed on timeout or when ``process`` exits
    first."""
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        match = compiled.search(read_log(context, name), after)
        if match is not None:
            return match
        if process is not None and process.poll() is not None:
            raise DemoFailed(f"{name} exited with status {process.returncode} before its log "
                             f"showed {pattern!r}; see {context.log_path(name)}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"{name} did not log {pattern!r} within {timeout:.0f} s; see "
                             f"{context.log_path(name)}")
        time.sleep(0.2)


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise DemoFailed(f"{message} within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the server's API ----------------------------------------------------------------------------


def api_get(context: DemoContext, path: str, token: str | None = None) -> dict[str, Any]:
    return api_call(context, "GET", path, token=token)


def api_call(context: DemoContext, method: str, path: str, *, body: dict[str, Any] | None = None,
             token: str | None = None, expected: int = 200) -> dict[str, Any]:
    """Call the server with the admin token, or ``token`` when given. Raise DemoFailed unless
    the response has status ``expected`` and a JSON object body."""
    headers = {"Authorization": f"Bearer {token or context.api_token}"}
    response = requests.request(method, context.server_url + path, json=body, headers=headers,
                                timeout=API_TIMEOUT_SECONDS)
    if response.status_code != expected:
        raise DemoFailed(f"{method} {path} returned {response.status_code}, expected {expected}: "
                         f"{response.text[:300]}")
    result = response.json()
    if not isinstance(result, dict):
        raise DemoFailed(f"{method} {path} returned {type(result).__name__}, expected a JSON object")
    return result
