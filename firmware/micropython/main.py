"""Entry point on both ports.

ESP32: copied to the root of the flash with ``afcsite/``, ``lib/umqtt/simple.py``,
``identity.json`` and ``config.json``; MicroPython runs it at boot. An unexpected exception
is printed and the board resets (after 5 s, so a technician on the serial console can
interrupt it).

Unix port (tests, rigs)::

    micropython firmware/micropython/main.py --flash DIR [--sensors FILE] [--cycles N]
                                             [--measure-alloc]

``--cycles N`` stops after N probe cycles and logs a ``bench`` line (``afc sim camera
bench``); ``--measure-alloc`` counts what the last of them allocates, with the GC off.
"""

import sys

if sys.platform == "linux":
    _here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    for _p in (_here, _here + "/lib"):
        if _p not in sys.path:
            sys.path.append(_p)
    from afcsite import app
    from afcsite.hal_unix import Hal

    app.main(Hal(sys.argv))
else:
    import time

    import machine

    from afcsite import app
    from afcsite.hal_esp32 import Hal

    try:
        app.main(Hal())
    except Exception as e:  # last resort on the device: log and reset
        sys.print_exception(e)
        time.sleep(5)
        machine.reset()
