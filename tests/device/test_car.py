"""The DonkeyCar car app: pilot model checks, parts, `edgetrust car init`, and the car as a process.

The process tests need donkeycar (the ``demo`` extra) and are skipped without it. The test
process never imports donkeycar itself, so its banner stays out of the test output.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from device.car import TEMPLATE_DIR, TEMPLATE_FILES, CarDirectoryError, init_car_dir
from tests.device.test_guard import guard_environment
from tests.device.test_guard_server import DEADLINE, wait_for

np = pytest.importorskip("numpy")

from device.car.parts import (  # noqa: E402 - needs numpy, checked just above
    LinearPilot,
    PilotModelError,
    SimulatedCamera,
    load_pilot_model,
    parse_pilot_model,
)

needs_donkeycar = pytest.mark.skipif(importlib.util.find_spec("donkeycar") is None,
                                     reason="donkeycar is not installed (pip install -e '.[demo]')")

TEMPLATE_MODEL = TEMPLATE_DIR / "models" / "pilot.json"


def template_model() -> dict[str, Any]:
    return json.loads(TEMPLATE_MODEL.read_text())


# --- the pilot's model --------------------------------------------------------------------------


def test_pilot_model_template_loads() -> None:
    model = load_pilot_model(TEMPLATE_MODEL)

    assert model.columns == 8
    assert len(model.steering.weights) == 8
    assert model.throttle.bias == 0.35


def _with(path: str, value: object) -> dict[str, Any]:
    document = template_model()
    target = document
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "the file is list, expected a JSON object"),
        (_with("format", "keras"),
         "has format 'keras' version 1, expected 'edgetrust-linear-pilot' version 1"),
        (_with("version", 2), "version 2, expected"),
        (_with("input", None), "'input' is NoneType, expected a JSON object"),
        (_with("input.columns", 0), "'input.columns' is 0, expected an integer from 1 to 1024"),
        (_with("input.columns", True), "'input.columns' is True"),
        (_with("steering.weights", [1.0, 2.0, 3.0]), "'steering.weights' has 3 items, expected a list of 8"),
        (_with("throttle.weights", "heavy"), "'throttle.weights' has str items"),
        (_with("steering.weights", [0.0] * 7 + ["x"]), "'steering.weights\\[7\\]' is 'x', expected a finite"),
        (_with("steering.weights", [0.0] * 7 + [math.nan]), "'steering.weights\\[7\\]' is nan"),
        (_with("throttle.bias", None), "'throttle.bias' is None, expected a finite number"),
        (_with("steering", []), "'steering' is list, expected a JSON object"),
    ],
)
def test_pilot_model_rejects_malformed(document: object, message: str) -> None:
    with pytest.raises(PilotModelError, match=message) as caught:
        parse_pilot_model(document, Path("models/pilot.json"))

    assert caught.value.code == "pilot-model-invalid"


def test_pilot_model_file_errors(tmp_path: Path) -> None:
    not_json = tmp_path / "not-json.json"
    not_json.write_text("{weights: 1}")
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (1024 * 1024 + 1))

    with pytest.raises(PilotModelError, match="is not valid JSON"):
        load_pilot_model(not_json)
    with pytest.raises(PilotModelError, match="more than the 1048576"):
        load_pilot_model(huge)
    with pytest.raises(PilotModelError, match="cannot read pilot model .*missing.json"):
        load_pilot_model(tmp_path / "missing.json")


# --- parts --------------------------------------------------------------------------------------


def test_camera_frames_sweep_marking() -> None:
    camera = SimulatedCamera(width=160, height=120, period_loops=100)

    frames = [camera.run() for _ in range(100)]

    assert frames[0].shape == (120, 160, 3)
    assert frames[0].dtype == np.uint8
    columns = [int(np.argmax(frame[0, :, 0])) for frame in frames]
    assert max(columns) - min(columns) > 100
    assert camera.frames == 100


def test_pilot_steers_towards_marking() -> None:
    pilot = LinearPilot(load_pilot_model(TEMPLATE_MODEL))
    left = np.full((120, 160, 3), 40, dtype=np.uint8)
    left[:, 0:16, :] = 220
    right = np.full((120, 160, 3), 40, dtype=np.uint8)
    right[:, 144:160, :] = 220

    steering_left, throttle_left = pilot.run(left)
    steering_right, throttle_right = pilot.run(right)

    assert steering_left < -0.2
    assert steering_right > 0.2
    assert -1 <= throttle_left <= 1
    assert -1 <= throttle_right <= 1
    assert pilot.run(None) == (0.0, 0.0)


# --- edgetrust car init -------------------------------------------------------------------------


def test_car_init_copies_template(tmp_path: Path) -> None:
    target = tmp_path / "mycar"

    made = init_car_dir(target)

    assert [path.relative_to(target).as_posix() for path in made] == list(TEMPLATE_FILES)
    for name in TEMPLATE_FILES:
        assert (target / name).read_bytes() == (TEMPLATE_DIR / name).read_bytes()


def test_car_init_rejects_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")

    with pytest.raises(CarDirectoryError, match="exists and is not an empty directory") as caught:
        init_car_dir(tmp_path)

    assert caught.value.code == "car-directory-invalid"


def test_car_init_command(tmp_path: Path) -> None:
    result = run_edgetrust(tmp_path, "car", "init", str(tmp_path / "car"))

    assert result.returncode == 0, result.stderr
    assert f"created {tmp_path / 'car' / 'models' / 'pilot.json'}" in result.stdout
    assert "donkey" not in result.stdout.lower()


# --- the car as a process -----------------------------------------------------------------------


def run_edgetrust(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetrust", *arguments], capture_output=True, text=True,
                          timeout=DEADLINE, env=guard_environment(tmp_path), cwd=tmp_path)


def drive_log(car_dir: Path) -> list[dict[str, Any]]:
    path = car_dir / "data" / "drive-log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def car_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "car"
    init_car_dir(directory)
    return directory


@needs_donkeycar
def test_car_runs_max_loops(car_dir: Path, tmp_path: Path) -> None:
    result = run_edgetrust(tmp_path, "car", "--car-dir", str(car_dir), "--max-loops", "30",
                           "--rate-hz", "100", "--report-every", "10")

    assert result.returncode == 0, result.stderr
    status_lines = [line for line in result.stdout.splitlines() if line.startswith("loop ")]
    assert [line.split(":")[0] for line in status_lines] == ["loop 10", "loop 20", "loop 30"]
    assert ("car stopped after 30 loops (loop limit reached); parts shut down: camera, pilot, drive log"
            in result.stdout)
    records = drive_log(car_dir)
    assert records[0]["event"] == "start"
    assert [record["loop"] for record in records[1:-1]] == list(range(1, 31))
    assert records[-1]["event"] == "shutdown"
    assert records[-1]["loops"] == 30


@needs_donkeycar
def test_car_sigterm_shuts_down_cleanly(car_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "car.out"
    with output.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgetrust", "car", "--car-dir", str(car_dir), "--rate-hz", "50",
             "--report-every", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=guard_environment(tmp_path), cwd=tmp_path)
    try:
        wait_for(lambda: "loop 10:" in output.read_text(), "ten loops of the car")

        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()

    text = output.read_text()
    assert returncode == 0, text
    assert "(SIGTERM); parts shut down: camera, pilot, drive log" in text
    assert "camera stopped after" in text
    records = drive_log(car_dir)
    assert records[-1]["event"] == "shutdown"
    assert records[-1]["loops"] >= 10


@needs_donkeycar
def test_car_rejects_malformed_model(car_dir: Path, tmp_path: Path) -> None:
    document = template_model()
    document["steering"]["weights"] = [1.0, 2.0, 3.0]
    (car_dir / "models" / "pilot.json").write_text(json.dumps(document))

    result = run_edgetrust(tmp_path, "car", "--car-dir", str(car_dir), "--max-loops", "5")

    assert result.returncode == 1
    assert "'steering.weights' has 3 items, expected a list of 8 numbers" in result.stderr
    assert not (car_dir / "data").exists()


@needs_donkeycar
def test_car_rejects_model_wider_than_frame(car_dir: Path, tmp_path: Path) -> None:
    (car_dir / "myconfig.py").write_text("IMAGE_W = 4\n")

    result = run_edgetrust(tmp_path, "car", "--car-dir", str(car_dir), "--max-loops", "5")

    assert result.returncode == 1
    assert "reads 8 columns, more than the 4 pixels of IMAGE_W" in result.stderr


@needs_donkeycar
def test_car_rejects_bad_config(car_dir: Path, tmp_path: Path) -> None:
    (car_dir / "myconfig.py").write_text("DRIVE_LOOP_HZ = 'fast'\n")

    result = run_edgetrust(tmp_path, "car", "--car-dir", str(car_dir), "--max-loops", "5")

    assert result.returncode == 1
    assert "DRIVE_LOOP_HZ is 'fast', expected a number from 0.1 to 1000" in result.stderr


def test_car_requires_config(tmp_path: Path) -> None:
    result = run_edgetrust(tmp_path, "car", "--car-dir", str(tmp_path))

    assert result.returncode == 1
    assert f"{tmp_path / 'config.py'} not found; create a car directory with `edgetrust car init DIR`" \
        in result.stderr


def test_car_requires_car_dir(tmp_path: Path) -> None:
    result = run_edgetrust(tmp_path, "car")

    assert result.returncode == 2
    assert "--car-dir is required" in result.stderr


@needs_donkeycar
def test_car_manage_py_drives(car_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(car_dir / "manage.py"), "drive", "--max-loops", "5",
                             "--rate-hz", "100"], capture_output=True, text=True, timeout=DEADLINE,
                            env=guard_environment(tmp_path), cwd=car_dir)

    assert result.returncode == 0, result.stderr
    assert "car stopped after 5 loops" in result.stdout
