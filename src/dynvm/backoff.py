"""Per-host exponential backoff, in one place: a host that failed is left alone for a
while, twice as long after each failure in a row, up to a limit; a success forgets it.
The delays of each use are named here, so they can be read and compared side by side."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    first: float  # seconds after the first failure
    limit: float  # never longer than this

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (0 for none)."""
        if failures <= 0:
            return 0.0
        return min(self.limit, self.first * 2.0 ** (failures - 1))


REFILL = BackoffPolicy(first=5.0, limit=300.0)  # a host whose ready-pool refill failed
SESSION = BackoffPolicy(first=1.0, limit=30.0)  # a host that did not answer a login or a call
WATCHER = BackoffPolicy(first=0.5, limit=10.0)  # a host's event watcher, between reconnections


class Backoff:
    """Failures in a row and the time of the next try, per key (a host ref). Thread-safe."""

    def __init__(self, policy: BackoffPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[Hashable, tuple[int, float]] = {}  # key -> (failures, retry at)

    def failed(self, key: Hashable = None) -> float:
        """Count a failure; the seconds until the next try."""
        with self._lock:
            failures = self._state.get(key, (0, 0.0))[0] + 1
            delay = self.policy.delay(failures)
            self._state[key] = (failures, self._clock() + delay)
        return delay

    def succeeded(self, key: Hashable = None) -> None:
        """Forget the failures: the next one waits ``policy.first`` again."""
        with self._lock:
            self._state.pop(key, None)

    def try_now(self, key: Hashable = None) -> None:
        """Allow the next try at once, keeping the count (the host is known to be back)."""
        with self._lock:
            failures, _ = self._state.get(key, (0, 0.0))
            if failures:
                self._state[key] = (failures, 0.0)

    def waiting(self, key: Hashable = None) -> float:
        """Seconds until the next try (0: try now)."""
        with self._lock:
            _, retry_at = self._state.get(key, (0, 0.0))
        return max(0.0, retry_at - self._clock())
