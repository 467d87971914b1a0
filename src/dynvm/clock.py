"""Compressed time, for ``dynvm replay --live``: a ``dynvm serve`` whose clock runs ``speed``
times as fast as the wall clock, so a few hours of a trace play in minutes against a real
service and a real simulator.

Everything dynvm times on its clock follows it: leases, expiry, the queue's deadlines, the
history, learned sizing and the create times it measures. What it times on the wall clock
does not: how often its background passes run, a failing host's refill back-off, HTTP
timeouts, how long a destroy took. Grace periods kept on its clock shrink instead (a VM
that just joined a pool is given 5 trace seconds to show in the mirror: 83 ms at 60x).
Those are the differences between a live replay and a virtual one (``docs/PERFORMANCE.md``
shows how much they come to). Never set on a real lab.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CompressedTime:
    """``now()``: ``start`` plus ``speed`` times the wall seconds since ``run()`` (Unix
    seconds, or the trace's own). ``monotonic()``: the same from 0, for timing durations.

    Until ``run()`` the clock stands at ``start``: the service's start-up (migrations,
    waiting for the hosts, reconcile) takes wall seconds that must not pass as minutes of
    the trace before its first request."""

    def __init__(self, speed: float, start: float, wall: Callable[[], float] = time.monotonic) -> None:
        if speed <= 0:
            raise ValueError("the speed is positive")
        self.speed = speed
        self.start = start
        self._wall = wall
        self._origin: float | None = None

    def run(self) -> None:
        """Let time pass from now on (called once the service serves)."""
        if self._origin is None:
            self._origin = self._wall()

    def monotonic(self) -> float:
        return 0.0 if self._origin is None else (self._wall() - self._origin) * self.speed

    def now(self) -> float:
        return self.start + self.monotonic()
