"""Fault points: places where a test may have this process killed, on purpose.

A fault-injection test sets ``DS01_FAULT=<point>`` for a service process; when that
process reaches the point it sends itself SIGKILL, exactly as `kill -9` at that moment
would. Unset (always, outside those tests), a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DS01_FAULT"


def fault_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
