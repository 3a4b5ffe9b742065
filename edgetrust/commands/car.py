"""``edgetrust car``: drive the simulated DonkeyCar car headless, or create a car directory.

Driving needs the ``demo`` extra (donkeycar 5.3.0), imported only when the car runs, because
``import donkeycar`` prints a banner. ``edgetrust car init`` works without it.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgetrust.commands.common import config_option, settings_from


@click.group("car", invoke_without_command=True)
@click.option("--car-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Car directory made by `edgetrust car init` (manage.py, config.py, models/).")
@click.option("--rate-hz", type=click.FloatRange(min=0.1, max=1000),
              help="Drive loop frequency in Hz (default: DRIVE_LOOP_HZ of the car's config.py, 20 in the "
                   "template).")
@click.option("--max-loops", type=click.IntRange(min=1),
              help="Stop after this many loops (default: run until SIGTERM or SIGINT).")
@click.option("--report-every", type=click.IntRange(min=1),
              help="Loops between two status lines (default: REPORT_EVERY_LOOPS of config.py).")
@config_option
@click.pass_context
def car_group(ctx: click.Context, car_dir: Path | None, rate_hz: float | None, max_loops: int | None,
              report_every: int | None, config_file: Path | None) -> None:
    """Drive the car in --car-dir until SIGTERM or SIGINT, or --max-loops loops.

    The car is a DonkeyCar Vehicle with a simulated camera, a linear pilot loaded from the car
    directory, and a drive log. It prints one status line every --report-every loops and exits
    0 after a clean shutdown that ran every part's shutdown.
    """
    if ctx.invoked_subcommand is not None:
        return
    if car_dir is None:
        raise click.UsageError("--car-dir is required to drive; create one with `edgetrust car init DIR`")
    settings_from(config_file)

    from device.car.app import CarError, run_car
    from device.car.parts import PilotModelError

    try:
        run_car(car_dir, rate_hz=rate_hz, max_loops=max_loops, report_every=report_every)
    except (CarError, PilotModelError) as error:
        raise click.ClickException(error.message) from None


@car_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init_command(directory: Path) -> None:
    """Create a car directory DIRECTORY from the template: manage.py, config.py, myconfig.py and
    models/pilot.json."""
    from device.car import CarDirectoryError, init_car_dir

    try:
        created = init_car_dir(directory)
    except CarDirectoryError as error:
        raise click.ClickException(error.message) from None
    for path in created:
        click.echo(f"created {path}")
    click.echo(f"drive it with: edgetrust car --car-dir {directory}")
