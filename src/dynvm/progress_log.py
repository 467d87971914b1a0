"""What ``dynvm get`` prints about a request's progress outside a terminal (a CI log).

A terminal gets a live table; a log gets lines, and a line every time the ETA ticks down
would be a line a second (1,800 for a 30-minute wait in Jenkins). So a line is printed only
when the request's state or its place in the queue changes, and otherwise at most once every ``repeat_seconds``, to show
that it still waits and how long it expects to."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

REPEAT_SECONDS = 60.0


def describe(status: dict[str, Any]) -> str:
    """One line: the request, its state, and while queued its place and ETA."""
    line = f"request {status['id'][:8]}: {status['state']}"
    if status["state"] == "queued" and status.get("position"):
        line += f", number {status['position']} in the queue"
        if status.get("eta_seconds") is not None:
            line += f", ready in about {status['eta_seconds']:.0f} s"
            if status.get("eta"):
                line += f" ({status['eta']})"
    return line


class ProgressLog:
    """Decides, for each status the client polls, whether the log gets a line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, repeat_seconds: float = REPEAT_SECONDS) -> None:
        self._clock = clock
        self._repeat = repeat_seconds
        self._said: tuple[Any, Any] | None = None
        self._at = 0.0

    def line(self, status: dict[str, Any]) -> str | None:
        """The line to print for this status, or None to print nothing."""
        what = (status["state"], status.get("position"))
        now = self._clock()
        if what == self._said and now - self._at < self._repeat:
            return None
        self._said, self._at = what, now
        return describe(status)
