"""Who is served next: the one scheduler (on the leader) that gives room to waiting requests.

**Order.** Higher ``priority`` first; within a priority, round-robin between users: each
user's requests are numbered by age (their oldest is 0), and the queue is ordered by that
number, then by age. A user with 50 queued requests and a user with one thus alternate:
the flood never starves the single request. ``position`` is the place in this order (1 is
next).

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
(``LeaseService.grant``), so two passes, or a pass and an immediate request, never hand
out the same room.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..provider import HostRoom
from . import eta
from .requests import QUEUED, TIMED_OUT, RequestRecord, RequestStore

if TYPE_CHECKING:
    from ..config import Settings
    from ..leases import LeaseService

log = logging.getLogger(__name__)

YIELD_SECONDS = 2.0  # how soon an idle ready-pool VM makes way for a waiting request (a pools pass)

LEARN_EVERY = 30.0  # seconds between re-reading create and hold times from the ended leases


def user_of(record: RequestRecord) -> str:
    """Whom fairness counts a request for: its token's user, else the name it asks under."""
    return record.caller or record.username


def fair_order(queued: Sequence[RequestRecord], served: Sequence[tuple[str, float]] = ()) -> list[RequestRecord]:
    """Priority, then users in turn, then age.

    A request's turn is how many of its user's requests go before it: those still queued
    ahead of it, plus those served while it waited (``served``: (user, started_at) of the
    requests that got room lately). A user whose requests keep being served thus falls
    behind one who has had none, however old the first user's next request is."""
    rank: dict[tuple[int, str], int] = defaultdict(int)
    keyed = []
    for record in sorted(queued, key=lambda r: (r.created_at, r.id)):
        user = user_of(record)
        ahead = rank[(record.priority, user)]
        rank[(record.priority, user)] += 1
        while_waiting = sum(1 for who, at in served if who == user and at >= record.created_at)
        keyed.append(((-record.priority, ahead + while_waiting, record.created_at, record.id), record))
    return [record for _, record in sorted(keyed, key=lambda kv: kv[0])]


def never_fits(record: RequestRecord) -> str:
    """Why a request that can never fit is refused (at submit, or by a later pass)."""
    pinned = f"(host {record.host_ref}) " if record.host_ref else ""
    what = f"{record.count} {record.os} VM(s)"
    return f"{what} can never be served at once: more than every host {pinned}holds for {record.os}"


@dataclass
class Snapshot:
    """The room on every answering host now, and what each active lease will give back."""

    now: float
    rooms: dict[str, HostRoom]
    releases: list[eta.Release]
    # the head's ETA in this snapshot, by request id: every candidate of a pass is weighed
    # against the same head, so it is forecast once per snapshot
    head_etas: dict[str, float | None] = dataclasses.field(default_factory=dict)


@dataclass
class PassReport:
    served: list[str] = dataclasses.field(default_factory=list)
    timed_out: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    waiting: int = 0


