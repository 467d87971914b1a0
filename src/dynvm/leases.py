"""The lease engine's front: acquire and release leases (no HTTP here, no Xen: machines
come from a ``provider.Provider``). Its parts, one concept each, are in ``engine/``:
waiting requests (``queue.py``, ``requests.py``, ``scheduler.py``, ``eta.py``), where VMs
go (``placement.py``), one VM's create and destroy (``lifecycle.py``), and expiry,
recovery and reconcile (``upkeep.py``).

``acquire`` names the VMs (SPEC.md §1), refuses names held by a lease or by any VM on any
host, reserves room on the chosen hosts and inserts the leases in one write transaction
(so two requests never both get the last slot), then creates the VMs in parallel. It is
all-or-nothing: if one VM still fails after its retries, the others are destroyed, every
reservation is given back, and the error says what failed where.

Every exit gives a reservation back or turns it into a lease: success (ready), failure
(failed, VMs destroyed), an exception (same), the client going away (the create carries
on and becomes a lease the user can release, or that expires), dynvm stopping (creates in
flight are cancelled and rolled back).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import cast

from sqlalchemy.engine import Connection
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from .config import HostSettings, Settings
from .engine import placement
from .engine.claim import ClaimKeeper, Contested
from .engine.lifecycle import Lifecycle, ReleaseOutcome
from .engine.queue import Queueing, _record_of, _RequestCancel
from .engine.ready_pools import ReadyPools
from .engine.requests import (
    QUEUED,
    DurableTracker,
    RequestRecord,
    RequestStore,
)
from .engine.scheduler import Scheduler
from .engine.upkeep import ReconcileReport, Upkeep
from .model import (
    ANONYMOUS,
    BadRequest,
    Caller,
    CreateFailed,
    Forbidden,
    Lease,
    LeaseError,
    LeaseRequest,
    NameInUse,
    NoSuchLease,
    NotEnoughCapacity,
    QuotaExceeded,
    RequestCancelled,
    ShuttingDown,
    UnknownOs,
    vm_names,
)
from .provider import HostStatus, Machine, Provider
from .store.history import HistoryStore
from .store.leases import LeaseStore

log = logging.getLogger(__name__)

REPLICA_STALE_SECONDS = 10.0  # a replica silent this long is dead (it beats every 2 s)
ROOM_SHOWS_WITHIN = 5.0  # seconds the hosts may take to report the room of VMs just destroyed


class LeaseEvents:
    """What the service reports as it works (metrics listen); every method is a no-op here."""

    def created(self, lease: Lease) -> None: ...
    def create_failed(self, reason: str) -> None: ...
    def ended(self, lease: Lease, state: str) -> None: ...
    def reconciled(self, report: ReconcileReport) -> None: ...
    def request_event(self, kind: str, record: RequestRecord) -> None: ...
    def handed_out(self, lease: Lease, how: str, seconds: float) -> None: ...
    def scheduler_passed(self, seconds: float) -> None: ...
    def refused(self, reason: str) -> None: ...


@dataclass(frozen=True)
class HostReport:
    """A configured host as the API shows it: what the provider sees, and how many more
    VMs of each of its OSes fit now."""

    host: HostSettings
    status: HostStatus
    capacity: dict[str, int]


class LeaseService(Lifecycle, Queueing, Upkeep):
    """The lease engine: acquire, create, release (here), the queue (``engine/queue.py``)
    and upkeep (``engine/upkeep.py``)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        provider: Provider,
        leases: LeaseStore,
        history: HistoryStore,
        clock: Callable[[], float] = time.time,
        max_workers: int = 256,
        owner: str | None = None,
        events: LeaseEvents | None = None,
    ) -> None:
        self._settings = settings
        self.provider = provider
        self.leases = leases
        self.history = history
        self.clock = clock
        # "<replica name>#<this boot>": a restarted replica knows its own earlier creates are dead
        self.owner = f"{owner or 'dynvm'}#{uuid.uuid4().hex[:12]}"
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="create")
        # a request's build waits on its VMs' creates: never in the create pool, or a full
        # pool of builds would wait for creates that no thread is left to run
        self._builders = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="build")
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        self._in_flight = 0
        self._idle = threading.Condition()
        self.requests = RequestStore(leases.db, clock)
        self.tracker = DurableTracker(self.requests, self.owner)
        self.scheduler = Scheduler(self, self.requests, clock)
        self.ready_pools = ReadyPools(self, clock)
        self.scheduler.events = lambda kind, record: self._request_event(kind, record.id)
        self.events = events or LeaseEvents()
        self._releasing: Counter[str] = Counter()  # lease ids this process is releasing right now
        self._releasing_lock = threading.Lock()
        self.claim = ClaimKeeper(leases, provider, settings, self.owner, clock, lambda: self._live_processes())

    def refuse_if_contested(self) -> None:
        """Raise ``Contested`` once another process group is known to act for this
        installation (``engine/claim.py``): from then on this process touches no host."""
        if self.claim.contested is not None:
            raise Contested(self.claim.contested)

    @functools.cached_property
    def installation(self) -> str:
        """This installation's id: the provider writes it into the mark of every machine
        and disk it makes for this database."""
        return self.leases.installation_id()

    @property
    def settings(self) -> Settings:
        return self._settings()

    def _report(self, event: str, *args: object) -> None:
        """Tell the listeners (metrics); a failing listener never fails the lease work."""
        try:
            getattr(self.events, event)(*args)
        except Exception:
            log.exception("reporting %s failed", event)

    # -- capacity ----------------------------------------------------------------------

    def candidates(
        self, settings: Settings, os: str, reserved: list[dict[str, object]], only: str | None = None
    ) -> list[placement.Candidate]:
        """Where a VM of ``os`` with its template's resources could go, host by host."""
        return self._candidates(settings, os, None, None, reserved, only)

    def _candidates(
        self,
        settings: Settings,
        os: str,
        req_cpus: int | None,
        req_memory: int | None,
        reserved: list[dict[str, object]],
        only: str | None = None,
    ) -> list[placement.Candidate]:
        out = []
        for host in settings.hosts:
            if only is not None and host.ref != only:
                continue
            need = self.provider.need(host, os, req_cpus, req_memory)
            if need is None:
                continue
            room = self.provider.room(
                host, settings.common.cpu_overcommit, [r for r in reserved if r["host_ref"] == host.ref]
            )
            if room is not None:
                out.append(placement.Candidate(host, room, need))
        return out

    def _explain_shortage(self, settings: Settings, message: str, request: LeaseRequest) -> str:
        """Add why the hosts that give nothing give nothing: down (and why), refusing
        dynvm's login, or without the template."""
        reasons = []
        for host in settings.hosts:
            if request.host_ref is not None and host.ref != request.host_ref:
                continue
            reason = self.provider.shortage(host, request.os)
            if reason is not None:
                reasons.append(reason)
        if not reasons:
            return message
        return message.removesuffix(placement.FULL_HINT) + "; " + "; ".join(reasons)

    def template_problems(self) -> list[str]:
        """Every ``<os>.template`` line that picks no template on its (answering) host:
        missing, or ambiguous. Logged at start-up; that OS gets no VM on that host."""
        return [problem for host in self.settings.hosts for problem in self.provider.template_problems(host)]

    def check_os(self, settings: Settings, os: str) -> None:
        if not any(os in host.templates for host in settings.hosts):
            known = ", ".join(settings.os_keys) or "none (no host is configured)"
            raise UnknownOs(f"unknown OS {os!r}; the OSes that exist are: {known}")

    def available_count(self, os: str) -> int:
        """How many VMs of ``os`` a request could get now: its ready pool's idle VMs, and
        what can still be made, counting the room idle ready VMs of other OSes would give
        back (they make way for a request). Never a VM that could not be delivered."""
        settings = self.settings
        self.check_os(settings, os)
        with self.leases.db.read() as conn:
            reserved = self.reservations(conn)
        candidates = self._candidates(settings, os, None, None, reserved)
        ready = self.ready_pools.idle(settings, os)
        mine = {lease.id for lease in ready}
        self.ready_pools.give_back_idle(candidates, exclude=mine)
        return len(ready) + placement.available(candidates)

    def host_statuses(self) -> dict[str, HostStatus]:
        """What the provider sees of each configured host it knows, by ref (no capacity)."""
        out = {}
        for host in self.settings.hosts:
            status = self.provider.status(host)
            if status is not None:
                out[host.ref] = status
        return out

    def host_reports(self) -> list[HostReport]:
        """Every configured host the provider knows, in the configuration's order."""
        settings = self.settings
        with self.leases.db.read() as conn:
            reserved = self.reservations(conn)
        out = []
        for host in settings.hosts:
            status = self.provider.status(host)
            if status is None:
                continue
            # the host's room is the same for every OS: read it once (a host holds hundreds of VMs)
            mine = [r for r in reserved if r["host_ref"] == host.ref]
            room = self.provider.room(host, settings.common.cpu_overcommit, mine)
            per_os = {}
            for os in sorted(host.templates):
                need = self.provider.need(host, os, None, None)
                per_os[os] = room.fits(need) if room is not None and need is not None else 0
            out.append(HostReport(host, status, per_os))
        return out

    def machines(self, os: str | None = None) -> dict[str, list[Machine]]:
        """The machines on every configured host (a host that is down has none listed), by
        host ref; with ``os``, only the running ones made for that OS: by their lease's OS,
        or, for one without a lease, by what the provider finds on it."""
        settings = self.settings
        if os is not None:
            self.check_os(settings, os)
        lease_os = {lease.id: lease.os for lease in self.leases.active()} if os else {}
        out: dict[str, list[Machine]] = {}
        for host in settings.hosts:
            found = self.provider.machines(host)
            if os is not None:
                found = [
                    m
                    for m in found
                    if m.running
                    and (
                        lease_os.get(m.lease_id or "") == os
                        or (os in host.templates and self.provider.made_for(host, m, os))
                    )
                ]
            out[host.ref] = found
        return out

    # -- acquire -----------------------------------------------------------------------

    def acquire(self, request: LeaseRequest) -> list[Lease]:
        """Create ``request.count`` VMs and return their leases, ready, with IPs.

        Blocks for as long as the VMs take to boot: call it from a worker thread."""
        request_id = request.request_id or str(uuid.uuid4())
        request = self.counted_host(request)
        try:
            self.validate(request)
        except LeaseError as e:
            self.refuse(None, request, e)
            raise
        self.tracker.start(request_id, request.username, request.os, request.count)
        settings = self.settings
        try:
            new = self._reserve_now(settings, request, request_id)
        except LeaseError as e:
            self.refuse(request_id, request, e)
            raise
        except Exception as e:
            self.tracker.finish(request_id, e)
            raise
        try:
            leases = self._build(settings, new, request_id, pinned=request.host_ref is not None)
        except Exception as e:
            self.tracker.finish(request_id, e)
            raise
        self.tracker.finish(request_id)
        return leases

    def reservations(self, conn: Connection) -> list[dict[str, object]]:
        """The reservations of creates in flight, each on the configured host that counts
        its pool: one made on a section that turned out to name a pool an earlier section
        counts (its leases move there at the next reconcile) holds room there at once."""
        rows = self.leases.pending_reservations(conn)
        moved = self.same_pools(self.settings) if rows else {}  # hot path: no look at hosts for no row
        if not moved:
            return rows
        return [{**row, "host_ref": moved.get(str(row["host_ref"]), row["host_ref"])} for row in rows]

    def counted_host(self, request: LeaseRequest) -> LeaseRequest:
        """A request pinned (``xhostref``) to a section that names the same pool as an
        earlier one goes to that earlier one, which counts the pool."""
        host = self.settings.host(request.host_ref) if request.host_ref is not None else None
        status = self.provider.status(host) if host is not None else None
        if status is None or not status.same_pool_as:
            return request
        return dataclasses.replace(request, host_ref=status.same_pool_as)

    def validate(self, request: LeaseRequest) -> None:
        """Refuse, at once, a request that can never be served as asked (a count over the
        limit, an unknown OS, a host that does not exist or lacks the OS). Cheap: reads
        only the configuration. ``acquire`` calls it too."""
        self.refuse_if_contested()
        settings = self.settings
        if request.count > settings.quota.max_count_per_request:
            raise QuotaExceeded(
                f"count {request.count} is over the limit of {settings.quota.max_count_per_request} VMs per request "
                "([quota] max.count.per.request)"
            )
        self.check_os(settings, request.os)
        if request.host_ref is not None:
            host = settings.host(request.host_ref)
            if host is None:
                refs = ", ".join(h.ref for h in settings.hosts)
                raise BadRequest(f"no host {request.host_ref}; xhostref is one of: {refs}")
            if request.os not in host.templates:
                raise BadRequest(
                    f"host {request.host_ref} has no {request.os} template; choose another xhostref or leave it out"
                )

    def _reserve_now(self, settings: Settings, request: LeaseRequest, request_id: str) -> list[Lease]:
        """Reserve a request that does not wait. When it does not fit, idle ready-pool VMs
        make way (``Pools.make_room``) and it is tried again once their room shows (the
        hosts report a destroyed VM's room a moment later); else the shortage stands."""
        self.ready_pools.observe(request.os, request.count)
        try:
            return self._reserve(settings, request, request_id, immediate=True)
        except NotEnoughCapacity as shortage:
            waits = any(r.os == request.os for r in self.requests.in_state(QUEUED))  # then it takes none
            takes = self.ready_pools.eligible(request.cpus, request.memory) and not waits
            warm = len(self.ready_pools.idle(settings, request.os, request.host_ref)) if takes else 0
            cold = request.count - min(warm, request.count)
            if not self.ready_pools.make_room(settings, request, cold):
                raise shortage from None
        for attempt in Retrying(
            retry=retry_if_exception_type(NotEnoughCapacity),
            stop=stop_after_delay(ROOM_SHOWS_WITHIN),
            wait=wait_fixed(0.05),
            reraise=True,
        ):
            with attempt:
                return self._reserve(settings, request, request_id, immediate=True)
        raise AssertionError("unreachable: Retrying reraises")

    def _reserve(self, settings: Settings, request: LeaseRequest, request_id: str, immediate: bool) -> list[Lease]:
        """Name the VMs, reserve their room and insert their leases, in one transaction;
        ready-pool VMs of the OS are taken first (``engine/ready_pools.py``), the rest made cold.
        ``immediate``: a request that does not wait, which may take room (or ready VMs)
        only if that delays no queued request (``Scheduler.may_serve_now``)."""
        if self._stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.validate(request)
        names = vm_names(request.username, request.count)
        self._refuse_leased_names(self.leases.by_name(names), request)
        self._refuse_names_of_others(request)
        self._refuse_names_on_hosts(names)
        now = self.clock()
        minutes = settings.common.expiry_minutes
        if request.expires_in_minutes is not None:
            minutes = min(request.expires_in_minutes, minutes)
        with self.leases.db.write() as conn:
            self._refuse_leased_names(self.leases.by_name(names, conn), request)
            self.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            # read with the hosts locked: a prefix has no unique index, so two requests
            # checking it at once must not both pass
            self._refuse_names_of_others(request, conn)
            reserved = self.reservations(conn)
            queued = self.requests.in_state(QUEUED) if immediate else []
            ready = []
            if self.ready_pools.eligible(request.cpus, request.memory) and not any(r.os == request.os for r in queued):
                # read with the hosts locked, so what another request took is seen taken
                # (and those who wait for this OS are served from its pool first)
                ready = self.ready_pools.idle(settings, request.os, request.host_ref, limit=request.count)
            warm = ready[: request.count]
            cold_names = names[len(warm) :]
            chosen: list[placement.Placement] = []
            if cold_names:
                candidates = self._candidates(
                    settings, request.os, request.cpus, request.memory, reserved, only=request.host_ref
                )
                try:
                    chosen = placement.place(len(cold_names), request.os, candidates)
                except NotEnoughCapacity as e:
                    raise NotEnoughCapacity(self._explain_shortage(settings, str(e), request)) from None
                cold = dataclasses.replace(_record_of(request, request_id), count=len(cold_names))
                if queued and not self.scheduler.may_serve_now(settings, reserved, cold):
                    raise NotEnoughCapacity(
                        f"not enough capacity for {request.count} {request.os} VM(s) now: {len(queued)} request(s) "
                        "wait in the queue for the room it would take; ask with wait=<minutes> to queue behind them"
                    )
            memory = [lease.memory for lease in warm] + [c.need.static_max for c in chosen]
            self._check_quota(settings, request, memory, conn)
            taken = []
            for name, lease in zip(names, warm, strict=False):
                mine = dataclasses.replace(
                    lease,
                    request_id=request_id,
                    name=name,
                    username=request.username,
                    caller=request.caller,
                    owner=self.owner,
                    created_at=now,
                    expires_at=now + minutes * 60,
                )
                if not self.leases.take_pooled(conn, lease, mine):
                    raise NotEnoughCapacity(f"a ready {request.os} VM went away as it was taken; ask again")
                taken.append(
                    dataclasses.replace(
                        mine, pooled=False, created_at=lease.created_at, expires_at=lease.created_at + minutes * 60
                    )
                )
            new = [
                choice.new_lease(
                    request_id=request_id,
                    name=name,
                    username=request.username,
                    os=request.os,
                    owner=self.owner,
                    now=now,
                    lifetime_seconds=minutes * 60,
                    caller=request.caller,
                )
                for name, choice in zip(cold_names, chosen, strict=True)
            ]
            if new:
                self.leases.insert(conn, new, [choice.need.memory for choice in chosen])
        new = taken + new
        self.tracker.placed(request_id, [(lease.name, lease.host_ref) for lease in new])
        log.info(
            "request %s: %s x %s for %s on host(s) %s%s",
            request_id,
            request.count,
            request.os,
            request.username,
            ", ".join(sorted({lease.host_ref for lease in new})),
            f" ({len(taken)} from the ready pool)" if taken else "",
        )
        return new

    def _build(self, settings: Settings, new: list[Lease], request_id: str, pinned: bool) -> list[Lease]:
        with self._idle:
            self._in_flight += 1
        try:
            return self._create_all(settings, new, pinned=pinned, request_id=request_id)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
            self.scheduler.wake()  # a failed request gave its room back

    def _check_quota(self, settings: Settings, request: LeaseRequest, memory: list[int], conn: object) -> None:
        """Per-user limits, counted inside the reservation's transaction. The user is the
        caller when authenticated, else the name the VMs are requested under."""
        quota = settings.quota
        if not quota.vms_per_user and not quota.memory_per_user:
            return
        subject = request.caller or request.username
        mine = [
            lease
            for lease in self.leases.active(conn)  # type: ignore[arg-type]
            if (lease.caller or lease.username) == subject
        ]
        if quota.vms_per_user and len(mine) + request.count > quota.vms_per_user:
            raise QuotaExceeded(
                f"{subject} holds {len(mine)} VM(s); {request.count} more would pass the limit of "
                f"{quota.vms_per_user} ([quota] vms.per.user): release some first"
            )
        held = sum(lease.memory for lease in mine)
        if quota.memory_per_user and held + sum(memory) > quota.memory_per_user:
            raise QuotaExceeded(
                f"{subject} holds {held / 1024**3:g} GiB of VM memory; {sum(memory) / 1024**3:g} GiB more would "
                f"pass the limit of {quota.memory_per_user / 1024**3:g} GiB ([quota] memory.gib.per.user)"
            )

    def _refuse_names_of_others(self, request: LeaseRequest, conn: Connection | None = None) -> None:
        """With tokens, a name prefix is its first holder's until all of its VMs are gone:
        409 when this request's names fall under another user's prefix (bob's ``al3``
        under alice's ``al1``, ``al2``), or another user's names fall under this one's. An
        anonymous request (``[auth] required=false``) may not take a token holder's either;
        anonymous leases own no prefix, as the seed's never did."""
        mine = vm_names(request.username, request.count)
        for lease in self.leases.held_by_others(request.caller, request.username[0], conn):
            theirs_over_mine = any(_under(name, lease.username) for name in mine)
            if theirs_over_mine or _under(lease.name, request.username):
                raise NameInUse(
                    f"names under {lease.username if theirs_over_mine else request.username!r} belong to "
                    f"{lease.caller} while {lease.name} is leased: use another name"
                )

    def _refuse_leased_names(self, taken: list[Lease], request: LeaseRequest) -> None:
        """409, with the command that releases exactly the names that clash: the same
        user and count when they are all of them, else the names one by one."""
        if not taken:
            return
        clash = sorted(lease.name for lease in taken)
        if clash == sorted(vm_names(request.username, request.count)):
            how = f"releaseservers/{request.username}?count={request.count}"
        else:
            how = f"dynvm release {' '.join(clash)}"
        raise NameInUse(f"{', '.join(clash)} already leased by dynvm: release them first ({how}) or use another name")

    def _refuse_names_on_hosts(self, names: list[str]) -> None:
        wanted = set(names)
        for host in self.settings.hosts:
            clash = sorted(wanted & {machine.name for machine in self.provider.machines(host)})
            if clash:
                raise NameInUse(
                    f"{', '.join(clash)} already exist(s) on host {host.ref}: choose another name "
                    "(dynvm never reuses or touches a VM it did not create)"
                )

    def _create_all(
        self, settings: Settings, new: list[Lease], pinned: bool = False, request_id: str | None = None
    ) -> list[Lease]:
        cancel = _RequestCancel(self._cancel, self.requests, request_id)
        futures: dict[str, Future[Lease]] = {
            lease.id: self._pool.submit(self._create_one, settings, lease, pinned, cancel) for lease in new
        }
        wait(futures.values())
        ready, failed = [], []
        for lease in new:
            error = futures[lease.id].exception()
            if error is None:
                ready.append(futures[lease.id].result())
            else:
                failed.append((lease, error))
        if not failed:
            refused = self._hold(settings, ready)
            if refused:
                for lease, why in refused:  # its VM is left alone when the host says it is another's
                    self._release(settings, [lease], ["ready"], "failed", str(why))
                not_held = {lease.id for lease, _ in refused}
                self._roll_back(settings, [lease for lease in ready if lease.id not in not_held], "another VM failed")
                not_given, why = refused[0]
                others = f"; the other {len(new) - 1} VM(s) of the request were removed" if len(new) > 1 else ""
                raise CreateFailed(f"could not hand out {not_given.name}: {why}{others}")
            if request_id is not None:
                self.tracker.flush(request_id)  # its VMs' last stages, before anyone reads it ready
            try:
                handed = self.leases.hand_over([lease.id for lease in ready], self.clock(), request_id)
            except RequestCancelled:
                self._roll_back(settings, ready, "its request was cancelled")
                self._end_cancelled(request_id)
                raise RequestCancelled("the request was cancelled; every VM made for it was removed") from None
            except Exception:  # the database failed us: never leave ready leases nobody will hand over
                self._roll_back(settings, ready, "the request could not be handed over")
                raise
            if handed is not None:
                if request_id is not None:
                    self.requests.notify(request_id)  # its waiters answer now, not at their next look
                    self._report_handed_out(request_id, handed)
                self._request_event("ready", request_id)
                return handed
            # only a process that died and left the request to recover ends a ready lease
            # before its hand-over; nothing that is not alive is ever handed out
            gone = [lease for lease in ready if (self.leases.get(lease.id) or lease).state != "ready"]
            self._roll_back(settings, [lease for lease in ready if lease not in gone], "another VM of it was ended")
            raise CreateFailed(
                f"{', '.join(lease.name for lease in gone)} ended before the request could hand it over; "
                "the request's other VMs were removed: ask again"
            )
        for lease, error in failed:
            if lease.pooled_at is not None:  # a ready VM it took: its VM runs, and goes with it
                self._release(settings, [lease], ["ready"], "failed", str(error))
            else:
                self.leases.finish([lease.id], "failed", self.clock(), str(error))
        if cancel.is_set() and not self._cancel.is_set():
            self._roll_back(settings, ready, "its request was cancelled")
            self._end_cancelled(request_id)
            raise RequestCancelled("the request was cancelled; every VM made for it was removed")
        self._roll_back(settings, ready, "another VM of its request failed")  # all or nothing
        first_lease, first_error = failed[0]
        host = settings.host(first_lease.host_ref)
        where = host.display if host else f"host {first_lease.host_ref}"
        others = f"; the other {len(new) - 1} VM(s) of the request were removed" if len(new) > 1 else ""
        raise CreateFailed(f"could not create {first_lease.name} on {where}: {first_error}{others}")

    def _report_handed_out(self, request_id: str, handed: list[Lease]) -> None:
        """Time-to-VM, by how each VM came: from a ready pool, made for it, or after waiting."""
        record = self.requests.get(request_id)
        if record is None:
            return
        seconds = max(0.0, self.clock() - record.created_at)
        for lease in handed:
            how = "queued" if record.wait_until is not None else ("warm" if lease.pooled_at else "cold")
            self._report("handed_out", lease, how, seconds)

    def _roll_back(self, settings: Settings, ready: list[Lease], reason: str) -> None:
        """Destroy the ready VMs of a request that failed. They go through ``releasing``
        first, so a destroy that fails now is redone by reconcile, never forgotten."""
        for lease in ready:
            self.tracker.stage(lease.request_id, lease.name, "removed", error=reason)
        self._release(settings, ready, ["ready"], "failed", reason)

    def _release(
        self,
        settings: Settings,
        candidates: list[Lease],
        only_from: list[str],
        final_state: str,
        reason: str = "",
        expect_owner: str | None = None,
        pooled: bool | None = None,
    ) -> tuple[ReleaseOutcome, list[Lease]]:
        """Take these leases (those still in ``only_from``, owned by ``expect_owner`` and
        still in a ready pool or not as ``pooled`` says, when given) into ``releasing`` as
        this process's, destroy their VMs, end them. They count as this process's releases
        from before the claim until the end, so a reconcile pass in this process never
        redoes one meanwhile."""
        ids = [lease.id for lease in candidates]
        with self._releasing_lock:
            self._releasing.update(ids)
        try:
            moved = set(
                self.leases.set_state(
                    ids, "releasing", only_from, owner=self.owner, expect_owner=expect_owner, pooled=pooled
                )
            )
            taken = [lease for lease in candidates if lease.id in moved]
            return self._destroy_all(settings, taken, final_state, reason), taken
        finally:
            self.scheduler.wake()  # room was given back
            with self._releasing_lock:
                self._releasing.subtract(ids)
                for lease_id in ids:
                    if self._releasing[lease_id] <= 0:
                        del self._releasing[lease_id]

    # -- release -----------------------------------------------------------------------

    def release(self, username: str, count: int = 1, caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        """Destroy the VMs ``getservers`` made for this user and count. Only dynvm's VMs (a
        lease and the VM's marker) are touched."""
        return self.release_names(vm_names(username, count), caller)

    def release_names(self, names: list[str], caller: Caller = ANONYMOUS) -> ReleaseOutcome:
        """Release these leases and say, name by name, what happened. Retrying is harmless:
        a release another process is doing is reported as finishing; one that failed
        earlier (its lease still ``releasing``) is tried again now."""
        held = self.leases.by_name(names)
        for lease in held:
            if not caller.may_touch(lease):
                raise Forbidden(f"{lease.name} belongs to {lease.caller}: only they or an admin may release it")
        if not held:
            raise NoSuchLease(
                f"no VM named {', '.join(names)} is leased from dynvm: nothing to release "
                "(check the name, and the username and count used with getservers)"
            )
        creating = [lease.name for lease in held if lease.handed_over_at is None and lease.state != "releasing"]
        if creating and len(creating) == len(held):
            raise NameInUse(f"{', '.join(creating)} still being created: release it once getservers has answered")
        outcome = ReleaseOutcome()
        alive = self._live_owners()
        retry: dict[str, list[Lease]] = {}  # by the owner they must still have when taken
        for lease in held:
            if lease.state != "releasing":
                continue
            if lease.owner in alive and (lease.owner != self.owner or self._is_releasing(lease.id)):
                outcome.finishing[lease.name] = f"{lease.name} is already being released; dynvm finishes it"
            else:  # an earlier release that failed (owner RELEASE_RETRY), or whose process died
                retry.setdefault(lease.owner, []).append(lease)
        settings = self.settings
        ready = [lease for lease in held if lease.state == "ready" and lease.handed_over_at is not None]
        done, taken = self._release(settings, ready, ["ready"], "released")
        outcome.add(done)
        for owner, leases in retry.items():
            done, again = self._release(settings, leases, ["releasing"], "released", expect_owner=owner)
            outcome.add(done)
            taken += again
        if not taken and not outcome.finishing:
            raise NoSuchLease(f"{', '.join(lease.name for lease in held)} already released or expiring")
        asked = {lease.name for lease in held}
        requests_of = {lease.request_id for lease in held}
        outcome.already = sorted(self.leases.released_names([n for n in names if n not in asked], requests_of))
        return outcome

    def _is_releasing(self, lease_id: str) -> bool:
        with self._releasing_lock:
            return lease_id in self._releasing

    def _live_owners(self) -> set[str]:
        return self.leases.live_owners(self.clock(), REPLICA_STALE_SECONDS) | {self.owner}

    def _live_processes(self) -> set[str]:
        """Live owners, less this replica's past lives (a restarted replica knows its
        earlier boots are dead, however fresh their last heartbeat)."""
        me = self.owner.partition("#")[0]
        return {owner for owner in self._live_owners() if owner == self.owner or owner.partition("#")[0] != me}

    def extend(self, name: str, minutes: float, caller: Caller = ANONYMOUS) -> Lease:
        """Move a ready lease's expiry to ``minutes`` from now, capped at the maximum."""
        [lease] = cast("list[Lease | None]", self.leases.by_name([name])) or [None]
        if lease is None or lease.state != "ready":
            raise NoSuchLease(f"no ready VM named {name} is leased from dynvm")
        if lease.handed_over_at is None:
            raise NameInUse(f"{name} is still being created: extend it once its request has answered")
        if not caller.may_touch(lease):
            raise Forbidden(f"{lease.name} belongs to {lease.caller}: only they or an admin may extend it")
        if not minutes > 0:
            raise BadRequest("the new lifetime must be a positive number of minutes")
        minutes = min(minutes, self.settings.common.expiry_minutes)
        self.leases.extend(lease.id, self.clock() + minutes * 60)
        return self.leases.get(lease.id) or lease

    # -- stopping ----------------------------------------------------------------------

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for ``grace`` seconds, then
        cancel the rest (their VMs are removed) and wait for the roll-back. Legacy requests
        queued here are cancelled: their callers' connections end with this process."""
        self._stopping.set()
        for record in self.requests.in_state(QUEUED):
            if record.origin == "legacy" and record.owner == self.owner:
                self.requests.end_cancelled(record.id, [QUEUED], "dynvm stopped while its caller waited")
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace):
                log.warning("stopping: cancelling %d request(s) still in flight", self._in_flight)
                self._cancel.set()
                self._idle.wait_for(lambda: self._in_flight == 0, timeout=300)
        self._cancel.set()  # a build not started yet runs now, sees it, and rolls back what it reserved
        self._builders.shutdown(wait=True)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` itself or ``prefix`` and digits: a name a request for
    ``prefix`` makes (SPEC.md: ``<username>``, or ``<username>1`` ... ``<username>N``)."""
    rest = name[len(prefix) :] if name.startswith(prefix) else None
    return rest is not None and (rest == "" or (rest.isascii() and rest.isdigit()))
