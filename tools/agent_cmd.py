"""``afc agent``: run the device's store-and-forward agent (docs/agent.md).

The lead registers :data:`agent` in ``tools/cli.py``; ``python -m edge_agent`` runs the same
command without the ``afc`` wrapper (tests start it that way and SIGKILL it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from firmware.core.errors import CoreError

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings

__all__ = ["agent", "main", "run_agent"]


def _setup_logging(settings: AgentSettings, verbose: bool) -> logging.Handler | None:
    """Log to the agent's rotated file (what ``send-logs`` returns) and to stderr."""
    from edge_agent.logfile import LOG_FORMAT, UtcFormatter, open_log_handler

    level = logging.DEBUG if verbose else getattr(logging, settings.log.level.upper())
    root = logging.getLogger()
    root.setLevel(level)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(UtcFormatter(LOG_FORMAT))
    root.addHandler(stderr)
    try:
        handler = open_log_handler(settings.log_path, settings.log.max_bytes,
                                   settings.log.backups)
    except OSError as exc:
        logging.getLogger("afc.agent").warning(
            "log file %s cannot be opened (%s): logging to stderr only", settings.log_path, exc)
        return None
    root.addHandler(handler)
    # paho's own chatter stays at warnings unless asked for.
    logging.getLogger("afc.agent.mqtt").setLevel(logging.DEBUG if verbose else logging.WARNING)
    return handler


def run_agent(config: Path, *, once: bool = False, timeout: float = 60.0,
              verbose: bool = False) -> tuple[int, str | None]:
    """Load the settings, run the agent until it stops; ``(exit status, failure)``."""
    from edge_agent.agent import Agent
    from edge_agent.settings import load_settings

    settings = load_settings(config)
    _setup_logging(settings, verbose)
    agent = Agent(settings)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        return await agent.run(once=once, timeout_s=timeout)

    code = asyncio.run(main())
    return code, agent.failure


@click.command("agent")
@click.option("--config", "config", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="agent.toml: device id and database, keys, broker, batching, telemetry.")
@click.option("--once", is_flag=True,
              help="Connect, deliver the whole outbox (until the center acknowledges it), "
                   "flush buffered events and telemetry, then exit.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 86400),
              help="With --once: give up after this many seconds (exit status 2).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (every batch and ack).")
def agent(config: Path, once: bool, timeout: float, verbose: bool) -> None:
    """Run the edge agent: forward the journal, events and telemetry; apply signed
    configuration; answer signed commands.

    \b
    Runs until SIGTERM/SIGINT (clean shutdown: status "offline" is published). Exit status:
    0 done, 1 error, 2 --once could not drain in time, 75 the center asked for a restart
    (reboot-app; let the service manager restart the agent).
    \b
    Example agent.toml (see docs/agent.md for every setting):
      [device]
      id = "KNY-BUS-0042-V1"
      db = "device.db"
      [identity]
      key = "device.key"
      center_public = "9f2c...64 hex digits"
      [mqtt]
      host = "broker.example"
      port = 8883
      tls_ca = "ca.pem"
      tls_cert = "device.crt"
      tls_key = "device.key.pem"
    """
    try:
        code, failure = run_agent(config, once=once, timeout=timeout, verbose=verbose)
    except CoreError as exc:
        raise click.ClickException(str(exc)) from None
    if code != 0 and failure:
        click.echo(f"afc: error: {failure}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """``python -m edge_agent``: the command with ``afc``'s one-line error contract."""
    try:
        rv = agent.main(args=argv, prog_name="python -m edge_agent", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("afc: error: aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        click.echo(f"afc: error: {exc.format_message()} (see --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"afc: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