class Scheduler:
    def __init__(
        self,
        leases: LeaseService,
        store: RequestStore,
        clock: Callable[[], float] = time.time,
        interval: float = 0.5,
    ) -> None:
        self.leases = leases
        self.store = store
        self.clock = clock
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one pass at a time in this process
        self._timing: eta.Timing | None = None
        # during a pass: what requests alike share (needs per host, whether they can ever
        # fit), computed once; templates and host sizes do not change within a pass
        self._memo: dict[tuple[object, ...], Any] | None = None
        self._learned_at = -LEARN_EVERY
        self._hold: dict[str, float] = {}
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

    # -- learning ----------------------------------------------------------------------

    def timing(self) -> eta.Timing:
        """Create times and hold fractions per OS, from the leases that ended lately."""
        now = time.monotonic()
        if self._timing is None or now - self._learned_at >= LEARN_EVERY:
            creates: dict[str, list[float]] = defaultdict(list)
            fractions: dict[str, list[float]] = defaultdict(list)
            holds: dict[str, list[float]] = defaultdict(list)
            for lease in self.leases.leases.recent_ended():
                if lease.create_seconds:
                    creates[lease.os].append(lease.create_seconds)
                if lease.handed_over_at is not None and lease.released_at is not None:
                    lifetime = lease.expires_at - lease.handed_over_at
                    held = max(0.0, lease.released_at - lease.handed_over_at)
                    holds[lease.os].append(held)
                    if lifetime > 0:
                        fractions[lease.os].append(min(1.0, held / lifetime))
            self._timing = eta.Timing(
                create={os: statistics.median(v) for os, v in creates.items()},
                hold_fraction={os: statistics.median(v) for os, v in fractions.items()},
            )
            self._hold = {os: statistics.median(v) for os, v in holds.items()}
            self._learned_at = now
        return self._timing

    def hold_seconds(self, settings: Settings) -> dict[str, float]:
        self.timing()
        default = settings.common.expiry_minutes * 60
        return {os: self._hold.get(os, default) for os in settings.os_keys}

    # -- what the hosts hold -----------------------------------------------------------

    def snapshot(self, settings: Settings, reserved: list[dict[str, object]]) -> Snapshot:
        now = self.clock()
        rooms: dict[str, HostRoom] = {}
        for host in settings.hosts:
            mine = [r for r in reserved if r["host_ref"] == host.ref]
            room = self.leases.provider.room(host, settings.common.cpu_overcommit, mine)
            if room is not None:
                rooms[host.ref] = room
        timing = self.timing()
        memory_of = {str(r["lease_id"]): int(r["memory"]) for r in reserved}  # type: ignore[call-overload]
        releases = []
        for lease in self.leases.leases.active():
            if lease.pooled and lease.state == "ready":
                end = now + YIELD_SECONDS  # an idle ready VM makes way for those who wait
            else:
                end = eta.expected_end(
                    now, lease.os, lease.state, lease.handed_over_at, lease.created_at, lease.expires_at, timing
                )
            memory = memory_of.get(lease.id, lease.memory)
            releases.append(eta.Release(end, lease.host_ref, lease.member or "", lease.cpus, memory, lease.disk))
        return Snapshot(now, rooms, releases)

    def waiting_of(self, settings: Settings, record: RequestRecord) -> eta.Waiting:
        key = ("needs", record.os, record.cpus, record.memory, record.host_ref)
        if self._memo is not None and key in self._memo:
            return eta.Waiting(record.id, record.os, record.count, self._memo[key])
        needs = {}
        for host in settings.hosts:
            if record.host_ref is not None and host.ref != record.host_ref:
                continue
            need = self.leases.provider.need(host, record.os, record.cpus, record.memory)
            if need is not None:
                needs[host.ref] = need
        if self._memo is not None:
            self._memo[key] = needs
        return eta.Waiting(record.id, record.os, record.count, needs)

    def can_ever_fit(self, settings: Settings, record: RequestRecord) -> bool:
        """Whether the request fits in the whole size of its hosts (every dynvm VM gone).
        A host that is down might hold it once back: then it may."""
        key = ("fits", record.os, record.cpus, record.memory, record.host_ref, record.count)
        if self._memo is not None and key in self._memo:
            return bool(self._memo[key])
        fits = self._can_ever_fit(settings, record)
        if self._memo is not None:
            self._memo[key] = fits
        return fits

    def _can_ever_fit(self, settings: Settings, record: RequestRecord) -> bool:
        whole: dict[str, HostRoom] = {}
        for host in settings.hosts:
            if record.host_ref is not None and host.ref != record.host_ref:
                continue
            if record.os not in host.templates:
                continue
            room = self.leases.provider.room(host, settings.common.cpu_overcommit, [], empty=True)
            if room is None:
                return True
            whole[host.ref] = room
        return eta.fit(whole, self.waiting_of(settings, record)) is not None

    def _head_eta(
        self,
        settings: Settings,
        now: float,
        rooms: dict[str, HostRoom],
        releases: list[eta.Release],
        head: RequestRecord,
    ) -> float | None:
        queue = [self.waiting_of(settings, head)]
        return eta.forecast(now, rooms, releases, queue, self.timing(), self.hold_seconds(settings))[head.id]

    def delays_head(self, settings: Settings, snap: Snapshot, head: RequestRecord, candidate: eta.Waiting) -> bool:
        """Whether serving ``candidate`` now makes the head's ETA later."""
        if head.id not in snap.head_etas:
            snap.head_etas[head.id] = self._head_eta(settings, snap.now, snap.rooms, snap.releases, head)
        before = snap.head_etas[head.id]
        if before is None:
            return False  # the head is not forecast to fit at all (its host is down): go ahead
        rooms = _copy_rooms(snap.rooms)
        placed = eta.fit(rooms, candidate)
        if placed is None:
            return True
        hold = self.hold_seconds(settings).get(candidate.os, 0.0)
        end = snap.now + self.timing().create_seconds(candidate.os) + hold
        releases = list(snap.releases)
        for host_ref, member in placed:
            need = candidate.needs[host_ref]
            releases.append(eta.Release(end, host_ref, member, need.cpus, need.memory, need.disk))
        after = self._head_eta(settings, snap.now, rooms, releases, head)
        return after is None or after > before + 1.0

    # -- immediate requests ------------------------------------------------------------

    def may_serve_now(self, settings: Settings, reserved: list[dict[str, object]], candidate: RequestRecord) -> bool:
        """For a request that does not wait: may it take room now, with requests queued?
        Called inside the reservation's transaction (the rooms are as locked)."""
        queued = self.store.in_state(QUEUED)
        if not queued:
            return True
        head = self.order(queued)[0]
        snap = self.snapshot(settings, reserved)
        return not self.delays_head(settings, snap, head, self.waiting_of(settings, candidate))

    # -- one pass ----------------------------------------------------------------------

    def order(self, queued: list[RequestRecord]) -> list[RequestRecord]:
        """The queue in the order it is served (``fair_order``), counting what each user
        was served while its oldest waiting request waited."""
        oldest = min(r.created_at for r in queued)
        return fair_order(queued, self.store.started_since(oldest))

    def run_pass(self) -> PassReport:
        """Time out, serve and forecast the queue once. Called on the leader only."""
        with self._lock:
            queued = self.store.in_state(QUEUED)
            if not queued:
                return PassReport()  # nothing waits: no snapshot, nothing to forecast
            started = time.perf_counter()
            self._memo = {}
            try:
                return self._pass(queued)
            finally:
                self._memo = None
                self.leases._report("scheduler_passed", time.perf_counter() - started)

    def _pass(self, queued: list[RequestRecord]) -> PassReport:
        report = PassReport()
        settings = self.leases.settings
        now = self.clock()
        order = []
        for record in self.order(queued):
            if record.cancel_requested:
                self.store.end_cancelled(record.id, [QUEUED], "cancelled by its caller")
            elif record.wait_until is not None and record.wait_until <= now:
                waited = (now - record.created_at) / 60
                where = f"; it was number {record.position} in the queue" if record.position else ""
                message = (
                    f"not enough capacity for {record.count} {record.os} VM(s) after waiting {waited:.1f} minute(s)"
                    f"{where}: release some VMs, ask for fewer, or wait longer"
                )
                if self.store.transition(
                    record.id, [QUEUED], TIMED_OUT, error=message, error_status=429, error_kind="QueueTimedOut"
                ):
                    report.timed_out.append(record.id)
                    self.events("timed out", record)
            elif not self.can_ever_fit(settings, record):
                message = never_fits(record)
                if self.store.transition(
                    record.id, [QUEUED], "failed", error=message, error_status=429, error_kind="NotEnoughCapacity"
                ):
                    report.refused.append(record.id)
                    self.events("failed", record)
            else:
                order.append(record)
        head: RequestRecord | None = None
        left: list[RequestRecord] = []
        snap = self._fresh_snapshot(settings)
        misfits: set[tuple[object, ...]] = set()  # requests alike that do not fit this snapshot
        warm: dict[tuple[str, str | None], int] = {}  # idle ready VMs per (os, pinned host), read once
        for record in order:
            if (head is None or record.os != head.os) and self._served_warm(settings, record, warm):
                report.served.append(record.id)
                self.events("served", record)
                snap = self._fresh_snapshot(settings)
                misfits.clear()
                continue
            alike = (record.os, record.cpus, record.memory, record.host_ref, record.count)
            waiting = self.waiting_of(settings, record)
            fits = alike not in misfits and eta.fit(_copy_rooms(snap.rooms), waiting) is not None
            if not fits:
                misfits.add(alike)
            may_go = fits and (head is None or not self.delays_head(settings, snap, head, waiting))
            if may_go and self.leases.grant(record):
                report.served.append(record.id)
                self.events("served", record)
                snap = self._fresh_snapshot(settings)
                misfits.clear()
                continue
            if head is None:
                head = record
            left.append(record)
        report.waiting = len(left)
        self._forecast(settings, snap, left)
        return report

    def _served_warm(self, settings: Settings, record: RequestRecord, warm: dict[tuple[str, str | None], int]) -> bool:
        """Serve a request its ready pool covers whole (it takes no new room, so it delays
        no one); True when it was."""
        pools = self.leases.ready_pools
        if not pools.eligible(record.cpus, record.memory):
            return False
        key = (record.os, record.host_ref)
        if key not in warm:
            warm[key] = len(pools.idle(settings, record.os, record.host_ref))
        if warm[key] < record.count or not self.leases.grant(record):
            return False
        warm.clear()  # taken: read again when next asked
        return True

    def _fresh_snapshot(self, settings: Settings) -> Snapshot:
        with self.leases.leases.db.read() as conn:
            reserved = self.leases.reservations(conn)
        return self.snapshot(settings, reserved)

    def _forecast(self, settings: Settings, snap: Snapshot, left: list[RequestRecord]) -> None:
        queue = [self.waiting_of(settings, record) for record in left]
        etas = eta.forecast(snap.now, snap.rooms, snap.releases, queue, self.timing(), self.hold_seconds(settings))
        self.store.set_forecast({record.id: (index, etas.get(record.id)) for index, record in enumerate(left, 1)})


def _copy_rooms(rooms: dict[str, HostRoom]) -> dict[str, HostRoom]:
    return {
        ref: HostRoom(room.ref, room.disk, [dataclasses.replace(m) for m in room.members])
        for ref, room in rooms.items()
    }
