"""A whole camera site on one machine: broker, cameras, cabinet, firmware, and a center's ear.

:class:`SiteRig` wires a real Mosquitto (:class:`simulators.broker.MosquittoBroker`, with
persistence so sessions survive a restart), a :class:`CameraFarm`, the cabinet's sensor file,
the firmware on the MicroPython unix port, and a :class:`Recorder` with a persistent session
(what the broker accepted from the site reaches it even across a broker restart). HIL tests
and ``afc sim camera site`` use it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from simulators.broker import MosquittoBroker

from .cabinet import CabinetSensors
from .camera import CameraFarm
from .firmware import SiteFirmware, require_umqtt
from .recorder import Received, Recorder
from .siteconfig import cfg_topic, sign_config, site_config


class SiteRig:
    """One site and the world around it; a context manager."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        device_id: str = "site-0001",
        key: bytes | None = None,
        cameras: int = 3,
        ring_slots: int = 48,
        timing: dict[str, int] | None = None,
        thresholds: dict[str, int] | None = None,
        fast: bool = True,
        heapsize: str | None = None,
    ) -> None:
        require_umqtt()
        self.workdir = Path(workdir)
        self.device_id = device_id
        self.key = key if key is not None else secrets.token_bytes(32)
        self.broker = MosquittoBroker(self.workdir / "broker", persistence=True)
        self.farm = CameraFarm(cameras)
        self.cabinet = CabinetSensors(self.workdir / "cabinet.json")
        self.firmware = SiteFirmware(self.workdir / "flash", sensors=self.workdir / "cabinet.json",
                                     heapsize=heapsize)
        self._ring_slots = ring_slots
        self._timing = timing
        self._thresholds = thresholds
        self._fast = fast
        self.recorder: Recorder | None = None
        self.config: dict[str, Any] = {}
        self.version = 1

    def start(self) -> SiteRig:
        try:
            self.broker.start()
            self.farm.start()
            self.recorder = Recorder(self.broker.host, self.broker.port,
                                     client_id="center-view", persistent=True).start()
            self.config = site_config(self.broker.host, self.broker.port,
                                      self.farm.config_entries(), ring_slots=self._ring_slots,
                                      timing=self._timing, thresholds=self._thresholds,
                                      fast=self._fast)
            self.firmware.provision(self.device_id, self.key, self.version, self.config)
            self.firmware.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.firmware.kill()
        if self.firmware.lines:
            (self.workdir / "firmware.log").write_text("\n".join(self.firmware.lines) + "\n")
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
        self.farm.stop()
        self.broker.stop()

    def __enter__(self) -> SiteRig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the center sees ---------------------------------------------------------------

    @property
    def rec(self) -> Recorder:
        if self.recorder is None:
            raise RuntimeError("the rig is not started")
        return self.recorder

    def mark(self) -> int:
        """A position in the received messages, for ``since=``."""
        return len(self.rec.snapshot())

    def wait_event(self, name: str, timeout: float = 10.0, **kw: Any) -> dict[str, Any]:
        return self.rec.wait_event(name, timeout, **kw)

    def events(self) -> list[dict[str, Any]]:
        """Every event received so far, each signature verified with the site's key."""
        return self.rec.events(self.key)

    def wait_cameras(self, states: dict[str, str], timeout: float = 10.0,
                     since: int = 0) -> dict[str, Any]:
        """The first telemetry (after ``since``) reporting these camera states."""

        def match(m: Received) -> bool:
            if m.leaf != "telemetry":
                return False
            cams = m.json().get("cameras", {})
            return all(cams.get(k) == v for k, v in states.items())

        return self.rec.wait_for(match, timeout, since=since).json()

    def push_config(self, config: dict[str, Any], version: int) -> bytes:
        """Publish a signed config message (retained) as the center does; the payload."""
        payload = sign_config(self.device_id, self.key, version, config)
        self.rec.publish(cfg_topic(self.device_id), payload, retain=True)
        return payload
