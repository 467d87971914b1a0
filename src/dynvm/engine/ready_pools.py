"""Ready pools (``[pools]``): VMs of an OS kept booted, probed and ready ahead of demand,
so that a getservers takes one in milliseconds instead of waiting a whole create.

A ready-pool VM is a lease like any other — it holds its room, carries dynvm's marker, is
reconciled and recovered as one — whose ``pooled`` flag says no request has it yet. A
request takes one in its reservation's transaction (``LeaseStore.take_pooled``): it gets
the request's name, user and lifetime there, and the VM is renamed after (``Provider.
hand_out``). Which idle VMs a request may take is ``ready_stock.py``'s. The pool only ever
gives way to real demand:

- a request asking for other ``cpus``/``mem`` than the template's, or pinned to a host the
  pool has no VM on, is made cold; so is the rest of a request the pool cannot cover;
- a request that does not fit takes the room of idle ready VMs of other OSes, and of those
  still being made; while requests wait, nothing is refilled and each waiting request gets
  the room idle ready VMs hold (``giving_way.py``): a pool never makes anyone wait longer
  than no pool would; a busy lab has no pools at all (``sizing.py``, ``BUSY_LOAD``);
- refill runs on the leader only, at most ``[pools] refill.per.host`` creates at once per
  host, and backs off (``backoff.REFILL``) on a host whose create failed.

A ready VM that stopped, lost its address, outlived ``ready.ttl.minutes`` or is over its
pool's target is recycled (destroyed; the pass after refills it). ``tick`` does all of it;
``runtime.Services`` runs it every ``Intervals.pools`` seconds on the leader.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..backoff import REFILL, Backoff
from ..config import Settings
from ..model import Lease, LeaseRequest
from ..provider import HostRoom
from ..states import Actor, LeaseState, RequestState
from ..store.requests import RequestRecord
from ..trace import Demand, requests_in_history
from . import placement
from .admission import Admission
from .capacity import Capacity
from .context import EngineContext
from .creator import Creator
from .demand_model import KEEP_SECONDS
from .giving_way import GivingWay, MakingCancel
from .queue_policy import QueuePolicy
from .ready_stock import ReadyStock, give_back, is_idle, oldest_first
from .release import Releaser
from .sizing import Forecast, LearnedSizing

log = logging.getLogger(__name__)

COUNTS_WINDOW = 24 * 3600.0  # handed out / recycled are counted over the last day
RESIZE_SECONDS = 60.0  # learned targets are computed again this often
RELOAD_SECONDS = 600.0  # and the demand model is read again from the history (other replicas' requests)
PASS_SECONDS = 1.0  # how often the pools pass runs (runtime.Intervals.pools): a VM taken waits this long for its refill


@dataclass(frozen=True)
class PoolStatus:
    os: str
    target: int
    ready: int  # idle, healthy, waiting for a request
    refilling: int  # being made
    handed_out: int  # in the last day
    recycled: int  # in the last day: stale, dead, surplus, or making room
    sizing: str = "fixed"
    forecast: Forecast | None = None  # with learned sizing: what made the target


@dataclass
class TickReport:
    recycled: list[str] = field(default_factory=list)  # lease names
    started: list[str] = field(default_factory=list)  # refills begun
    yielded: list[str] = field(default_factory=list)  # recycled to make room for waiting requests


class ReadyPools:
    def __init__(
        self,
        ctx: EngineContext,
        stock: ReadyStock,
        capacity: Capacity,
        policy: QueuePolicy,
        admission: Admission,
        creator: Creator,
        releaser: Releaser,
        reload_seconds: float | None = RELOAD_SECONDS,
    ) -> None:
        """``reload_seconds``: how often the demand model is rebuilt from the history (None:
        once, then only from what this process sees: ``dynvm replay``)."""
        self.ctx = ctx
        self.stock = stock
        self.capacity = capacity
        self.policy = policy
        self.admission = admission
        self.creator = creator
        self.releaser = releaser
        self._clock = ctx.clock
        self._reload_seconds = reload_seconds
        self.resize_seconds = RESIZE_SECONDS
        self.pass_seconds = PASS_SECONDS
        self._sizing: LearnedSizing | None = None
        self._loaded_at = 0.0
        self._learned: list[Demand] = []  # demand given by ``learn``, kept across reloads
        self._lock = threading.Lock()  # one tick at a time in this process
        self._backoff = Backoff(REFILL)  # per host ref
        self._forecasts: dict[str, Forecast] = {}
        self._sized_at: tuple[float, float] | None = None  # (when, margin) of the last learned sizing
        self.way = GivingWay(ctx, stock, capacity, releaser)

    # -- targets ---------------------------------------------------------------------------

    def targets(self, settings: Settings) -> dict[str, int]:
        """How many ready VMs each OS's pool keeps now: the ``<os>.ready`` lines, or with
        ``sizing=learned`` the policy's targets (``engine/sizing.py``), those lines a floor."""
        fixed = dict(settings.ready_pools.targets)
        if settings.ready_pools.sizing != "learned":
            return fixed
        learned = {os: f.target for os, f in self.forecasts(settings).items()}
        return {os: max(learned.get(os, 0), fixed.get(os, 0)) for os in set(learned) | set(fixed)}

    def learn(self, demands: Iterable[Demand]) -> None:
        """Add past demand (arrival in this clock's seconds) to what learned sizing knows:
        ``dynvm replay --history``."""
        self._learned.extend(demands)
        self._sizing = None

    def observe(self, os: str, count: int) -> None:
        """A request for ``count`` VMs of ``os`` arrived now (served or not: it is demand)."""
        if self._sizing is not None:
            self._sizing.model.observe(os, self._clock(), count)

    def _model(self, settings: Settings, now: float) -> LearnedSizing:
        """The demand model: the last four weeks of history (and ``learn``'s), read again
        every ``reload_seconds``; in between, the requests this process sees."""
        stale = self._reload_seconds is not None and now - self._loaded_at >= self._reload_seconds
        if self._sizing is None or stale or self._sizing.margin != settings.ready_pools.margin:
            sizing = LearnedSizing(
                margin=settings.ready_pools.margin, interval=self.resize_seconds, pass_seconds=self.pass_seconds
            )
            documents = self.ctx.history.all(created_since=now - KEEP_SECONDS)
            demands = sorted([*requests_in_history(documents, now), *self._learned], key=lambda d: d.arrival_s)
            for demand in demands:
                sizing.model.observe(demand.os, demand.arrival_s, demand.count, demand.hold_s)
            self._sizing, self._loaded_at = sizing, now
        return self._sizing

    def targets_due(self, settings: Settings) -> bool:
        """Whether the next pass would compute the learned targets again (never with fixed
        targets): until then, a pass after which nothing happened would do nothing."""
        if settings.ready_pools.sizing != "learned":
            return False
        if self._sized_at is None or self._sized_at[1] != settings.ready_pools.margin:
            return True
        return self._clock() - self._sized_at[0] >= self.resize_seconds

    def forecasts(self, settings: Settings) -> dict[str, Forecast]:
        """The learned targets and what made them, computed at most every ``RESIZE_SECONDS``
        (sooner when the margin changed)."""
        now = self._clock()
        margin = settings.ready_pools.margin
        fresh = self._sized_at is not None and now - self._sized_at[0] < self.resize_seconds
        if fresh and self._sized_at is not None and self._sized_at[1] == margin:
            return self._forecasts
        sizing = self._model(settings, now)
        timing = self.policy.timing()
        oses = settings.os_keys
        weigher = placement.Weigher()
        room = self._room_by_os(settings, oses, weigher)
        slots = self._slots_by_os(settings, oses, weigher)
        maxima = {os: settings.ready_pools.maximum(os, slots.get(os, 0)) for os in oses}
        create = {os: timing.create_seconds(os) for os in oses}
        holds = self.policy.hold_seconds(settings, learned_only=True)
        self._forecasts = sizing.targets(now, create, room, maxima, oses, slots, holds)
        self._sized_at = (now, margin)
        return self._forecasts

    # -- reading ---------------------------------------------------------------------------

    def _room_by_os(self, settings: Settings, oses: list[str], weigher: placement.Weigher) -> dict[str, int]:
        """Per OS, how many of its VMs the pools could hold if they held nothing else: its
        ready VMs, and what fits with every other idle ready VM's room given back (as
        ``LeaseService.available_count``, in one read for all OSes). A host's room is
        weighed once per OS, and given back once per OS whose idle VMs it holds (plus once
        for the OSes it holds none of): not copied for every OS."""
        reserved = self.capacity.reserved_now()
        ready = [lease for lease in self.ctx.leases.pooled() if is_idle(lease)]
        rooms = self.capacity.rooms(settings, reserved)
        idle_on: dict[str, list[Lease]] = {}
        for lease in ready:
            idle_on.setdefault(lease.host_ref, []).append(lease)
        out = {os: sum(1 for lease in ready if lease.os == os) for os in oses}
        for host in settings.hosts:
            room = rooms.get(host.ref)
            if room is None:
                continue
            idle = idle_on.get(host.ref, [])
            kept = {lease.os for lease in idle}
            # the OS whose idle VMs stay (None: none) -> the room with the others' given back
            given: dict[str | None, HostRoom] = {} if idle else {None: room}
            for os in oses:
                need = self.ctx.provider.need(host, os, None, None)
                if need is None:
                    continue
                stays = os if os in kept else None
                if stays not in given:
                    given[stays] = back = room.copy()
                    for lease in idle:
                        if lease.os != stays:
                            give_back(back, lease)
                out[os] += weigher.fits(given[stays], need)
        return out

    def _slots_by_os(self, settings: Settings, oses: list[str], weigher: placement.Weigher) -> dict[str, int]:
        """Per OS, how many of its VMs the whole lab holds, empty (hosts that answer)."""
        overcommit = settings.common.cpu_overcommit
        out = dict.fromkeys(oses, 0)
        for host in settings.hosts:
            room = self.ctx.provider.room(host, overcommit, [], empty=True)
            if room is None:
                continue
            for os in oses:
                need = self.ctx.provider.need(host, os, None, None)
                if need is not None:
                    out[os] += weigher.fits(room, need)
        return out

    def status(self) -> list[PoolStatus]:
        settings = self.ctx.settings()
        pooled = self.ctx.leases.pooled()
        counts = self.ctx.leases.pool_counts(self._clock() - COUNTS_WINDOW)
        targets = self.targets(settings)
        learned = settings.ready_pools.sizing == "learned"
        forecasts = self.forecasts(settings) if learned else {}
        out = []
        for os in sorted(
            {os for os, n in targets.items() if n or learned} | {lease.os for lease in pooled} | set(counts)
        ):
            mine = [lease for lease in pooled if lease.os == os]
            handed, recycled = counts.get(os, (0, 0))
            out.append(
                PoolStatus(
                    os=os,
                    target=targets.get(os, 0),
                    ready=len(self.stock.idle(settings, os)),
                    refilling=sum(1 for lease in mine if lease.state == LeaseState.CREATING),
                    handed_out=handed,
                    recycled=recycled,
                    sizing=settings.ready_pools.sizing,
                    forecast=forecasts.get(os),
                )
            )
        return out

    # -- giving way to demand --------------------------------------------------------------

    def make_room(self, settings: Settings, request: LeaseRequest, count: int) -> list[Lease]:
        """A request for ``count`` more VMs than fit now: the pools give way
        (``GivingWay.make_room``); the VMs taken off them."""
        return self.way.make_room(settings, request, count)

    # -- the pass --------------------------------------------------------------------------

    def tick(self) -> TickReport:
        """One pass: recycle what must go, give way to a waiting queue, refill the rest.
        Called on the leader only; never raises for one VM's sake."""
        with self._lock:
            report = TickReport()
            if self.ctx.contested is not None:
                return report
            settings = self.ctx.settings()
            targets = self.targets(settings)
            everything = self.ctx.leases.pooled()  # read once a pass
            gone = self._recycle(settings, everything, targets, report)
            staying = [lease for lease in everything if lease.id not in gone]
            queued = self.ctx.requests.in_state(RequestState.QUEUED)
            if queued:
                report.yielded = self.way.make_way(settings, staying, queued)
            elif not self._lab_was_full(settings, targets):
                self._refill(settings, staying, targets, report)
            return report

    def _recycle(
        self, settings: Settings, everything: list[Lease], targets: dict[str, int], report: TickReport
    ) -> set[str]:
        """Release what must go; the ids of those it took (or tried to take) off the pools."""
        now = self._clock()
        pooled = [lease for lease in everything if is_idle(lease)]
        going: dict[str, tuple[Lease, str]] = {}
        unjoined = [lease for lease in everything if lease.state == LeaseState.READY and lease.pooled_at is None]
        alive = self.ctx.live_processes() if unjoined else set()  # read only when it decides something
        for lease in unjoined:  # made, but its maker died before it joined the pool
            if lease.owner not in alive:
                going[lease.id] = (lease, "recycled: its maker stopped before it joined the pool")
        running: dict[str, dict[str, tuple[str, ...]]] = {}  # host ref -> uuid -> addresses, read once a pass
        for lease in pooled:
            if lease.host_ref not in running:
                running[lease.host_ref] = self.stock.running_on(settings, lease.host_ref)
            up = (lease.ip or "") in running[lease.host_ref].get(lease.vm_uuid or "", ())
            if lease.expires_at <= now:
                going[lease.id] = (lease, f"recycled: ready for {settings.ready_pools.ready_ttl_minutes:g} min unused")
            elif settings.host(lease.host_ref) is None:
                going[lease.id] = (lease, "recycled: its host left the configuration")
            elif not up and self._settled(lease, now):
                going[lease.id] = (lease, "recycled: it stopped or lost its address while waiting")
        by_os: dict[str, list[Lease]] = {}
        for lease in sorted(pooled, key=oldest_first, reverse=True):  # the newest go first
            if lease.id not in going:
                by_os.setdefault(lease.os, []).append(lease)
        for os, ready in by_os.items():
            surplus = len(ready) - targets.get(os, 0)
            for lease in ready[: max(0, surplus)]:
                going[lease.id] = (lease, "recycled: over its pool's target")
        for lease, reason in going.values():
            _, taken = self.releaser.release(
                settings, [lease], [LeaseState.READY], LeaseState.RELEASED, reason, pooled=True
            )
            if taken:
                report.recycled.append(lease.name)
                log.info("ready pools: %s %s", lease.name, reason)
        return set(going)

    def _settled(self, lease: Lease, now: float) -> bool:
        """The mirror had time to show a VM that just joined the pool."""
        return (lease.pooled_at or 0) < now - 5.0

    def make_way(self, waiting: list[RequestRecord]) -> list[str]:
        """Requests wait for room: for each in turn, recycle the idle ready VMs whose room
        lets it fit now (``make_room``), newest first, but never those the waiting requests
        will take themselves (per OS, as many as they ask for, the oldest). The names
        recycled.

        Called by the scheduler's pass (on the leader) for the requests it leaves waiting,
        and by the pools' own pass: a ready VM never holds room a waiting request could
        start in, so a pool never makes the queue slower than no pool would. Never refills;
        never touches a VM a request has taken."""
        with self._lock:
            if self.ctx.contested is not None or not waiting:
                return []
            settings = self.ctx.settings()
            return self.way.make_way(settings, self.ctx.leases.pooled(), waiting)

    def _lab_was_full(self, settings: Settings, targets: dict[str, int]) -> bool:
        """A request waited or was refused for room less than one create time ago: a refill
        now would take room the next such request needs, and a VM being made that stops for
        it has spent its create for nothing. The pools then wait for a quiet moment."""
        timing = self.policy.timing()
        quiet = max((timing.create_seconds(os) for os, n in targets.items() if n > 0), default=0.0)
        return self.way.short_within(quiet)

    def _refill(self, settings: Settings, pooled: list[Lease], targets: dict[str, int], report: TickReport) -> None:
        targets = {os: n for os, n in targets.items() if n > 0}
        if not targets:
            return
        pooled = [lease for lease in pooled if lease.state in (LeaseState.CREATING, LeaseState.READY)]
        have = Counter(lease.os for lease in pooled)
        busy = Counter(lease.host_ref for lease in pooled if lease.state == LeaseState.CREATING)
        wanted = [(os, targets[os] - have[os]) for os in sorted(targets) if targets[os] > have[os]]
        if not wanted:
            return
        backing_off = {host.ref for host in settings.hosts if self._backoff.waiting(host.ref) > 0}
        for lease in self.admission.reserve_pool_vms(settings, wanted, busy, backing_off, self._headroom(settings)):
            report.started.append(lease.name)
            self.ctx.builders.submit(self._make, settings, lease, self.way.making(lease.id))

    def _headroom(self, settings: Settings) -> int:
        """With learned sizing, how many VMs the requests expected within one create time
        ask for, all OSes together: a refill never takes the room they would be made in (a
        VM being made can stop for a request, but its room shows only once it has removed
        what it made). In a lab with room to spare this holds nothing back."""
        if settings.ready_pools.sizing != "learned":
            return 0
        return math.ceil(sum(f.rate_per_hour * f.create_seconds / 3600 for f in self.forecasts(settings).values()))

    def _make(self, settings: Settings, lease: Lease, stop: threading.Event) -> None:
        """Make one ready VM (a builder thread); it joins its pool once it answers. ``stop``:
        set when it makes way for a request before it is made (``make_room``)."""
        ctx = self.ctx
        try:
            ready = self.creator.create_one(settings, lease, pinned=True, cancel=MakingCancel(ctx.cancel, stop))
        except Exception as e:
            if stop.is_set():
                why = "recycled while it was made: its room went to a request"
                ctx.leases.finish([lease.id], LeaseState.FAILED, self._clock(), why, by=Actor.BUILDER)
                log.info("ready pools: %s %s", lease.name, why)
                ctx.room_freed.set()
                return
            ctx.leases.finish([lease.id], LeaseState.FAILED, self._clock(), str(e), by=Actor.BUILDER)
            delay = self._backoff.failed(lease.host_ref)
            log.warning("ready pools: %s on host %s failed: %s", lease.name, lease.host_ref, e)
            log.warning("ready pools: host %s failed a refill; left alone for %.0f s", lease.host_ref, delay)
            return
        finally:
            self.way.made(lease.id)
        self._backoff.succeeded(lease.host_ref)  # it joined its pool as it turned ready (``Creator``)
        log.debug("ready pools: %s ready on host %s", ready.name, ready.host_ref)
        ctx.room_freed.set()  # a queued request may take it
