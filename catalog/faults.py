"""Fault points for the crash tests: named places where a test makes this process die
(``kill``: SIGKILL, as an OOM killer or a lost node would) or stop and wait to be killed
(``pause``), or wait while a test looks at the running system (``hold``), so a fault lands
at a defined point instead of racing the work.

Off unless ``RELAYMAP_FAULT=<point>[=kill|pause|hold]`` names the point. With
``RELAYMAP_FAULT_FILE=<path>`` the fault fires once: the first process to reach the point
creates that file (holding its pid, which the test then kills by) and later ones pass. A
``hold`` goes on when the test writes anything else into that file (leaving it in place,
so the later processes still pass).
"""

from __future__ import annotations

import os
import signal
import time

ENV, ONCE_FILE = "RELAYMAP_FAULT", "RELAYMAP_FAULT_FILE"


def fault_point(name: str) -> None:
    """Die or wait here when the environment names this point; otherwise return at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, action = spec.partition("=")
    if point != name:
        return
    once = os.environ.get(ONCE_FILE)
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    if action in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hold":
        if not once:
            raise ValueError(f"{ENV}={spec} needs {ONCE_FILE}: rewriting it ends the hold")
        mine = str(os.getpid())
        while _read(once) == mine:
            time.sleep(0.1)
        return
    while True:  # pause: the test kills this process by the pid it wrote
        time.sleep(1)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
