"""DonkeyCar parts of the simulated car: camera, pilot, drive log, loop counter and status line.

A part is any object with ``run(*inputs)``. ``donkeycar.vehicle.Vehicle`` calls it once per
loop with the memory channels named as its inputs and stores the return value under its
output channels. When the drive loop ends, the vehicle calls each part's ``shutdown()`` once.
This module does not import donkeycar, so it loads without the ASCII banner that ``import
donkeycar`` prints.

The pilot is a linear model over the camera frame: the frame's brightness is averaged over
``columns`` vertical strips, the strip means are centred on their mean, and steering and
throttle are each ``tanh(weights . features + bias)``, so both lie in [-1, 1] as DonkeyCar's
actuators expect.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

import numpy as np
import numpy.typing as npt

from device.errors import DeviceError

log = logging.getLogger(__name__)

MODEL_FORMAT: Final = "edgetrust-linear-pilot"
MODEL_VERSION: Final = 1
MAX_MODEL_BYTES: Final = 1024 * 1024
MAX_COLUMNS: Final = 1024

Frame = npt.NDArray[np.uint8]


class PilotModelError(DeviceError):
    """The pilot's model file is missing, unreadable or malformed; the message names the file."""

    default_code = "pilot-model-invalid"


# --- the pilot's model ------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearOutput:
    """Weights and bias of one output (steering or throttle) of the linear pilot."""

    weights: tuple[float, ...]
    bias: float

    def evaluate(self, features: npt.NDArray[np.float64]) -> float:
        return math.tanh(float(np.dot(self.weights, features)) + self.bias)


@dataclass(frozen=True)
class LinearPilotModel:
    path: Path
    columns: int
    steering: LinearOutput
    throttle: LinearOutput


def load_pilot_model(path: Path) -> LinearPilotModel:
    """Read and check a pilot model file; raise PilotModelError saying what is wrong."""
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise PilotModelError(f"pilot model {path} has {size} bytes, more than the {MAX_MODEL_BYTES} "
                                  "a linear pilot needs; check that it is the right file")
        unverified = json.loads(path.read_bytes())
    except OSError as error:
        raise PilotModelError(f"cannot read pilot model {path}: {error.strerror}") from None
    except ValueError as error:
        raise PilotModelError(f"pilot model {path} is not valid JSON: {error}") from None
    return parse_pilot_model(unverified, path)


def parse_pilot_model(unverified: object, path: Path) -> LinearPilotModel:
    """Check the form of a decoded pilot model file; ``path`` is only named in errors."""
    document = _require_object(unverified, path, "the file")
    if document.get("format") != MODEL_FORMAT or document.get("version") != MODEL_VERSION:
        raise PilotModelError(f"pilot model {path} has format {document.get('format')!r} version "
                              f"{document.get('version')!r}, expected {MODEL_FORMAT!r} version "
                              f"{MODEL_VERSION}")

    model_input = _require_object(document.get("input"), path, "'input'")
    columns = model_input.get("columns")
    if isinstance(columns, bool) or not isinstance(columns, int) or not 1 <= columns <= MAX_COLUMNS:
        raise PilotModelError(f"pilot model {path}: 'input.columns' is {columns!r}, expected an integer "
                              f"from 1 to {MAX_COLUMNS}")

    return LinearPilotModel(
        path=path,
        columns=columns,
        steering=_linear_output(document.get("steering"), columns, path, "steering"),
        throttle=_linear_output(document.get("throttle"), columns, path, "throttle"),
    )


