"""The validator core: pure computation, no I/O.

Everything here consumes and produces values (bytes, bit frames, integers); nothing opens a
file, a socket or a serial port, so the same code runs in a validator, in the virtual cards
of the simulators and in the tests.
"""
