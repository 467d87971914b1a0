"""Who is served next: the one scheduler (on the leader) that gives room to waiting requests.

The order, the room and the forecast are ``queue_policy.py``'s; this is the loop and its
pass.

**Serving.** Each pass (on a wake-up — a request queued, room freed — or every
``interval``) walks the order. A request whose VMs fit now is served if it is the head
(the first that is not served) or if serving it now does not make the head's ETA later
(backfilling, as batch schedulers do: a small request may go ahead into room the head
cannot use yet). A request pinned with ``xhostref`` fits only on that host, so it waits for
it. One whose count can never fit (over every host's whole size for its OS) ends at once.

**Immediate requests** (no ``wait``) are not queued: they are served at once if they fit
and, when requests are waiting, only if that does not delay the head either; else they
are refused with today's 429.

Serving a request reserves its room in the same transaction as its leases
(``Queue.grant``), so two passes, or a pass and an immediate request, never hand
out the same room.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..states import Actor, RequestState
from ..store.requests import RequestRecord, RequestStore
from . import eta
from .queue_policy import QueuePolicy, Snapshot, copy_rooms, never_fits
from .ready_stock import ReadyStock

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    served: list[str] = dataclasses.field(default_factory=list)
    timed_out: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    waiting: int = 0


class Scheduler:
    def __init__(
        self,
        settings: Callable[[], Settings],
        policy: QueuePolicy,
        requests: RequestStore,
        stock: ReadyStock,
        grant: Callable[[RequestRecord], bool],
        make_way: Callable[[list[RequestRecord]], list[str]],
        wake: threading.Event,
        report: Callable[..., None],
        clock: Callable[[], float] = time.time,
        interval: float = 0.5,
    ) -> None:
        """``grant``: serve a queued request now (``Queue.grant``); ``make_way``: give the
        waiting requests the room idle ready VMs hold (``ReadyPools.make_way``); ``wake``: set by whoever
        gives room back or queues a request; ``report``: the engine's listeners."""
        self._settings = settings
        self.policy = policy
        self.store = requests
        self.stock = stock
        self.grant = grant
        self.make_way = make_way
        self.clock = clock
        self.interval = interval
        self._wake = wake
        self._report = report
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one pass at a time in this process
        self._thread: threading.Thread | None = None
        self.events: Callable[[str, RequestRecord], None] = lambda event, record: None

    # -- the loop ----------------------------------------------------------------------

    def start(self, leading: Callable[[], bool]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                self._wake.wait(self.interval)
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    if leading():
                        self.run_pass()
                except Exception:  # a failed pass is logged; the next one tries again
                    log.exception("scheduler pass failed")

        self._thread = threading.Thread(target=run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Something changed (a request queued, room freed): run a pass soon."""
        self._wake.set()

    def run_pass(self) -> PassReport:
        """Time out, serve and forecast the queue once. Called on the leader only."""
        with self._lock:
            queued = self.store.in_state(RequestState.QUEUED)
            if not queued:
                return PassReport()  # nothing waits: no snapshot, nothing to forecast
            started = time.perf_counter()
            self.policy.remember(True)
            try:
                return self._pass(queued)
            finally:
                self.policy.remember(False)
                self._report("scheduler_passed", time.perf_counter() - started)

    def _pass(self, queued: list[RequestRecord]) -> PassReport:
        report = PassReport()
        settings = self._settings()
        now = self.clock()
        order = []
        for record in self.policy.order(queued):
            if record.cancel_requested:
                self.store.end_cancelled(
                    record.id, [RequestState.QUEUED], "cancelled by its caller", by=Actor.SCHEDULER
                )
            elif record.wait_until is not None and record.wait_until <= now:
                waited = (now - record.created_at) / 60
                where = f"; it was number {record.position} in the queue" if record.position else ""
                message = (
                    f"not enough capacity for {record.count} {record.os} VM(s) after waiting {waited:.1f} minute(s)"
                    f"{where}: release some VMs, ask for fewer, or wait longer"
                )
                if self._end(record, RequestState.TIMED_OUT, message, "QueueTimedOut"):
                    report.timed_out.append(record.id)
            elif not self.policy.can_ever_fit(settings, record):
                message = never_fits(record)
                if self._end(record, RequestState.FAILED, message, "NotEnoughCapacity"):
                    report.refused.append(record.id)
            else:
                order.append(record)
        left, snap = self._serve(settings, order, report)
        if left and self.make_way(left):  # idle ready VMs gave their room back: serve again
            left, snap = self._serve(settings, left, report)
        report.waiting = len(left)
        self._forecast(settings, snap, left)
        return report

    def _serve(
        self, settings: Settings, order: list[RequestRecord], report: PassReport
    ) -> tuple[list[RequestRecord], Snapshot]:
        """Serve what may go now, in order; the requests left waiting and the last snapshot."""
        head: RequestRecord | None = None
        left: list[RequestRecord] = []
        snap = self.policy.fresh_snapshot(settings)
        misfits: set[tuple[object, ...]] = set()  # requests alike that do not fit this snapshot
        warm: dict[tuple[str, str | None], int] = {}  # idle ready VMs per (os, pinned host), read once
        for record in order:
            if (head is None or record.os != head.os) and self._served_warm(settings, record, warm):
                report.served.append(record.id)
                self.events("served", record)
                snap = self.policy.fresh_snapshot(settings)
                misfits.clear()
                continue
            alike = (record.os, record.cpus, record.memory, record.host_ref, record.count)
            waiting = self.policy.waiting_of(settings, record)
            fits = alike not in misfits and eta.fit(copy_rooms(snap.rooms), waiting) is not None
            if not fits:
                misfits.add(alike)
            may_go = fits and (head is None or not self.policy.delays_head(settings, snap, head, waiting))
            if may_go and self.grant(record):
                report.served.append(record.id)
                self.events("served", record)
                snap = self.policy.fresh_snapshot(settings)
                misfits.clear()
                continue
            if head is None:
                head = record
            left.append(record)
        return left, snap

    def _end(self, record: RequestRecord, state: RequestState, message: str, kind: str) -> bool:
        """End a queued request that will not be served (a 429 saying why); whether it ended."""
        ended = self.store.transition(
            record.id,
            [RequestState.QUEUED],
            state,
            by=Actor.SCHEDULER,
            error=message,
            error_status=429,
            error_kind=kind,
        )
        if ended:
            self.events(state.value, record)
        return ended

    def _served_warm(self, settings: Settings, record: RequestRecord, warm: dict[tuple[str, str | None], int]) -> bool:
        """Serve a request its ready pool covers whole (it takes no new room, so it delays
        no one); True when it was."""
        if not self.stock.eligible(settings, record.os, record.cpus, record.memory):
            return False
        key = (record.os, record.host_ref)
        if key not in warm:
            warm[key] = len(self.stock.idle(settings, record.os, record.host_ref))
        if warm[key] < record.count or not self.grant(record):
            return False
        warm.clear()  # taken: read again when next asked
        return True

    def _forecast(self, settings: Settings, snap: Snapshot, left: list[RequestRecord]) -> None:
        policy = self.policy
        queue = [policy.waiting_of(settings, record) for record in left]
        etas = eta.forecast(snap.now, snap.rooms, snap.releases, queue, policy.timing(), policy.hold_seconds(settings))
        self.store.set_forecast({record.id: (index, etas.get(record.id)) for index, record in enumerate(left, 1)})
