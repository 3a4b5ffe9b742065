"""``edgetrust demo``."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory with logs, databases and "
              "policies.")
@click.pass_context
def demo_command(ctx: click.Context, keep: bool) -> None:
    """Run the whole flow on this machine and show each step.

    Starts the server on SQLite, a local OCI registry with a signed car image and an emulated
    device (swtpm) whose agent enrolls and measures a DonkeyCar car. Attests the device, drives
    the car under the guard, and has the rollout gate and the admission webhook check the
    image. Then it changes the car's model file and shows the verdict turn untrusted, the guard
    stop the car, and both checks deny.

    Everything binds to 127.0.0.1 and is stopped and removed at the end, also after a failure
    or Ctrl-C. Exits 0 only if every step behaved as described, 1 after a failed step and 130
    after Ctrl-C or SIGTERM.
    """
    from edgetrust.demo import run_demo

    ctx.exit(run_demo(keep=keep))
