"""The README's main command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from device.emulator import missing_tools


@pytest.mark.slow
def test_demo_runs_every_step() -> None:
    if missing_tools():
        pytest.skip(f"missing {', '.join(missing_tools())}")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGETRUST_")}

    result = subprocess.run(
        [sys.executable, "-m", "edgetrust", "demo"], capture_output=True, text=True,
        env=environment, timeout=600, check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered and activated its credential" in result.stdout
    assert "403 identity-mismatch" in result.stdout
    assert "Demo finished: every step behaved as described." in result.stdout
    assert "FAILED" not in result.stdout


def test_demo_removes_its_directory(tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip(f"missing {', '.join(missing_tools())}")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGETRUST_")}
    environment["TMPDIR"] = str(tmp_path)

    subprocess.run([sys.executable, "-m", "edgetrust", "demo"], capture_output=True, text=True,
                   env=environment, timeout=600, check=False)

    assert list(tmp_path.iterdir()) == []
