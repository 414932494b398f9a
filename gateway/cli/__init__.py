"""The ``meterlink`` command.

Subcommands of other packages (the simulator's ``sim``) plug in through the
``meterlink.commands`` entry-point group, so the gateway never imports them.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

from .codec import decode, encode
from .meters import discover, read, relay, time_sync, write
from .service import commands, gateway, notice, tariff, topup


class _Meterlink(click.Group):
    """The command group; plug-in subcommands are imported only when they are run (or listed),
    so ``meterlink sim`` does not import the gateway's service, nor ``meterlink read`` the demo."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = _plugins().get(cmd_name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except Exception as exc:  # a broken plug-in fails alone, with one line
            raise click.ClickException(f"the {cmd_name} command cannot be loaded: {exc}") from None
        self.add_command(command, cmd_name)
        return command


@click.group(cls=_Meterlink, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meterlink")
def cli() -> None:
    """meterlink: DL/T 645 prepaid-meter gateway and meter-fleet simulator."""


for _command in (decode, encode, read, write, relay, discover, time_sync, gateway, topup, tariff, commands, notice):
    cli.add_command(_command)


def _plugins() -> dict[str, EntryPoint]:
    """Subcommands of other packages (``meterlink.commands`` entry points), by name."""
    return {ep.name: ep for ep in entry_points(group="meterlink.commands")}


def main() -> None:
    """Entry point of the ``meterlink`` console script."""
    cli()
