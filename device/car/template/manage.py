#!/usr/bin/env python3
"""Drive this DonkeyCar car headless with the simulated camera and the linear pilot.

Usage:
    manage.py drive [--rate-hz=<hz>] [--max-loops=<n>] [--report-every=<n>]

Options:
    --rate-hz=<hz>       Drive loop frequency in Hz (default: DRIVE_LOOP_HZ of config.py).
    --max-loops=<n>      Stop after this many loops (default: run until SIGTERM or SIGINT).
    --report-every=<n>   Loops between two status lines (default: REPORT_EVERY_LOOPS).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from docopt import docopt

from device.car.app import CarError, run_car
from device.car.parts import PilotModelError
from edgetrust.logs import configure_logging

CAR_DIR = Path(__file__).resolve().parent


def main() -> int:
    arguments = docopt(__doc__)
    try:
        rate_hz = _positive(arguments["--rate-hz"], float, "--rate-hz")
        max_loops = _positive(arguments["--max-loops"], int, "--max-loops")
        report_every = _positive(arguments["--report-every"], int, "--report-every")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    configure_logging("INFO")
    try:
        run_car(CAR_DIR, rate_hz=rate_hz, max_loops=max_loops, report_every=report_every)
    except (CarError, PilotModelError) as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str | None, kind: type[int] | type[float], option: str) -> Any:
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{option} is {text!r}, expected a positive {kind.__name__}") from None
    if value <= 0:
        raise ValueError(f"{option} is {text!r}, expected a positive {kind.__name__}")
    return value


if __name__ == "__main__":
    sys.exit(main())
