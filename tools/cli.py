"""The ``afc`` command: one entry point, one subcommand group per concern.

Each group lives in its own module and is attached here, so ``afc --help`` is the map of
everything an operator can do.
"""

from __future__ import annotations

import sys

import click

from firmware.core.errors import CoreError


class AfcGroup(click.Group):
    """Every failure ends as the contract promises: one line on stderr, non-zero exit.

    Click's own usage errors normally print a usage block; the core's errors would be a
    traceback. Neither helps a field technician reading a log line, so both are folded into
    ``afc: error: <what to do>``.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort:
            click.echo("afc: error: aborted", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"afc: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"afc: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except CoreError as exc:
            click.echo(f"afc: error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"afc: error: {exc}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=AfcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="afc-edge")
def main() -> None:
    """afc-edge: fare collection and field-device edge software.

    Validators, bayi top-up terminals and camera-site monitors run the commands below; test
    rigs run the same commands against emulated readers and cards.
    """


def _register() -> None:
    from tools.agent_cmd import agent
    from tools.apps_cmd import topup, validator
    from tools.bench import bench
    from tools.bundle_cmd import bundle
    from tools.camera_cmd import camera
    from tools.card_cmd import card
    from tools.center_cmd import center
    from tools.demo import demo
    from tools.device_cmd import device
    from tools.fleet_cmd import fleet
    from tools.fleet_sim_cmd import fleet as fleet_sim
    from tools.journal_cmd import journal
    from tools.keys_cmd import keys
    from tools.sim_cmd import sim

    sim.add_command(center)
    sim.add_command(camera)
    sim.add_command(fleet_sim)
    main.add_command(agent)
    main.add_command(bundle)
    main.add_command(card)
    main.add_command(device)
    main.add_command(fleet)
    main.add_command(journal)
    main.add_command(keys)
    main.add_command(sim)
    main.add_command(bench)
    main.add_command(demo)
    main.add_command(validator)
    main.add_command(topup)


_register()

if __name__ == "__main__":
    main()
