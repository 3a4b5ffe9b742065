"""The DonkeyCar car app: a headless ``donkeycar.vehicle.Vehicle`` driven by the simulated parts.

A car directory contains ``manage.py``, ``config.py`` (read with ``donkeycar.load_config``, with
an optional ``myconfig.py`` beside it overriding it) and the pilot's model file. ``run_car``
loads the configuration and the model before the drive loop starts, so a malformed model stops
the car with a clear error instead of a traceback inside the loop. The loop runs at
``DRIVE_LOOP_HZ`` until SIGTERM or SIGINT, or until ``max_loops`` loops, and every part's
``shutdown`` runs when it ends.

``import donkeycar`` prints an ASCII banner and sets up logging, so this module imports it only
inside the functions that the car process runs.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from device.car.parts import (
    DriveLog,
    LinearPilot,
    LoopCounter,
    SimulatedCamera,
    StatusLine,
    StopSwitch,
    load_pilot_model,
)
from device.errors import DeviceError

log = logging.getLogger(__name__)

CONFIG_FILE: Final = "config.py"
MAX_IMAGE_SIDE: Final = 4096


class CarError(DeviceError):
    """The car cannot start or its drive loop failed; the message names the file or the part."""

    default_code = "car-failed"


@dataclass(frozen=True)
class CarConfig:
    """The settings of a car directory's config.py that the car app uses."""

    car_dir: Path
    drive_loop_hz: float
    image_width: int
    image_height: int
    marking_period_loops: int
    pilot_model_path: Path
    drive_log_path: Path
    report_every_loops: int


@dataclass(frozen=True)
class CarRun:
    loops: int
    stop_reason: str | None


def load_car_config(car_dir: Path) -> CarConfig:
    """Read ``car_dir/config.py`` (and ``myconfig.py``) with donkeycar; raise CarError naming a bad key."""
    config_path = car_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CarError(f"{config_path} not found; create a car directory with `edgetrust car init DIR`")
    from donkeycar.config import load_config  # prints donkeycar's banner on first import

    try:
        config = load_config(config_path=str(config_path))
    except Exception as error:  # noqa: BLE001 - config.py is Python code and may raise anything
        raise CarError(f"cannot load {config_path}: {error.__class__.__name__}: {error}") from None

    return CarConfig(
        car_dir=car_dir,
        drive_loop_hz=_number(config, "DRIVE_LOOP_HZ", config_path, minimum=0.1, maximum=1000),
        image_width=_integer(config, "IMAGE_W", config_path, 1, MAX_IMAGE_SIDE),
        image_height=_integer(config, "IMAGE_H", config_path, 1, MAX_IMAGE_SIDE),
        marking_period_loops=_integer(config, "SIM_MARKING_PERIOD_LOOPS", config_path, 2, 1_000_000),
        pilot_model_path=car_dir / _text(config, "PILOT_MODEL_PATH", config_path),
        drive_log_path=car_dir / _text(config, "DRIVE_LOG_PATH", config_path),
        report_every_loops=_integer(config, "REPORT_EVERY_LOOPS", config_path, 1, 1_000_000),
    )


def _value(config: Any, key: str, path: Path) -> Any:
    if not hasattr(config, key):
        raise CarError(f"{path} does not set {key}; copy it from the template with `edgetrust car init`")
    return getattr(config, key)


