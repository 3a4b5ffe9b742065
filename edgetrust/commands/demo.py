"""``edgetrust demo``."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory with logs and databases.")
@click.pass_context
def demo_command(ctx: click.Context, keep: bool) -> None:
    """Run the whole flow on this machine: server, emulated device, enrollment.

    Everything binds to 127.0.0.1 and is removed at the end. Exits 0 only if every step
    behaved as described.
    """
    from edgetrust.demo import run_demo

    ctx.exit(run_demo(keep=keep))
