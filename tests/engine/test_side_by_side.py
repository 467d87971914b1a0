"""Work on several leases at once (``engine/side_by_side.py``)."""

from __future__ import annotations

import threading
import time

from dynvm.engine.side_by_side import AT_ONCE, SideBySide


def test_items_run_at_once_results_in_order_and_threads_are_kept():
    side = SideBySide()
    started = threading.Barrier(4, timeout=5)  # all four must run at the same time to pass it
    threads: set[str] = set()

    def work(n: int) -> int:
        started.wait()
        threads.add(threading.current_thread().name)
        time.sleep(0.01 * (4 - n))  # the first ends last: the answer keeps the order anyway
        return n * n

    assert side.map(work, [0, 1, 2, 3]) == [0, 1, 4, 9]
    first = set(threads)
    threads.clear()
    started.reset()
    assert side.map(work, [0, 1, 2, 3]) == [0, 1, 4, 9]
    assert threads == first  # the same threads, not new ones
    side.shutdown()


def test_at_most_at_once_items_run_together():
    side = SideBySide()
    running, most = [0], [0]
    lock = threading.Lock()

    def work(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return n

    assert side.map(work, list(range(AT_ONCE * 2 + 3))) == list(range(AT_ONCE * 2 + 3))
    assert most[0] <= AT_ONCE
    side.shutdown()


def test_work_inside_work_runs_on_its_own_thread_and_never_waits_for_the_pool():
    """A cold remake that rolls back destroys side by side from inside side-by-side work;
    with every pool thread taken by such work, waiting for the pool would never end."""
    side = SideBySide(threads=2)

    def outer(n: int) -> list[str]:
        me = threading.current_thread().name
        return [name for name in side.map(lambda _: threading.current_thread().name, [1, 2, 3]) if name != me]

    assert side.map(outer, [1, 2]) == [[], []]  # the inner items ran on the outer item's thread
    side.shutdown()


def test_after_dynvm_stops_the_work_still_runs_on_the_callers_thread():
    side = SideBySide()
    side.shutdown()
    me = threading.current_thread().name
    assert side.map(lambda n: (n, threading.current_thread().name), [1, 2]) == [(1, me), (2, me)]
