"""Compressed time, for ``dynvm replay --live``: a ``dynvm serve`` whose clock runs ``speed``
times as fast as the wall clock, so a few hours of a trace play in minutes against a real
service and a real simulator.

Everything dynvm times on its clock follows it: leases, expiry, the queue's deadlines, the
history, learned sizing and the create times it measures. What it times on the wall clock
does not (how often its background passes run, HTTP timeouts), which is one difference
between a live replay and a virtual one (``docs/PERFORMANCE.md`` shows how much). Never set
on a real lab.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CompressedTime:
    """``now()``: ``start`` plus ``speed`` times the wall seconds since this was made (Unix
    seconds, or the trace's own). ``monotonic()``: the same from 0, for timing durations."""

    def __init__(self, speed: float, start: float, wall: Callable[[], float] = time.monotonic) -> None:
        if speed <= 0:
            raise ValueError("the speed is positive")
        self.speed = speed
        self.start = start
        self._wall = wall
        self._origin = wall()

    def monotonic(self) -> float:
        return (self._wall() - self._origin) * self.speed

    def now(self) -> float:
        return self.start + self.monotonic()