def _number(config: Any, key: str, path: Path, *, minimum: float, maximum: float) -> float:
    value = _value(config, key, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
        raise CarError(f"{path}: {key} is {value!r}, expected a number from {minimum} to {maximum}")
    return float(value)


def _integer(config: Any, key: str, path: Path, minimum: int, maximum: int) -> int:
    value = _value(config, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise CarError(f"{path}: {key} is {value!r}, expected an integer from {minimum} to {maximum}")
    return value


def _text(config: Any, key: str, path: Path) -> str:
    value = _value(config, key, path)
    if not isinstance(value, str) or not value:
        raise CarError(f"{path}: {key} is {value!r}, expected a path relative to the car directory")
    return value


@dataclass
class CarParts:
    """The parts of one car, kept so that the app can check that each one was shut down."""

    stop: StopSwitch
    camera: SimulatedCamera
    pilot: LinearPilot
    drive_log: DriveLog

    def not_shut_down(self) -> list[str]:
        stopped = {"camera": self.camera.stopped, "pilot": self.pilot.stopped,
                   "drive log": self.drive_log.stopped}
        return [name for name, done in stopped.items() if not done]


def build_vehicle(parts: CarParts, out: TextIO, report_every: int) -> Any:
    """Add the parts to a new ``donkeycar.vehicle.Vehicle`` in drive-loop order and return it."""
    from donkeycar.vehicle import Vehicle

    vehicle = Vehicle()
    parts.stop.vehicle = vehicle
    vehicle.add(parts.stop)
    vehicle.add(LoopCounter(), outputs=["car/loop"])
    vehicle.add(parts.camera, outputs=["cam/image_array"])
    vehicle.add(parts.pilot, inputs=["cam/image_array"], outputs=["pilot/angle", "pilot/throttle"])
    vehicle.add(parts.drive_log, inputs=["car/loop", "pilot/angle", "pilot/throttle"])
    vehicle.add(StatusLine(report_every, out), inputs=["car/loop", "pilot/angle", "pilot/throttle"])
    return vehicle


def install_stop_handlers(stop: StopSwitch) -> None:
    """End the drive loop after the current loop on SIGTERM or SIGINT; call from the main thread."""

    def handle(signal_number: int, _frame: object) -> None:
        stop.request(signal.Signals(signal_number).name)

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, handle)


def run_car(car_dir: Path, *, rate_hz: float | None = None, max_loops: int | None = None,
            report_every: int | None = None, out: TextIO = sys.stdout) -> CarRun:
    """Drive the car in ``car_dir`` until SIGTERM, SIGINT or ``max_loops`` loops.

    Raise CarError or PilotModelError when the car cannot start or its drive loop fails.
    """
    stop = StopSwitch()
    install_stop_handlers(stop)

    config = load_car_config(car_dir)
    model = load_pilot_model(config.pilot_model_path)
    _check_model_fits(model.columns, config)
    parts = CarParts(
        stop=stop,
        camera=SimulatedCamera(config.image_width, config.image_height, config.marking_period_loops),
        pilot=LinearPilot(model),
        drive_log=DriveLog(config.drive_log_path, model.path),
    )
    every = report_every or config.report_every_loops
    vehicle = build_vehicle(parts, out, every)
    hz = rate_hz or config.drive_loop_hz
    print(f"car {car_dir} driving at {hz:g} Hz with pilot {model.path.name}; a status line every "
          f"{every} loops", file=out, flush=True)

    result = vehicle.start(rate_hz=hz, max_loop_count=max_loops)

    return _finish(result, parts, out)


def _check_model_fits(columns: int, config: CarConfig) -> None:
    if columns > config.image_width:
        raise CarError(f"pilot model {config.pilot_model_path} reads {columns} columns, more than the "
                       f"{config.image_width} pixels of IMAGE_W")


def _finish(result: Any, parts: CarParts, out: TextIO) -> CarRun:
    # Vehicle.start returns (loops, seconds), or None after it printed the traceback of a part
    # that raised.
    if result is None:
        raise CarError("the drive loop stopped because a part raised an exception (traceback above)")
    missing = parts.not_shut_down()
    if missing:
        raise CarError(f"the drive loop ended but these parts were not shut down: {', '.join(missing)}")
    loops = int(result[0])
    reason = parts.stop.reason or "loop limit reached"
    print(f"car stopped after {loops} loops ({reason}); parts shut down: camera, pilot, drive log",
          file=out, flush=True)
    return CarRun(loops, parts.stop.reason)
