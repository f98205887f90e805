"""Waiting for a condition until a deadline: the one polling loop.

Every "wait until X, at most T seconds" in BitingLip (a port listening, a
process gone, the scheduler forgetting keys) is this loop; the deadline is
on the monotonic clock, so a wall-clock jump neither cuts a wait short nor
stretches it.  A check that can tell the wait is hopeless (a process
exited) raises, and the error goes to the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(check: Callable[[], object], *, timeout: float, interval: float) -> bool:
    """Call ``check`` every ``interval`` seconds until it returns something
    true (then True) or ``timeout`` seconds have passed (then False).  It is
    called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
