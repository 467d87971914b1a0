"""When each waiting request will be served: a forecast from what dynvm knows, not a guess.

The room left on every host now (``provider.HostRoom``), the moments the leases holding
room are expected to give it back, and the order of the queue. Walking forward in time,
each request in turn starts at the first moment the room given back lets all its VMs fit
(as placement would put them), takes that room, and gives it back itself after the
create time and the hold time of its OS. Its ETA is its start plus the create time.

A lease is expected to end at ``handed_over_at + f x lifetime``, ``f`` being the median
fraction of their lifetime the leases of that OS were actually held (from the ended
leases); one already held longer than that is expected at its expiry, an upper bound it
cannot pass. A request whose VMs never fit in what is forecast (its host is down, say)
has no ETA.

Pure: no database, no clock, no xapi. The scheduler and the bench call it.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..provider import HostRoom, Need

MAX_FORECAST = 500  # queued requests forecast per pass; later ones wait for a nearer place
ACCURACY_WINDOW = 24 * 3600.0  # the ETA's error is measured over the requests served in the last day


@dataclass(frozen=True, order=True)
class Release:
    """Room a lease is expected to give back at ``at``."""

    at: float
    host_ref: str
    member: str
    cpus: int
    memory: int  # what the host admitted it on: memory_static_max + overhead
    disk: int


@dataclass(frozen=True)
class Waiting:
    """A queued request as the forecast sees it: where its VMs could go and what each
    takes there (``needs``: host ref -> need; only its pinned host when it has one)."""

    id: str
    os: str
    count: int
    needs: Mapping[str, Need]


@dataclass(frozen=True)
class Timing:
    """Seconds per OS, learned from the leases made and ended. An OS with none yet takes
    what the lab's other OSes show (``any_create``, ``any_hold_fraction``: over every OS),
    and only a lab that has made or ended nothing the defaults: the seed's create time, and
    a lease held to its expiry (an ETA that is then an upper bound)."""

    create: Mapping[str, float]
    hold_fraction: Mapping[str, float]
    default_create: float = 65.0  # the seed's own measured create time
    any_create: float | None = None
    any_hold_fraction: float | None = None

    def create_seconds(self, os: str) -> float:
        found = self.create.get(os, self.any_create)
        return self.default_create if found is None else found

    def fraction_held(self, os: str) -> float:
        """The share of its lifetime a lease of ``os`` is expected to be held."""
        found = self.hold_fraction.get(os, self.any_hold_fraction)
        return 1.0 if found is None else found


def fit(rooms: Mapping[str, HostRoom], waiting: Waiting) -> list[tuple[str, str]] | None:
    """Where its VMs would go now, most room first (``engine/placement.py``'s rule), taking the
    room from ``rooms``; None, and ``rooms`` untouched, when they do not all fit."""
    trial = {ref: copy.deepcopy(room) for ref, room in rooms.items() if ref in waiting.needs}  # hosts it may use
    placed = []
    for _ in range(waiting.count):
        best = max(
            trial,
            key=lambda ref: (trial[ref].fits(waiting.needs[ref]), -int(ref) if ref.isdigit() else 0),
            default=None,
        )
        if best is None or trial[best].fits(waiting.needs[best]) < 1:
            return None
        placed.append((best, trial[best].take(waiting.needs[best])))
    for ref, room in trial.items():
        rooms[ref].disk, rooms[ref].members = room.disk, room.members
    return placed


def _give_back(rooms: Mapping[str, HostRoom], release: Release) -> None:
    room = rooms.get(release.host_ref)
    if room is None or not room.members:
        return
    member = next((m for m in room.members if m.ref == release.member), room.members[0])
    member.cpus += release.cpus
    member.memory += release.memory
    room.disk += release.disk


def forecast(
    now: float,
    rooms: Mapping[str, HostRoom],
    releases: Iterable[Release],
    queue: Sequence[Waiting],
    timing: Timing,
    hold_seconds: Mapping[str, float],
) -> dict[str, float | None]:
    """Each waiting request's ETA (Unix seconds), in queue order; None: not within what
    is forecast. ``hold_seconds``: per OS, how long the VMs of a request served now are
    expected to be held. ``rooms`` is not changed."""
    state = {ref: copy.deepcopy(room) for ref, room in rooms.items()}
    events = sorted(releases)
    heapq.heapify(events)
    clock = now
    etas: dict[str, float | None] = {}
    for index, waiting in enumerate(queue):
        if index >= MAX_FORECAST:
            etas[waiting.id] = None
            continue
        placed = fit(state, waiting)
        while placed is None and events:
            release = heapq.heappop(events)
            clock = max(clock, release.at)
            _give_back(state, release)
            while events and events[0].at <= clock:  # everything given back by then
                _give_back(state, heapq.heappop(events))
            placed = fit(state, waiting)
        if placed is None:
            etas[waiting.id] = None
            continue
        ready_at = clock + timing.create_seconds(waiting.os)
        etas[waiting.id] = ready_at
        end = ready_at + hold_seconds.get(waiting.os, 0.0)
        for host_ref, member in placed:
            need = waiting.needs[host_ref]
            heapq.heappush(events, Release(end, host_ref, member, need.cpus, need.memory, need.disk))
    return etas


def expected_end(
    now: float,
    os: str,
    state: str,
    handed_over_at: float | None,
    created_at: float,
    expires_at: float,
    timing: Timing,
) -> float:
    """When an active lease is expected to give its room back."""
    if state == "releasing":
        return now
    fraction = timing.fraction_held(os)
    if handed_over_at is None:  # still being made: its lifetime has not started
        lifetime = expires_at - created_at
        return now + timing.create_seconds(os) + fraction * lifetime
    lifetime = expires_at - handed_over_at
    expected = handed_over_at + fraction * lifetime
    return expected if expected > now else max(now, expires_at)


@dataclass(frozen=True)
class Accuracy:
    """How far the first ETA each waiting request was given was from its actual wait:
    ``|ETA - actual| / actual``, p50 and p90 (None: no request to measure)."""

    samples: int
    p50: float | None
    p90: float | None


def accuracy(outcomes: Iterable[tuple[float, float, float]]) -> Accuracy:
    """From (queued at, first ETA, served at) of the requests served: the relative errors'
    p50 and p90. A request served within a second of queueing has no wait to be wrong about."""
    errors = sorted(abs(eta - served) / (served - queued) for queued, eta, served in outcomes if served - queued >= 1.0)
    if not errors:
        return Accuracy(0, None, None)

    def pct(q: float) -> float:
        return round(errors[min(len(errors) - 1, round(q * (len(errors) - 1)))], 3)

    return Accuracy(len(errors), pct(0.5), pct(0.9))
