"""The ``edgetrust`` command."""

from __future__ import annotations

import click

from edgetrust import __version__
from edgetrust.commands.agent import agent_command
from edgetrust.commands.car import car_group
from edgetrust.commands.db import prune_command
from edgetrust.commands.demo import demo_command
from edgetrust.commands.evidence import evidence_group
from edgetrust.commands.gate import gate_command
from edgetrust.commands.guard import guard_command
from edgetrust.commands.nodes import nodes_group
from edgetrust.commands.policy import policy_group
from edgetrust.commands.poll import poll_command
from edgetrust.commands.server import db_group, serve_command
from edgetrust.commands.token import token_group


@click.group()
@click.version_option(__version__, prog_name="edgetrust")
def main() -> None:
    """edgetrust: remote attestation for edge-AI fleets."""


main.add_command(serve_command)
main.add_command(poll_command)
main.add_command(db_group)
db_group.add_command(prune_command)
main.add_command(evidence_group)
main.add_command(agent_command)
main.add_command(policy_group)
main.add_command(demo_command)
main.add_command(token_group)
main.add_command(nodes_group)
main.add_command(gate_command)
main.add_command(guard_command)
main.add_command(car_group)
