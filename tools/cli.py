"""The ``afc`` command: one entry point, one subcommand group per concern.

Each group lives in its own module and is attached here, so ``afc --help`` is the map of
everything an operator can do.
"""

from __future__ import annotations

import sys

import click

from firmware.core.errors import CoreError


class AfcGroup(click.Group):
    """Turns the core's own errors into the one-line message and non-zero exit the contract
    promises, instead of a traceback a field technician cannot act on."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CoreError as exc:
            click.echo(f"afc: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=AfcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="afc-edge")
def main() -> None:
    """afc-edge: fare collection and field-device edge software.

    Validators, bayi top-up terminals and camera-site monitors run the commands below; test
    rigs run the same commands against emulated readers and cards.
    """


def _register() -> None:
    from tools.bench import bench
    from tools.demo import demo
    from tools.keys_cmd import keys

    main.add_command(keys)
    main.add_command(bench)
    main.add_command(demo)


_register()

if __name__ == "__main__":
    main()
