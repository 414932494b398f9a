"""The ``meterlink`` command.

Subcommands of other packages (the simulator's ``sim``) plug in through the
``meterlink.commands`` entry-point group, so the gateway never imports them.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click

from .codec import decode, encode
from .meters import discover, read, relay, time_sync, write
from .service import commands, gateway, notice, tariff, topup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meterlink")
def cli() -> None:
    """meterlink: DL/T 645 prepaid-meter gateway and meter-fleet simulator."""


for _command in (decode, encode, read, write, relay, discover, time_sync, gateway, topup, tariff, commands, notice):
    cli.add_command(_command)


def _load_plugins() -> None:
    for ep in entry_points(group="meterlink.commands"):
        if ep.name not in cli.commands:
            cli.add_command(ep.load(), ep.name)


def main() -> None:
    """Entry point of the ``meterlink`` console script."""
    _load_plugins()
    cli()
