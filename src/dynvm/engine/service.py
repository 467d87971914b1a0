"""The lease engine, assembled: what the APIs, the CLI and the background loops call. No
HTTP here, no Xen: machines come from a ``provider.Provider``. It holds no rule of its
own: each is in one part, and each part is given only the parts it calls:

- ``admission.py``: validation, names, quota, the lock-and-place transaction;
- ``queue.py``: the way in (accept, queue, grant, cancel); ``scheduler.py`` and
  ``queue_policy.py``: who is served next, and when;
- ``build.py`` and ``creator.py``: a request's VMs made, held and handed over;
- ``release.py``: every end of a lease; ``upkeep.py``: expiry, recovery, reconcile;
- ``ready_pools.py`` and ``ready_stock.py``: VMs made ahead of demand;
- ``capacity.py``: what the hosts can hold, and the views of it;
- ``claim.py``: whether this database is the installation, or a copy.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..config import Settings
from ..model import ANONYMOUS, Caller, Lease, LeaseRequest
from ..provider import HostStatus, Machine, Provider, QuarantinedVm, ReconcileReport
from ..states import Actor, RequestState
from ..store.clones import CloneStore
from ..store.history import HistoryStore
from ..store.installation import InstallationStore
from ..store.leases import LeaseStore
from ..store.replicas import ReplicaStore
from ..store.requests import RequestRecord, RequestStore
from . import eta, placement
from .admission import Admission
from .build import Builder
from .capacity import Capacity, HostReport
from .claim import ClaimKeeper
from .context import EngineContext, LeaseEvents, process_name
from .creator import Creator
from .queue import Queue
from .queue_policy import QueuePolicy
from .ready_pools import RELOAD_SECONDS, ReadyPools
from .ready_stock import ReadyStock
from .release import ReleaseOutcome, Releaser
from .scheduler import Scheduler
from .tracker import DurableTracker
from .upkeep import Upkeep


class LeaseService:
    def __init__(
        self,
        settings: Callable[[], Settings],
        provider: Provider,
        lease_store: LeaseStore,
        history: HistoryStore,
        clock: Callable[[], float] = time.time,
        max_workers: int = 256,
        owner: str | None = None,
        events: LeaseEvents | None = None,
        pools_reload_seconds: float | None = RELOAD_SECONDS,
        builders: ThreadPoolExecutor | None = None,
    ) -> None:
        """``pools_reload_seconds``: how often the ready pools' demand model is read again
        from the history (None: once; ``dynvm replay``). ``builders``: the pool the builds
        and refills run on (None: one of its own; a replay gives one that counts them)."""
        db = lease_store.db
        ctx = EngineContext(
            settings=settings,
            provider=provider,
            leases=lease_store,
            requests=RequestStore(db, clock),
            history=history,
            replicas=ReplicaStore(db),
            clones=CloneStore(db),
            clock=clock,
            owner=process_name(owner),
            events=events or LeaseEvents(),
            max_workers=max_workers,
            given_builders=builders,
        )
        self.ctx = ctx
        self.installation_store = InstallationStore(db)
        ctx.claim = ClaimKeeper(self.installation_store, provider, settings, ctx.owner, clock, ctx.live_processes)
        self.tracker = DurableTracker(ctx.requests, ctx.owner)
        self.capacity = Capacity(settings, provider, lease_store)
        self.stock = ReadyStock(provider, lease_store, clock)
        self.policy = QueuePolicy(self.capacity, provider, lease_store, ctx.requests, clock)
        self.admission = Admission(ctx, self.capacity, self.stock, self.policy)
        self.releaser = Releaser(ctx, self.tracker)
        self.creator = Creator(ctx, self.admission, self.releaser, self.tracker)
        self.builder = Builder(ctx, self.creator, self.releaser, self.tracker)
        self.ready_pools = ReadyPools(
            ctx,
            self.stock,
            self.capacity,
            self.policy,
            self.admission,
            self.creator,
            self.releaser,
            reload_seconds=pools_reload_seconds,
        )
        self.queue = Queue(ctx, self.admission, self.builder, self.ready_pools, self.policy, self.tracker)
        self.scheduler = Scheduler(
            settings,
            self.policy,
            ctx.requests,
            self.stock,
            self.queue.grant,
            self.ready_pools.make_way,
            ctx.room_freed,
            ctx.report,
            clock,
        )
        self.scheduler.events = lambda kind, record: ctx.request_event(kind, record.id)
        self.upkeep = Upkeep(ctx, self.releaser, self.creator, self.capacity)

    # -- what the parts share, as callers read it -------------------------------------

    @property
    def lease_store(self) -> LeaseStore:
        return self.ctx.leases

    @property
    def request_store(self) -> RequestStore:
        return self.ctx.requests

    @property
    def claim(self) -> ClaimKeeper:
        assert self.ctx.claim is not None  # made in __init__
        return self.ctx.claim

    @property
    def owner(self) -> str:
        return self.ctx.owner

    @property
    def clock(self) -> Callable[[], float]:
        return self.ctx.clock

    @property
    def settings(self) -> Settings:
        return self.ctx.settings()

    @property
    def events(self) -> LeaseEvents:
        return self.ctx.events

    @events.setter
    def events(self, events: LeaseEvents) -> None:
        self.ctx.events = events

    @functools.cached_property
    def installation(self) -> str:
        """This installation's id: the provider writes it into the mark of every machine
        and disk it makes for this database."""
        return self.installation_store.installation_id()

    # -- requests ----------------------------------------------------------------------

    def acquire(self, request: LeaseRequest) -> list[Lease]:
        return self.queue.acquire(request)

    def open_request(self, request: LeaseRequest, wait_seconds: float, origin: str) -> RequestRecord:
        return self.queue.open_request(request, wait_seconds, origin)

    def submit(self, request: LeaseRequest, wait_seconds: float, origin: str = "v1") -> RequestRecord:
        return self.queue.submit(request, wait_seconds, origin)

    def cancel(self, request_id: str, caller: Caller = ANONYMOUS) -> RequestRecord:
        return self.queue.cancel(request_id, caller)

    def leases_of(self, request_id: str) -> list[Lease]:
        return self.queue.leases_of(request_id)

    def eta_accuracy(self, window: float = eta.ACCURACY_WINDOW) -> eta.Accuracy:
        """The queue's ETA, as measured: how far the first one each request was given was
        from when it was served, over the requests served in the last ``window`` seconds."""
        return eta.accuracy(self.ctx.requests.eta_outcomes(self.ctx.clock() - window))

    # -- held leases -------------------------------------------------------------------

    def release(self, username: str, count: int = 1, caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        return self.releaser.release_user(username, count, caller)

    def release_names(self, names: list[str], caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        return self.releaser.release_names(names, caller)

    def extend(self, name: str, minutes: float, caller: Caller = ANONYMOUS) -> Lease:
        return self.releaser.extend(name, minutes, caller)

    # -- what the hosts hold -----------------------------------------------------------

    def available_count(self, os: str) -> int:
        """How many VMs of ``os`` a request could get now: its ready pool's idle VMs, and
        what can still be made, counting the room idle ready VMs of other OSes would give
        back (they make way for a request). Never a VM that could not be delivered."""
        settings = self.settings
        self.capacity.check_os(settings, os)
        candidates = self.capacity.candidates(settings, os, None, None, self.capacity.reserved_now())
        ready = self.stock.idle(settings, os)
        candidates = self.stock.give_back_idle(candidates, exclude={lease.id for lease in ready})
        return len(ready) + placement.available(candidates)

    def host_statuses(self) -> dict[str, HostStatus]:
        return self.capacity.host_statuses()

    def host_reports(self) -> list[HostReport]:
        return self.capacity.host_reports()

    def machines(self, os: str | None = None) -> dict[str, list[Machine]]:
        return self.capacity.machines(os)

    def template_problems(self) -> list[str]:
        return self.capacity.template_problems()

    def quarantined(self) -> list[QuarantinedVm]:
        return self.upkeep.quarantined()

    # -- upkeep (the background loops) -------------------------------------------------

    def heartbeat(self) -> None:
        self.upkeep.heartbeat()

    def expire_due(self) -> list[str]:
        return self.upkeep.expire_due()

    def recover(self) -> list[str]:
        return self.upkeep.recover()

    def reconcile(self, startup: bool = False) -> ReconcileReport:
        return self.upkeep.reconcile(startup)

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for ``grace`` seconds, then
        cancel the rest (their VMs are removed) and wait for the roll-back. Legacy requests
        queued here are cancelled: their callers' connections end with this process."""
        ctx = self.ctx
        ctx.stopping.set()
        for record in ctx.requests.in_state(RequestState.QUEUED):
            if record.origin == "legacy" and record.owner == ctx.owner:
                why = "dynvm stopped while its caller waited"
                ctx.requests.end_cancelled(record.id, [RequestState.QUEUED], why, by=Actor.RECOVERY)
        self.builder.wait_idle(grace)
        ctx.cancel.set()  # a build not started yet runs now, sees it, and rolls back what it reserved
        ctx.builders.shutdown(wait=True)
        ctx.creates.shutdown(wait=True, cancel_futures=True)
        ctx.side_by_side.shutdown()  # last: the builds' roll-backs destroyed through it
