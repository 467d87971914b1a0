"""Work on several leases at once: destroying a release's VMs, holding a batch's warm VMs,
making cold the ones a host refused. Releasing eight VMs, or reaping a hundred, takes about
as long as the slowest, not the sum.

The threads are kept between calls (starting a thread for each VM of each release cost a
sixth of a busy replay), in a pool of their own, apart from the create pool, so that
destroys still run while dynvm stops (``LeaseService.shutdown`` ends it last). Work that is
itself running side by side (a cold remake that rolls back, destroying) runs its own leases
one after the other on its thread: waiting for the pool from inside it could wait for ever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
L = TypeVar("L")

AT_ONCE = 32  # per call: enough to overlap, few enough not to flood a host
THREADS = 128  # in all, for the calls running at once


class SideBySide:
    def __init__(self, threads: int = THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="side-by-side")
        self._local = threading.local()

    def map(self, work: Callable[[L], T], items: Sequence[L]) -> list[T]:
        """``work`` for each item, at most ``AT_ONCE`` at a time, results in order. One item,
        or a call from inside such work, runs on the calling thread."""
        if len(items) <= 1 or getattr(self._local, "inside", False):
            return [work(item) for item in items]

        def inside(item: L) -> T:
            self._local.inside = True
            try:
                return work(item)
            finally:
                self._local.inside = False

        out: list[T] = []
        for start in range(0, len(items), AT_ONCE):
            chunk = items[start : start + AT_ONCE]
            try:
                results: Iterable[T] = self._pool.map(inside, chunk)
            except RuntimeError:  # dynvm has stopped (a last reaper pass): one after the other
                results = [work(item) for item in chunk]
            out.extend(results)
        return out

    def shutdown(self) -> None:
        """Called when dynvm stops, after the builds and creates have ended; work asked for
        later still runs, on the caller's thread."""
        self._pool.shutdown(wait=True)
