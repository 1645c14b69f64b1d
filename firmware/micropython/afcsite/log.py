"""Structured log lines on stdout (the UART on an ESP32, a pipe on the unix port).

One line per record: ``<level> <what> key=value ...``, e.g.
``I event dev=site-01 seq=12 event=door-open``. The firmware never passes a key, password
or MAC key to these functions.
"""

_LEVELS = "DIWE"
level = 1  # 0 debug, 1 info, 2 warning, 3 error


def _emit(lv, what, kv):
    if lv < level:
        return
    parts = [_LEVELS[lv], what]
    for k in sorted(kv):  # keyword order is not kept by MicroPython: sort for stable lines
        parts.append(k + "=" + str(kv[k]))
    print(" ".join(parts))


def debug(what, **kv):
    _emit(0, what, kv)


def info(what, **kv):
    _emit(1, what, kv)


def warn(what, **kv):
    _emit(2, what, kv)


def error(what, **kv):
    _emit(3, what, kv)
