"""A single timer thread for delayed guest events (boot finished, IP assigned).

One thread serves any number of pending events, so 1,000 VMs booting at once cost one
thread, not 1,000, and delays never serialise: each event fires at its own deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sim-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` on the scheduler thread after ``delay`` seconds. Actions must be
        short and must not block: they run one after another."""
        with self._cond:
            heapq.heappush(self._queue, (self._monotonic() + max(0.0, delay), next(self._counter), action))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._queue or self._queue[0][0] > self._monotonic()):
                    timeout = self._queue[0][0] - self._monotonic() if self._queue else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._queue)
            try:
                action()
            except Exception:  # a broken action must not stop the clock for every other VM
                log.exception("scheduled action failed")
