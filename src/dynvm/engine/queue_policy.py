"""How the queue is weighed: its fair order, what the hosts hold and will give back, and
whether serving a request now delays the head of the queue (the ETA forecast of
``eta.py``). The scheduler's pass (``scheduler.py``) and admission (``admission.py``: may
a request that does not wait take room now?) both ask this; it decides nothing itself.

**Order.** Higher ``priority`` first; within a priority, round-robin between users: each
user's requests are numbered by age (their oldest is 0), and the queue is ordered by that
number, then by age. A user with 50 queued requests and a user with one thus alternate:
the flood never starves the single request. ``position`` is the place in this order (1 is
next).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..provider import HostRoom, Provider
from ..states import LeaseState
from ..store.leases import LeaseStore
from ..store.requests import RequestRecord, RequestStore
from . import eta
from .capacity import Capacity, reservations_by_host
from .latest import Latest, median_of_sorted

YIELD_SECONDS = 2.0  # how soon an idle ready-pool VM makes way for a waiting request (a pools pass)
LEARN_EVERY = 30.0  # seconds (the engine's clock) between reading the create and hold times of leases
LEARN_KEEP = 500  # create and hold times kept per OS: the latest


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


class QueuePolicy:
    def __init__(
        self,
        capacity: Capacity,
        provider: Provider,
        leases: LeaseStore,
        requests: RequestStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = capacity
        self.provider = provider
        self.leases = leases
        self.requests = requests
        self.clock = clock
        self._timing: eta.Timing | None = None
        self._learned_at = float("-inf")
        self._hold: dict[str, float] = {}
        # what was learned so far, per OS (the latest LEARN_KEEP), and where the next read starts
        self._all_creates: list[float] = []  # every OS's kept create times, in order
        self._all_fractions: list[float] = []
        self._creates: dict[str, Latest] = defaultdict(lambda: Latest(LEARN_KEEP, self._all_creates))
        self._holds: dict[str, Latest] = defaultdict(lambda: Latest(LEARN_KEEP))
        self._fractions: dict[str, Latest] = defaultdict(lambda: Latest(LEARN_KEEP, self._all_fractions))
        self._made, self._ended = _ReadFrom(), _ReadFrom()
        # during a pass: what requests alike share (needs per host, whether they can ever
        # fit), computed once; templates and host sizes do not change within a pass
        self._memo: dict[tuple[object, ...], Any] | None = None

    def remember(self, on: bool) -> None:
        """Start (True) or end (False) a pass's memory of what requests alike share."""
        self._memo = {} if on else None

    # -- learning ----------------------------------------------------------------------

    def timing(self) -> eta.Timing:
        """Create times and hold fractions per OS, learned from the leases made and ended
        lately (the last ``LEARN_KEEP`` of each per OS); read again every ``LEARN_EVERY``
        seconds of the engine's clock, only what is new since the last read."""
        now = self.clock()
        if self._timing is None or now - self._learned_at >= LEARN_EVERY:
            self._learn()
            creates, fractions = self._all_creates, self._all_fractions
            self._timing = eta.Timing(
                create={os: v.median() for os, v in self._creates.items() if v},
                hold_fraction={os: v.median() for os, v in self._fractions.items() if v},
                any_create=median_of_sorted(creates) if creates else None,
                any_hold_fraction=median_of_sorted(fractions) if fractions else None,
            )
            self._hold = {os: v.median() for os, v in self._holds.items() if v}
            self._learned_at = now
        return self._timing

    def _learn(self) -> None:
        for _lease_id, os, _ready_at, seconds in self._made.new(self.leases.made_since(self._made.since), at=2):
            self._creates[os].append(seconds)
        ended = self._ended.new(self.leases.ended_since(self._ended.since), at=3)
        for _lease_id, os, handed_over_at, released_at, expires_at in ended:
            held = max(0.0, released_at - handed_over_at)
            self._holds[os].append(held)
            lifetime = expires_at - handed_over_at
            if lifetime > 0:
                self._fractions[os].append(min(1.0, held / lifetime))

    def hold_seconds(self, settings: Settings, learned_only: bool = False) -> dict[str, float]:
        """Per OS, the median hold of its ended leases; for an OS with none, its whole
        lifetime (``learned_only``: left out)."""
        self.timing()
        if learned_only:
            return dict(self._hold)
        default = settings.common.expiry_minutes * 60
        return {os: self._hold.get(os, default) for os in settings.os_keys}

    # -- what the hosts hold -----------------------------------------------------------

    def snapshot(self, settings: Settings, reserved: list[dict[str, object]]) -> Snapshot:
        now = self.clock()
        rooms: dict[str, HostRoom] = {}
        by_host = reservations_by_host(reserved)
        for host in settings.hosts:
            mine = by_host.get(host.ref, [])
            room = self.provider.room(host, settings.common.cpu_overcommit, mine)
            if room is not None:
                rooms[host.ref] = room
        timing = self.timing()
        memory_of = {str(r["lease_id"]): int(r["memory"]) for r in reserved}  # type: ignore[call-overload]  # a reservation row is dict[str, object]; memory is an integer column
        releases = []
        for lease in self.leases.active():
            if lease.pooled and lease.state == LeaseState.READY:
                end = now + YIELD_SECONDS  # an idle ready VM makes way for those who wait
            elif lease.pooled:  # a ready VM being made makes way once it is made
                end = max(now, lease.created_at + timing.create_seconds(lease.os)) + YIELD_SECONDS
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
            need = self.provider.need(host, record.os, record.cpus, record.memory)
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
            room = self.provider.room(host, settings.common.cpu_overcommit, [], empty=True)
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
        rooms = copy_rooms(snap.rooms)
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
        return after is None or after > before + 1e-3  # any later: a delay, however short

    # -- immediate requests ------------------------------------------------------------

    def may_serve_now(
        self,
        settings: Settings,
        reserved: list[dict[str, object]],
        candidate: RequestRecord,
        queued: list[RequestRecord],
    ) -> bool:
        """For a request that does not wait: may it take room now, with requests queued?
        Called inside the reservation's transaction (the rooms are as locked; ``queued``:
        the queue as that transaction read it)."""
        if not queued:
            return True
        head = self.order(queued)[0]
        snap = self.snapshot(settings, reserved)
        return not self.delays_head(settings, snap, head, self.waiting_of(settings, candidate))

    def order(self, queued: list[RequestRecord]) -> list[RequestRecord]:
        """The queue in the order it is served (``fair_order``), counting what each user
        was served while its oldest waiting request waited."""
        oldest = min(r.created_at for r in queued)
        return fair_order(queued, self.requests.started_since(oldest))

    def fresh_snapshot(self, settings: Settings) -> Snapshot:
        reserved = self.capacity.reserved_now()
        return self.snapshot(settings, reserved)


def copy_rooms(rooms: dict[str, HostRoom]) -> dict[str, HostRoom]:
    return {
        ref: HostRoom(room.ref, room.disk, [dataclasses.replace(m) for m in room.members])
        for ref, room in rooms.items()
    }


class _ReadFrom:
    """Where an incremental read of leases starts: the latest moment read (``since``; a
    read takes rows at that moment or later), and the ids read at that moment, which the
    next read returns again and ``new`` leaves out."""

    def __init__(self) -> None:
        self.since = float("-inf")
        self._seen: set[str] = set()

    def new(self, rows: Sequence[tuple[Any, ...]], at: int) -> list[tuple[Any, ...]]:
        """The rows (id first, oldest first; ``row[at]`` their moment) not read before."""
        fresh = [row for row in rows if row[0] not in self._seen]
        if rows:
            self.since = rows[-1][at]
            self._seen = {row[0] for row in rows if row[at] == self.since}
        return fresh