def _require_object(value: object, path: Path, field_name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PilotModelError(f"pilot model {path}: {field_name} is {type(value).__name__}, expected a JSON "
                              "object")
    return value


def _linear_output(value: object, columns: int, path: Path, name: str) -> LinearOutput:
    output = _require_object(value, path, repr(name))
    weights = output.get("weights")
    if not isinstance(weights, list) or len(weights) != columns:
        count = len(weights) if isinstance(weights, list) else type(weights).__name__
        raise PilotModelError(f"pilot model {path}: '{name}.weights' has {count} items, expected a list "
                              f"of {columns} numbers (one per column of input.columns)")
    for index, weight in enumerate(weights):
        _require_finite(weight, path, f"{name}.weights[{index}]")
    bias = _require_finite(output.get("bias"), path, f"{name}.bias")
    return LinearOutput(tuple(float(weight) for weight in weights), bias)


def _require_finite(value: object, path: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PilotModelError(f"pilot model {path}: '{field}' is {value!r}, expected a finite number")
    return float(value)


# --- parts ------------------------------------------------------------------------------------


class SimulatedCamera:
    """Camera part: frames of a dark road with one bright lane marking that sweeps left and right.

    Output: ``cam/image_array``, a ``height`` x ``width`` x 3 uint8 array, as DonkeyCar's
    cameras produce. The marking crosses the frame and back every ``period_loops`` frames.
    """

    def __init__(self, width: int, height: int, period_loops: int) -> None:
        self.width = width
        self.height = height
        self.period_loops = period_loops
        self.frames = 0
        self.stopped = False
        self._marking_width = max(1, width // 10)

    def run(self) -> Frame:
        phase = 2 * math.pi * self.frames / self.period_loops
        self.frames += 1
        left = round((self.width - self._marking_width) * (1 + math.sin(phase)) / 2)
        frame = np.full((self.height, self.width, 3), 40, dtype=np.uint8)
        frame[:, left:left + self._marking_width, :] = 220
        return frame

    def shutdown(self) -> None:
        self.stopped = True
        log.info("camera stopped after %d frames", self.frames)


class LinearPilot:
    """Pilot part: input ``cam/image_array``, outputs ``pilot/angle`` and ``pilot/throttle``."""

    def __init__(self, model: LinearPilotModel) -> None:
        self.model = model
        self.stopped = False

    def run(self, frame: Frame | None) -> tuple[float, float]:
        if frame is None:
            return 0.0, 0.0
        features = self.features(frame)
        return self.model.steering.evaluate(features), self.model.throttle.evaluate(features)

    def features(self, frame: Frame) -> npt.NDArray[np.float64]:
        gray = frame.astype(np.float64).mean(axis=2) / 255.0
        strips = np.array_split(gray, self.model.columns, axis=1)
        means = np.array([strip.mean() for strip in strips])
        centred: npt.NDArray[np.float64] = means - means.mean()
        return centred

    def shutdown(self) -> None:
        self.stopped = True
        log.info("pilot %s unloaded", self.model.path)


class LoopCounter:
    """Part that outputs ``car/loop``, the number of the current loop, starting at 1."""

    def __init__(self) -> None:
        self.loops = 0

    def run(self) -> int:
        self.loops += 1
        return self.loops


class DriveLog:
    """Drive-log part: appends one JSON line per loop with steering and throttle to ``path``.

    Inputs: ``car/loop``, ``pilot/angle``, ``pilot/throttle``. The log starts with a ``start``
    record and ends with a ``shutdown`` record written by :meth:`shutdown`.
    """

    def __init__(self, path: Path, model_path: Path) -> None:
        self.path = path
        self.records = 0
        self.stopped = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._write({"event": "start", "time": _now(), "pilot_model": str(model_path)})

    def run(self, loop: int, angle: float, throttle: float) -> None:
        self.records += 1
        self._write({"loop": loop, "time": _now(), "steering": round(angle, 4),
                     "throttle": round(throttle, 4)})

    def shutdown(self) -> None:
        self._write({"event": "shutdown", "time": _now(), "loops": self.records})
        self._file.close()
        self.stopped = True
        log.info("drive log %s closed after %d records", self.path, self.records)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


class StatusLine:
    """Part that prints one status line every ``every`` loops to ``out``."""

    def __init__(self, every: int, out: TextIO) -> None:
        self.every = every
        self.out = out

    def run(self, loop: int, angle: float, throttle: float) -> None:
        if loop % self.every == 0:
            print(f"loop {loop}: steering {angle:+.3f} throttle {throttle:+.3f}", file=self.out, flush=True)


class _Vehicle(Protocol):
    on: bool


class StopSwitch:
    """Part that ends the drive loop once :meth:`request` was called, from a signal handler or not.

    ``Vehicle.start`` sets ``on`` to True when it begins, so a request that arrives before the
    loop starts would be lost without this part, which clears ``on`` again in the first loop.
    """

    def __init__(self) -> None:
        self.vehicle: _Vehicle | None = None
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason
        if self.vehicle is not None:
            self.vehicle.on = False

    def run(self) -> None:
        if self.reason is not None and self.vehicle is not None:
            self.vehicle.on = False


def _now() -> str:
    return datetime.now(UTC).isoformat()
