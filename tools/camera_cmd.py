"""``afc sim camera``: emulated cameras and cabinet sensors, and the camera-site firmware on
the MicroPython unix port.

``serve`` runs cameras (RTSP + ONVIF on loopback) with faults on demand; ``site`` runs a
whole site (broker, cameras, cabinet, firmware) for a demo or a manual test; ``sign-config``
makes the signed config message a site accepts; ``keygen`` a site key; ``bench`` prints the
heap and message-size figures of a 10-camera site.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

import click

from firmware.core.errors import CoreError


def _key_from_file(path: str) -> bytes:
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise click.ClickException(f"{path}: a site key file holds hex digits only") from None
    if len(key) < 16:
        raise click.ClickException(f"{path}: a site key is at least 16 bytes (32 hex digits)")
    return key


def _run_control(control: str | None, handler, stop: threading.Event) -> None:
    """Serve the control protocol on stdin ('-') or a Unix socket until shutdown/signal."""
    from simulators.cameras.control import UnixControlServer, serve_stream

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        if control == "-":
            def write(text: str) -> None:
                click.echo(text, nl=False)
                sys.stdout.flush()

            reader = threading.Thread(
                target=lambda: serve_stream(handler, sys.stdin.readline, write) or True,
                daemon=True)
            reader.start()
            while not stop.is_set() and reader.is_alive():
                stop.wait(0.2)
        else:
            if control:
                server = UnixControlServer(control, handler, stop.set).start()
            while not stop.is_set():
                stop.wait(0.5)
    finally:
        if server is not None:
            server.stop()
        for sig, h in previous.items():
            signal.signal(sig, h)


@click.group()
def camera() -> None:
    """Emulated KGYS/EDS/PTS cameras and cabinet sensors, and the camera-site firmware.

    \b
    Faults a camera can be given (serve/site control channel: fault ID MODE [N]):
      ok        answers promptly
      down      nothing listens (connection refused)
      slow N    answers after N ms
      clock N   its clock is N seconds off (ONVIF GetSystemDateAndTime)
      silent    accepts TCP, never answers
      garbage   answers with random bytes
    """


@camera.command("serve")
@click.option("--count", default=4, show_default=True, type=click.IntRange(1, 256),
              help="How many cameras (cam-01, cam-02, ...).")
@click.option("--cabinet", metavar="PATH", help="Also write emulated cabinet sensors to PATH "
              "(the file the firmware's unix HAL reads with --sensors).")
@click.option("--control", metavar="PATH|-", help="Control channel: a Unix socket PATH or "
              "'-' for stdin/stdout (one command per line; 'help' lists them).")
def serve(count: int, cabinet: str | None, control: str | None) -> None:
    """Serve cameras on 127.0.0.1 until SIGINT/SIGTERM (or 'shutdown' on the control).

    Prints one JSON line first: the cameras with their ports, as a site config lists them.

    \b
    Example:
      afc sim camera serve --count 10 --cabinet /tmp/cab.json --control /tmp/cams.ctl
      printf 'fault cam-03 slow 800\\ncabinet door_open=true\\n' | nc -U /tmp/cams.ctl
    """
    from simulators.cameras import CabinetSensors, CameraFarm
    from simulators.cameras.control import ControlHandler

    sensors = CabinetSensors(cabinet) if cabinet else None
    with CameraFarm(count) as farm:
        click.echo(json.dumps({"cameras": farm.config_entries(), "cabinet": cabinet}))
        sys.stdout.flush()
        _run_control(control, ControlHandler(farm, sensors), threading.Event())


@camera.command("site")
@click.option("--workdir", metavar="DIR", help="Where the broker, flash and sensor files go "
              "(default: a temporary folder, removed at exit).")
@click.option("--dev", "device_id", default="site-0001", show_default=True,
              help="The site's device id.")
@click.option("--key-file", metavar="PATH", help="The site's HMAC key (hex); default: a new "
              "random key, written to WORKDIR/site.key (mode 0600) for sign-config.")
@click.option("--cameras", default=4, show_default=True, type=click.IntRange(0, 16))
@click.option("--field-timing", is_flag=True, help="The firmware's field defaults (probes "
              "every 10 s) instead of the rig's fast timings.")
@click.option("--control", metavar="PATH|-", default="-", show_default=True,
              help="Control channel (see 'serve').")
def site(workdir: str | None, device_id: str, key_file: str | None, cameras: int,
         field_timing: bool, control: str) -> None:
    """Run a whole camera site: Mosquitto, cameras, cabinet, and the firmware on the
    MicroPython unix port. The firmware's log goes to stderr; watch the broker with
    ``mosquitto_sub -p PORT -t 'afc/v1/#' -v``.

    \b
    Example (then type 'fault cam-02 down' or 'cabinet door_open=true'):
      afc sim camera site --cameras 4
    """
    from simulators.cameras import SiteRig
    from simulators.cameras.control import ControlHandler

    key = _key_from_file(key_file) if key_file else None
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="afc-camera-site-")
    root = Path(workdir) if workdir else Path(tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    try:
        rig = SiteRig(root, device_id=device_id, key=key, cameras=cameras,
                      fast=not field_timing)
        rig.firmware.echo = lambda line: click.echo(f"site: {line}", err=True)
        if not key_file:
            key_file = str(root / "site.key")
            Path(key_file).touch(mode=0o600)
            Path(key_file).write_text(rig.key.hex() + "\n")
        with rig:
            click.echo(json.dumps({
                "broker": f"{rig.broker.host}:{rig.broker.port}", "dev": device_id,
                "key_file": key_file, "flash": str(rig.firmware.flash),
                "cabinet": str(rig.cabinet.path), "cameras": rig.farm.config_entries()}))
            sys.stdout.flush()
            _run_control(control, ControlHandler(rig.farm, rig.cabinet), threading.Event())
            rig.firmware.stop()
    finally:
        if tmp is not None:
            tmp.cleanup()


@camera.command("sign-config")
@click.option("--dev", "device_id", required=True, help="The site's device id.")
@click.option("--key-file", required=True, metavar="PATH", help="The site's HMAC key (hex).")
@click.option("--version", "version", required=True, type=click.IntRange(1, None),
              help="Config version: greater than the one the site holds.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The config object (JSON: broker, cameras, timing, thresholds).")
@click.option("--out", "out_path", metavar="PATH", help="Write the message here (default: "
              "stdout).")
@click.option("--publish", metavar="HOST:PORT", help="Also publish it, retained, on "
              "afc/v1/cfg/camera-site/DEV.")
def sign_config_cmd(device_id: str, key_file: str, version: int, in_path: str,
                    out_path: str | None, publish: str | None) -> None:
    """Sign a camera-site config message (HMAC-SHA256 with the site's key).

    The site applies it only if the signature verifies, the version is newer than its own
    and every setting is valid; otherwise it reports a cfg-rejected event with the reason.
    See docs/camera-site.md for the settings.
    """
    from simulators.cameras import Recorder, cfg_topic, sign_config

    try:
        config = json.loads(Path(in_path).read_text())
    except ValueError as exc:
        raise click.ClickException(f"{in_path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise click.ClickException(f"{in_path} must hold a JSON object")
    payload = sign_config(device_id, _key_from_file(key_file), version, config)
    if out_path:
        Path(out_path).write_bytes(payload)
    else:
        click.echo(payload.decode())
    if publish:
        host, _, port = publish.rpartition(":")
        if not host or not port.isdigit():
            raise click.UsageError("--publish wants HOST:PORT")
        with Recorder(host, int(port), client_id=f"afc-sign-{device_id}",
                      topic=cfg_topic(device_id)) as rec:
            rec.publish(cfg_topic(device_id), payload, retain=True)
        click.echo(f"published on {cfg_topic(device_id)}", err=True)


@camera.command("keygen")
@click.option("--out", "out_path", required=True, metavar="PATH",
              help="Where to write the key (hex, mode 0600; an existing file is kept).")
def keygen(out_path: str) -> None:
    """Make a per-site HMAC key (32 random bytes, hex) for identity.json and sign-config."""
    from simulators.cameras import new_key

    path = Path(out_path)
    if path.exists():
        raise click.ClickException(f"{path} exists: remove it first if you mean to replace it")
    path.touch(mode=0o600)
    path.write_text(new_key().hex() + "\n")
    click.echo(str(path))


@camera.command("bench")
@click.option("--cameras", default=10, show_default=True, type=click.IntRange(1, 16))
@click.option("--json", "as_json", is_flag=True, help="One JSON object, figure -> number.")
def bench(cameras: int, as_json: bool) -> None:
    """Heap high-water mark of a site probing N cameras, and bytes per status report.

    Runs the firmware on the unix port against emulated cameras and a real Mosquitto; the
    heap figure is the smallest -X heapsize in which it boots, connects and completes two
    probe cycles (64-bit port: an upper bound for an ESP32's 32-bit heap).
    """
    from simulators.cameras.bench import measure

    figures = measure(cameras, log=None if as_json else lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps({k: round(v, 3) for k, v in figures.items()}))
        return
    click.echo(f"afc sim camera bench ({cameras} cameras)")
    for name, value in figures.items():
        click.echo(f"  {name:<22} {value:>12,.0f}")


def main() -> None:  # pragma: no cover - ``python -m tools.camera_cmd`` for a quick try
    try:
        camera(standalone_mode=True)
    except CoreError as exc:
        click.echo(f"afc: error: {exc}", err=True)
        sys.exit(1)
