"""``dynvm replay TRACE``: what users would have seen had this demand met this lab and
this pool policy — on a virtual clock, with dynvm's own engine.

The engine is the real one: ``LeaseService`` with its placement, queue, scheduler, ready
pools and learned sizing, on a real SQLite file; only the hosts are a model (``model.py``)
and time is virtual. Events are taken in time order: a request arrives (it is served now,
or waits in the queue up to ``wait_minutes``), VMs are released after their hold, and every
``TICK_SECONDS`` the pools' pass runs (and the scheduler's, when requests wait). A pass is
skipped when nothing happened since the last one (no arrival, release or finished create)
and learned sizing would not compute its targets again: it would do what the last one did,
which is nothing; nor when every pool holds exactly its target, no request waits and
the targets hold (``_at_targets``). ``tests/replay`` checks that skipping changes no figure.

Time to VM: a request served whole from a ready pool counts the handout as measured (wall
time, in seconds); one with any VM made for it counts the create time; one that waited
adds its wait. VM-hours used: what users held. Idle: ready-pool VMs' time without a user,
from the start of their create to their handout or recycling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings, load_settings
from ..engine.service import LeaseService
from ..model import Lease, LeaseError, LeaseRequest
from ..states import RequestState
from ..store.db import Database
from ..store.history import HistoryStore
from ..store.leases import LeaseStore
from ..trace import Demand
from .model import CountedBuilders, ModelHosts, VirtualClock

WEEK_SECONDS = 7 * 24 * 3600.0
TICK_SECONDS = 10.0  # a pools pass (and a scheduler pass, when requests wait), in trace time (the service: a second)
RESIZE_SECONDS = 60.0  # learned targets hold this long in a replay, as in the service
POLICIES = ("none", "fixed", "learned")


@dataclass(frozen=True)
class ReplayOptions:
    hosts: int = 4
    create_seconds: float = 65.0
    policy: str = "learned"
    fixed: Mapping[str, int] = field(default_factory=dict)  # targets per OS, policy "fixed"
    margin: float = 1.0
    maximum: int | None = None  # <os>.max for learned sizing (None: the default, from the lab's size)
    wait_minutes: float = 60.0  # how long a request that does not fit waits in the queue
    start: float = 0.0  # replay the trace from this trace second on (a slice)
    hours: float | None = None  # and this many hours of it (None: to its end)


@dataclass
class ReplayResult:
    requests: int = 0
    vms: int = 0
    refused: int = 0
    queued: int = 0
    warm: int = 0  # requests served whole from a ready pool
    warm_vms: int = 0  # VMs handed out from a ready pool (a batch may take some warm, make the rest cold)
    ttv: list[float] = field(default_factory=list)  # per served request, trace seconds
    queue_waits: list[float] = field(default_factory=list)
    vm_seconds_used: float = 0.0
    vm_seconds_idle: float = 0.0
    wall_seconds: float = 0.0

    def summary(self) -> dict[str, float | int]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return 0.0
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        used, idle = self.vm_seconds_used / 3600, self.vm_seconds_idle / 3600
        return {
            "requests": self.requests,
            "vms": self.vms,
            "warm_requests": self.warm,
            "ttv_p50_s": round(pct(self.ttv, 0.50), 3),
            "ttv_p95_s": round(pct(self.ttv, 0.95), 3),
            "ttv_p99_s": round(pct(self.ttv, 0.99), 3),
            "ttv_mean_s": round(statistics.fmean(self.ttv), 3) if self.ttv else 0.0,
            "refused": self.refused,
            "queued": self.queued,
            "queue_wait_p95_s": round(pct(self.queue_waits, 0.95), 1),
            # over every request served (0 for one served at once): a policy that makes more
            # requests wait shows here even when each waits less
            "queue_wait_mean_s": round(sum(self.queue_waits) / len(self.ttv), 1) if self.ttv else 0.0,
            "warm_vm_pct": round(self.warm_vms / self.vms * 100, 1) if self.vms else 0.0,
            "vm_hours_used": round(used, 2),
            "vm_hours_idle": round(idle, 2),
            "overhead_pct": round(idle / used * 100, 2) if used else 0.0,
            "wall_seconds": round(self.wall_seconds, 1),
        }


def replay_sections(oses: Iterable[str], options: ReplayOptions) -> dict[str, dict[str, str]]:
    """The config sections a replay sets, virtual or live: no expiry nor probe to get in the
    way, and the pools as the policy says."""
    sections = {
        "common": {"vm.expiry.minutes": "100000", "vm.network.timeout.secs": "400"},
        "probe": {"enabled": "false"},
    }
    if options.policy != "none":
        pools = {"ready.ttl.minutes": "100000", "refill.per.host": "1000"}
        if options.policy == "learned":
            pools |= {"sizing": "learned", "sizing.margin": f"{options.margin:g}"}
            if options.maximum is not None:
                pools |= {f"{os}.max": str(options.maximum) for os in sorted(oses)}
        else:
            pools |= {f"{os}.ready": str(n) for os, n in sorted(options.fixed.items())}
        sections["pools"] = pools
    return sections


def _config(path: Path, oses: Iterable[str], options: ReplayOptions) -> Path:
    lines: list[str] = []
    for section, values in replay_sections(oses, options).items():
        lines += [f"[{section}]", *(f"{key}={value}" for key, value in values.items()), ""]
    for n in range(1, options.hosts + 1):
        lines += [f"[xenhost{n}]", "host.name=http://127.0.0.1:9", "host.user=replay", "host.password=unused"]
        lines += ["host.storage.name=model", *(f"{os}.template=model-{os}" for os in sorted(oses)), ""]
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def model_engine(
    oses: Iterable[str], options: ReplayOptions, clock: VirtualClock
) -> Iterator[tuple[LeaseService, ModelHosts]]:
    """dynvm's engine (``LeaseService``) on ``options.hosts`` model hosts, a SQLite file in
    memory-backed scratch space and ``clock``: what a replay runs, and what the engine bench
    and the hot-path test measure. Stopped and removed on leaving."""
    work = Path(tempfile.mkdtemp(prefix="dynvm-replay-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        settings = load_settings(_config(work / "replay.ini", oses, options))
        db = Database(f"sqlite:///{work / 'replay.db'}")
        db.migrate()
        hosts = ModelHosts(clock, options.create_seconds)
        hosts.apply(settings)
        builders = CountedBuilders(clock)
        service = LeaseService(
            lambda: settings,
            hosts,
            LeaseStore(db),
            HistoryStore(db, None, clock),
            clock=clock,
            pools_reload_seconds=None,  # the demand model learns from this replay alone
            builders=builders,
        )
        service.ready_pools.resize_seconds = RESIZE_SECONDS
        service.ready_pools.pass_seconds = TICK_SECONDS  # a VM taken is refilled at the next pass
        try:
            yield service, hosts
        finally:
            clock.advance(float("inf"))  # creates still waiting for the clock end now
            service.shutdown(grace=5)
            db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Replay:
    skip_idle_passes = True  # tests turn it off to show that skipping changes nothing

    def __init__(self, trace: list[Demand], options: ReplayOptions, history: list[Demand] | None = None) -> None:
        """``trace``: the whole trace (the slice ``options`` names is replayed); ``history``:
        a past trace, as a running lab would know it (``known_before``)."""
        self.trace = slice_of(trace, options.start / 3600, options.hours)
        self.options = options
        self.history = known_before(trace, options.start, history or [])
        self.clock = VirtualClock(options.start)
        self.result = ReplayResult()
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._waiting: dict[str, tuple[Demand, float]] = {}  # request id -> (demand, arrival)
        self._changed = True  # something happened since the last pools pass

    def _at(self, t: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self) -> ReplayResult:
        started = time.perf_counter()
        oses = {d.os for d in [*self.trace, *self.history]} or {"centos"}
        with model_engine(oses, self.options, self.clock) as (service, hosts):
            if self.history:  # what a running lab would know at the slice's start
                service.ready_pools.learn(self.history)
            self.service, self.hosts = service, hosts
            builders = service.ctx.builders
            assert isinstance(builders, CountedBuilders)  # as model_engine makes it
            self.builders = builders
            self._play()
            self._account()
        self.result.wall_seconds = time.perf_counter() - started
        return self.result

    def _play(self) -> None:
        for n, demand in enumerate(self.trace):
            self._at(demand.arrival_s, "arrive", (n, demand))
        end = self.trace[-1].arrival_s if self.trace else 0.0
        t = self.options.start
        while t <= end:
            self._at(t, "tick")
            t += TICK_SECONDS
        while self._events:
            when, _, kind, payload = heapq.heappop(self._events)
            if when > self.clock.now:
                wakes = self.hosts.next_wake() <= when
                self.clock.advance(when)
                if wakes:
                    self._settle()  # ready-pool VMs whose create ends by now are ready
                    self._changed = True
            if kind in ("arrive", "release"):
                self._changed = True
            if kind == "arrive":
                self._arrive(*payload)  # type: ignore[misc]  # an event's payload is the tuple _arrive takes for that kind of event
            elif kind == "release":
                self._release(payload)  # type: ignore[arg-type]  # an event's payload is the name list _release takes for that kind of event
            elif kind == "tick":
                self._tick()
            if kind == "release" and self._waiting:  # room was given back: the queue may move
                self._serve_queue()
            if not self._events and self._waiting:
                self._at(self.clock.now + TICK_SECONDS, "tick")  # the queue drains after the trace ends

    def _arrive(self, n: int, demand: Demand) -> None:
        service = self.service
        self.result.requests += 1
        request = LeaseRequest(f"r{n}-{demand.user}"[:64], demand.os, count=demand.count)
        started = time.perf_counter()
        try:
            leases = service.acquire(request)
        except LeaseError:
            if self.options.wait_minutes <= 0:
                self.result.refused += 1
                return
            try:
                record = service.submit(request, self.options.wait_minutes * 60, "v1")
            except LeaseError:
                self.result.refused += 1
                return
            self.result.queued += 1
            self._waiting[record.id] = (demand, self.clock.now)
            return
        handout = time.perf_counter() - started
        self._served(demand, leases, handout, 0.0)

    def _served(self, demand: Demand, leases: list[Lease], handout: float, waited: float) -> None:
        """A request's time is its slowest VM's: a handout when every VM came warm, else a create."""
        names = [lease.name for lease in leases]
        warm_vms = sum(1 for lease in leases if lease.pooled_at)
        warm = warm_vms == len(leases)
        self.result.warm_vms += warm_vms
        ttv = waited + (handout if warm else self.options.create_seconds)
        self.result.ttv.append(ttv)
        self.result.vms += len(names)
        self.result.warm += 1 if warm else 0
        self.result.vm_seconds_used += demand.hold_s * len(names)
        self._at(self.clock.now + ttv - waited + demand.hold_s, "release", names)

    def _release(self, names: list[str]) -> None:
        with contextlib.suppress(LeaseError):  # gone already: nothing held
            self.service.release_names(names)

    def _tick(self) -> None:
        pools = self.service.ready_pools
        settings = self.service.settings
        idle = (
            not self._waiting and not pools.targets_due(settings) and (not self._changed or self._at_targets(settings))
        )
        if idle and self.skip_idle_passes:
            return
        self._changed = False
        report = pools.tick()
        if report.started:
            self._settle()  # the refills have begun and wait for the clock
        if self._waiting:
            self._serve_queue()

    def _at_targets(self, settings: Settings) -> bool:
        """Every pool holds exactly its target (made or being made): a pass would then
        recycle nothing (none over target; in a replay none expires, stops or loses its
        host) and refill nothing, whatever happened since the last. One count, where a
        pass reads every pool VM."""
        targets = {os: n for os, n in self.service.ready_pools.targets(settings).items() if n > 0}
        return self.service.lease_store.pool_stock() == targets

    def _settle(self) -> None:
        """Refills and grants are made by the engine's builder threads: let them finish
        (the model makes a VM at once; its virtual create time is in ``runs_at``), until
        all that is left waits for the virtual clock. A made ready-pool VM has joined its
        pool once its refill has ended: it joins as it turns ready, in one statement (else
        a skipped pass could leave it outside). Told by the builders' pool, not by polling
        the database: the polls were a tenth of a busy replay's time."""
        self.builders.settled(self.hosts, timeout=30)

    def _serve_queue(self) -> None:
        service = self.service
        service.scheduler.run_pass()
        self._settle()
        for request_id, (demand, arrived) in list(self._waiting.items()):
            record = service.request_store.get(request_id)
            if record is None or not record.finished:
                continue
            del self._waiting[request_id]
            if record.state != RequestState.READY:
                self.result.refused += 1
                continue
            leases = service.leases_of(request_id)
            waited = self.clock.now - arrived
            self.result.queue_waits.append(waited)
            self._served(demand, leases, 0.0, waited)

    def _account(self) -> None:
        end = self.trace[-1].arrival_s if self.trace else 0.0
        self.result.vm_seconds_idle = idle_seconds(self.service.lease_store.ever_pooled(), end)


