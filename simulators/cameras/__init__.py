"""Emulated cameras, cabinet sensors and a runner for the camera-site firmware.

- :mod:`.camera`: RTSP responders and ONVIF device services on loopback, with faults on
  demand (:class:`CameraFarm`);
- :mod:`.cabinet`: the cabinet's sensors as a JSON file the unix-port HAL reads
  (:class:`CabinetSensors`);
- :mod:`.firmware`: the MicroPython firmware on the unix port (:class:`SiteFirmware`);
- :mod:`.siteconfig`: site configs and their signed config message;
- :mod:`.recorder`: an MQTT subscriber that records what sites publish;
- :mod:`.rig`: all of it wired together around one site (:class:`SiteRig`).
"""

from .cabinet import CabinetSensors
from .camera import FAULTS, CameraFarm, EmulatedCamera
from .errors import CameraSimError, FirmwareError
from .firmware import SiteFirmware
from .recorder import Recorder
from .rig import SiteRig
from .siteconfig import cfg_topic, new_key, sign_config, site_config

__all__ = [
    "FAULTS",
    "CabinetSensors",
    "CameraFarm",
    "CameraSimError",
    "EmulatedCamera",
    "FirmwareError",
    "Recorder",
    "SiteFirmware",
    "SiteRig",
    "cfg_topic",
    "new_key",
    "sign_config",
    "site_config",
]
