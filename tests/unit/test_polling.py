"""The one deadline polling loop, and callers that wait with it."""

from __future__ import annotations

import subprocess
import time

import pytest

from bitinglip.platform.cluster.processes import alive, stop_groups
from bitinglip.polling import poll


def test_poll_returns_as_soon_as_the_check_holds() -> None:
    calls = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    started = time.monotonic()
    assert poll(third_time, timeout=10, interval=0.01)
    assert len(calls) == 3 and time.monotonic() - started < 1


def test_poll_gives_up_at_the_deadline_after_a_last_look() -> None:
    seen: list[float] = []
    started = time.monotonic()
    assert not poll(lambda: seen.append(time.monotonic()), timeout=0.3, interval=0.1)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert seen[-1] - started >= 0.3  # the last check is at the deadline, not an interval before it
    assert not poll(lambda: False, timeout=0, interval=1)  # checked once even without time


def test_a_check_that_raises_ends_the_wait() -> None:
    def exited() -> bool:
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        poll(exited, timeout=10, interval=0.01)


@pytest.mark.parametrize("script", ["exec sleep 30", "trap '' TERM; sleep 30 & wait"])
def test_stop_groups_stops_a_group_and_kills_one_that_ignores_sigterm(script: str) -> None:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.2)  # let the shell set its trap
    started = time.monotonic()
    stop_groups({"svc": proc.pid}, {"svc": proc}, grace_s=0.5)
    assert not alive(proc.pid) and proc.poll() is not None
    assert time.monotonic() - started < 6