def idle_seconds(ever_pooled: Iterable[Lease], end: float) -> float:
    """Idle VM-seconds: every ready-pool VM's life without a user, from the start of its
    create to its handout or end, up to ``end`` (clock seconds)."""
    idle = 0.0
    for lease in ever_pooled:
        if not lease.pooled and lease.handed_over_at is not None:
            stop = lease.handed_over_at
        else:
            stop = lease.released_at if lease.released_at is not None else end
        idle += max(0.0, min(stop, end) - lease.created_at)
    return idle


def known_before(trace: list[Demand], start: float, past: list[Demand]) -> list[Demand]:
    """What a lab running since before the trace knows when the replay starts at ``start``:
    ``past`` (another trace), moved back by whole weeks to end before the trace's time 0,
    so its hours of the week stay the trace's; then the trace's own requests before
    ``start`` (a slice from Monday 07:30 knows Monday's night)."""
    out = []
    if past:
        weeks = math.ceil((past[-1].arrival_s + 1) / WEEK_SECONDS)
        out = [dataclasses.replace(d, arrival_s=d.arrival_s - weeks * WEEK_SECONDS) for d in past]
    return out + [d for d in trace if d.arrival_s < start]


def slice_of(trace: list[Demand], from_hour: float, hours: float | None) -> list[Demand]:
    """The requests arriving from ``from_hour`` for ``hours`` (None: to the end), their
    times kept: a slice keeps its place in the week."""
    start = from_hour * 3600
    stop = float("inf") if hours is None else start + hours * 3600
    return [d for d in trace if start <= d.arrival_s < stop]
