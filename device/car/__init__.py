"""The DonkeyCar car app that the guard runs: a headless vehicle with simulated parts.

``device.car.app`` builds and drives the vehicle and needs the ``demo`` extra (donkeycar
5.3.0). This module only creates car directories from ``template/`` and imports neither
donkeycar nor numpy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

from device.errors import DeviceError

TEMPLATE_DIR: Final = Path(__file__).resolve().parent / "template"
# Files of a car directory, relative to it, in the order `edgetrust car init` lists them.
TEMPLATE_FILES: Final = ("manage.py", "config.py", "myconfig.py", "models/pilot.json")


class CarDirectoryError(DeviceError):
    """A car directory cannot be created; the message names the path."""

    default_code = "car-directory-invalid"


def init_car_dir(target: Path) -> list[Path]:
    """Copy the template car into ``target``, which must be missing or empty; return the files created."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CarDirectoryError(f"{target} exists and is not an empty directory; choose a new path")

    created = []
    for name in TEMPLATE_FILES:
        source = TEMPLATE_DIR / name
        if not source.is_file():
            raise CarDirectoryError(f"the car template file {source} is missing; reinstall edgetrust")
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        created.append(destination)
    return created
