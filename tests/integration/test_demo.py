"""The README's main command, run as a user runs it: every step, and nothing left behind after
a complete run or a Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.emulator import missing_tools
from edgetrust.demo_registry import registry_available

pytestmark = [pytest.mark.slow, pytest.mark.swtpm]

DEMO_TIMEOUT_SECONDS = 600


@pytest.fixture(autouse=True)
def _needs_tools() -> None:
    if missing_tools():
        pytest.skip(f"missing {', '.join(missing_tools())}")
    if not registry_available():
        pytest.skip("missing docker-registry")


def demo_environment(tmp_path: Path) -> dict[str, str]:
    """Return the caller's environment without EDGETRUST_* settings and with TMPDIR set to
    ``tmp_path``, so that every file and process of the demo names ``tmp_path``."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EDGETRUST_")}
    environment["TMPDIR"] = str(tmp_path)
    return environment


def processes_naming(text: str) -> list[str]:
    """Return the command lines of running processes whose command line or environment
    contains ``text``. Every child of the demo inherits TMPDIR, so it shows up here."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            process_environment = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:  # exited meanwhile, or another user's process
            continue
        if text in command_line or text in process_environment:
            found.append(f"{entry.name}: {command_line}")
    return found


def step_output(output: str, title: str) -> str:
    """Return what the demo printed under the step whose title contains ``title``."""
    match = re.search(rf"^\[\d+/\d+\] [^\n]*{re.escape(title)}[^\n]*\n(.*?)(?=^\[\d+/\d+\] |^Demo )",
                      output, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no step {title!r} in:\n{output}"
    return match.group(1)


def test_demo_runs_every_step_and_leaves_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgetrust", "demo"], capture_output=True, text=True,
        env=demo_environment(tmp_path), timeout=DEMO_TIMEOUT_SECONDS, check=False,
    )
    output = result.stdout

    assert result.returncode == 0, output + result.stderr
    assert "FAILED" not in output
    assert re.search(r"^Demo finished in \d+ s: every step behaved as described\.$", output, re.MULTILINE)
    assert "registered and activated its credential" in output
    assert "403 identity-mismatch" in output
    allowed = step_output(output, "Ask the rollout gate")
    assert "allowed: 1 of 1 targets trusted" in allowed
    assert "exit status 0" in allowed
    assert "signed by key 'demo-release'" in allowed
    untrusted = step_output(output, "the verdict turns untrusted")
    model = re.search(r"set the pilot's steering bias to 0\.5 in (\S+/car/models/pilot\.json)", untrusted)
    assert model is not None, untrusted
    assert re.search(rf"finding ima-digest-not-allowed \(error\): entry \d+: digest sha256:[0-9a-f]{{64}} "
                     rf"is not allowed for {re.escape(model.group(1))}$", untrusted, re.MULTILINE), untrusted
    denied = step_output(output, "The guard stops the car")
    assert "stopping CMD" in denied
    assert "verdict untrusted (reasons: ima-digest-not-allowed" in denied
    assert "(SIGTERM); parts shut down: camera, pilot, drive log" in denied
    assert "denied: 0 of 1 targets trusted" in denied
    assert "exit status 1" in denied
    assert "device-not-trusted: node donkeycar-1 runs device demo-car-1 whose verdict is untrusted" in denied
    assert processes_naming(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_demo_cleans_up_after_ctrl_c(tmp_path: Path) -> None:
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group.
    demo = subprocess.Popen(
        [sys.executable, "-m", "edgetrust", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=demo_environment(tmp_path), start_new_session=True,
    )
    assert demo.stdout is not None
    seen = []
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    for line in demo.stdout:
        seen.append(line)
        if "guard: started CMD" in line or time.monotonic() > deadline:
            break
    assert any("guard: started CMD" in line for line in seen), "".join(seen)

    os.killpg(demo.pid, signal.SIGINT)
    rest, _ = demo.communicate(timeout=120)

    assert demo.returncode == 130, "".join(seen) + rest
    assert "Interrupted by SIGINT; stopping everything the demo started." in rest
    assert processes_naming(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
