"""Simulators for test rigs, CI and the demo: virtual MIFARE cards, a PN532 reader emulator,
emulated cameras, a reference center and a fleet/scenario runner.

Everything here stands in for hardware or for the center so that the device programs can be
exercised end to end, faults included, on a machine with no reader, no card and no network.
Simulators build on :mod:`firmware.core` and never the other way round.
"""
