"""The rules of dynvm: acquire, release, expire and reconcile leases (no HTTP here).

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

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from . import capacity
from .config import HostSettings, Settings
from .engine.requests import (
    CANCELLED,
    CREATING,
    FAILED,
    QUEUED,
    DurableTracker,
    RequestRecord,
    RequestStore,
)
from .engine.scheduler import Scheduler
from .model import (
    BadRequest,
    CreatedVm,
    CreateFailed,
    DestroyFailed,
    Forbidden,
    Lease,
    LeaseError,
    NameInUse,
    NoSuchLease,
    NotDynvmVm,
    NotEnoughCapacity,
    ProvisionError,
    QuotaExceeded,
    RequestCancelled,
    ShuttingDown,
    UnknownOs,
    VmSpec,
)
from .store.history import HistoryStore, origin_of
from .store.leases import LeaseStore
from .store.tables import ACTIVE_STATES
from .xen.inventory import HostState, HostView, Inventory, VmView
from .xen.marker import Ownership, lease_of, lease_of_clone_name, marker, ownership, quarantined_at
from .xen.provision import DestroyResult, Provisioner

log = logging.getLogger(__name__)

VANISH_GRACE = 30.0  # seconds a new lease's VM may take to show in the mirror
CLONE_TASK = "task/"  # a lease's vm_ref while its clone runs: "task/<xapi task ref>"
REPLICA_STALE_SECONDS = 10.0  # a replica silent this long is dead (it beats every 2 s)
ADOPT_WAIT = 5.0  # seconds reconcile waits on a clone still running before it moves on
RECOVER_CLONE_WAIT = 30.0  # seconds start-up waits, in all, for clones a dead process left running
DESTROYS_AT_ONCE = 32  # per release or reaper pass: enough to overlap, few enough not to flood a host
RELEASE_RETRY = "release-retry"  # the owner of a lease whose destroy failed: whichever replica leads retries it
FINISHED_REQUESTS_KEPT = 7 * 24 * 3600.0  # seconds a finished request's status stays readable
CREATE_ATTEMPTS = 3  # per VM (SPEC.md §3); unpinned, the last one goes to another host if one has room


@dataclass(frozen=True)
class LeaseRequest:
    username: str
    os: str
    count: int = 1
    cpus: int | None = None
    memory: int | None = None
    expires_in_minutes: float | None = None  # None: [common] vm.expiry.minutes
    host_ref: str | None = None
    caller: str | None = None  # the authenticated user; None when anonymous
    request_id: str | None = None  # given by callers that track progress; else made here


@dataclass(frozen=True)
class Caller:
    """Who asks: ``user`` None is anonymous (allowed only while [auth] required=false)."""

    user: str | None = None
    admin: bool = False

    def may_touch(self, lease: Lease) -> bool:
        return self.admin or lease.caller is None or lease.caller == self.user


ANONYMOUS = Caller()


class LeaseEvents:
    """What the service reports as it works (metrics listen); every method is a no-op here."""

    def created(self, lease: Lease) -> None: ...
    def create_failed(self, reason: str) -> None: ...
    def ended(self, lease: Lease, state: str) -> None: ...
    def reconciled(self, report: ReconcileReport) -> None: ...
    def request_event(self, kind: str, record: RequestRecord) -> None: ...
    def scheduler_passed(self, seconds: float) -> None: ...


@dataclass
class ReconcileReport:
    orphans_destroyed: list[str] = field(default_factory=list)  # VM names
    vanished: list[str] = field(default_factory=list)  # lease names closed
    failed_creates: list[str] = field(default_factory=list)  # creates of a dead process
    quarantined: list[str] = field(default_factory=list)  # VMs (and disks) this database does not know
    disks_destroyed: list[str] = field(default_factory=list)  # uuids of disks no VM or lease held
    errors: list[str] = field(default_factory=list)


@dataclass
class ReleaseOutcome:
    """What a release did, name by name.

    ``released``: gone, VM and disks. ``finishing``: the user's part is done, and dynvm
    finishes the rest in the background (a disk that would not go yet, or a release
    another process is doing): name -> sentence. ``failed``: the VM could not be
    destroyed; the lease stays ``releasing`` and reconcile tries again: name -> sentence."""

    released: list[str] = field(default_factory=list)
    finishing: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every name the release took on (the seed's answer)."""
        return sorted([*self.released, *self.finishing, *self.failed])

    def add(self, other: ReleaseOutcome) -> None:
        self.released.extend(other.released)
        self.finishing.update(other.finishing)
        self.failed.update(other.failed)


@dataclass(frozen=True)
class QuarantinedVm:
    name: str
    uuid: str
    host_ref: str
    lease_id: str
    quarantined_at: float
    destroy_at: float


def vm_names(username: str, count: int) -> list[str]:
    """``count=1``: the VM is named after the user; more: ``<user>1`` ... ``<user><count>``."""
    return [username] if count == 1 else [f"{username}{n}" for n in range(1, count + 1)]


class LeaseService:
    def __init__(
        self,
        settings: Callable[[], Settings],
        inventory: Inventory,
        leases: LeaseStore,
        history: HistoryStore,
        clock: Callable[[], float] = time.time,
        max_workers: int = 256,
        owner: str | None = None,
        events: LeaseEvents | None = None,
    ) -> None:
        self._settings = settings
        self.inventory = inventory
        self.leases = leases
        self.history = history
        self.clock = clock
        # "<replica name>#<this boot>": a restarted replica knows its own earlier creates are dead
        self.owner = f"{owner or 'dynvm'}#{uuid.uuid4().hex[:12]}"
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="create")
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        self._in_flight = 0
        self._idle = threading.Condition()
        self.requests = RequestStore(leases.db, clock)
        self.tracker = DurableTracker(self.requests, self.owner)
        self.scheduler = Scheduler(self, self.requests, clock)
        self.scheduler.events = lambda kind, record: self._request_event(kind, record.id)
        self.events = events or LeaseEvents()
        self._releasing: Counter[str] = Counter()  # lease ids this process is releasing right now
        self._releasing_lock = threading.Lock()

    @functools.cached_property
    def installation(self) -> str:
        """This installation's id, written into the marker of every VM and disk it makes."""
        return self.leases.installation_id()

    @property
    def settings(self) -> Settings:
        return self._settings()

    def _request_event(self, kind: str, request_id: str | None) -> None:
        """Tell the listeners a request moved (served from the queue, ready, ended)."""
        if request_id is None:
            return
        record = self.requests.get(request_id)
        if record is not None:
            self._report("request_event", kind, record)

    def _report(self, event: str, *args: object) -> None:
        """Tell the listeners (metrics); a failing listener never fails the lease work."""
        try:
            getattr(self.events, event)(*args)
        except Exception:
            log.exception("reporting %s failed", event)

    # -- capacity ----------------------------------------------------------------------

    def candidates(
        self, settings: Settings, os: str, reserved: list[dict[str, object]], only: str | None = None
    ) -> list[capacity.Candidate]:
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
    ) -> list[capacity.Candidate]:
        out = []
        for host in settings.hosts:
            if only is not None and host.ref != only:
                continue
            view = self.inventory.view(host.ref)
            if view is None:
                continue
            need = capacity.need_on(host, view, os, req_cpus, req_memory)
            if need is None:
                continue
            room = capacity.room_on(
                host, view, settings.common.cpu_overcommit, [r for r in reserved if r["host_ref"] == host.ref]
            )
            out.append(capacity.Candidate(host, room, need))
        return out

    def _explain_shortage(self, settings: Settings, message: str, request: LeaseRequest) -> str:
        """Add why the hosts that give nothing give nothing: down (and why), refusing
        dynvm's login, or without the template."""
        reasons = []
        for host in settings.hosts:
            if request.host_ref is not None and host.ref != request.host_ref:
                continue
            view = self.inventory.view(host.ref)
            name = host.templates.get(request.os)
            if name is None:
                reasons.append(f"{host.section} has no template for {request.os}")
            elif view is None or view.state is not HostState.UP:
                why = view.error if view is not None and view.error else "not answering yet"
                reasons.append(f"{host.section} is down: {why}")
            elif (choice := capacity.template_choice(view, name)).template is None:
                reasons.append(f"{host.section}: {choice.problem} ({request.os}.template)")
        if not reasons:
            return message
        return message.removesuffix(capacity.FULL_HINT) + "; " + "; ".join(reasons)

    def template_problems(self) -> list[str]:
        """Every ``<os>.template`` line that picks no template on its (answering) host:
        missing, or ambiguous. Logged at start-up; that OS gets no VM on that host."""
        problems = []
        for host in self.settings.hosts:
            view = self.inventory.view(host.ref)
            if view is None or view.state is not HostState.UP:
                continue
            for os, name in sorted(host.templates.items()):
                choice = capacity.template_choice(view, name)
                if choice.template is None:
                    problems.append(f"[{host.section}] {os}.template: {choice.problem} on {host.display}")
        return problems

    def check_os(self, settings: Settings, os: str) -> None:
        if not any(os in host.templates for host in settings.hosts):
            known = ", ".join(settings.os_keys) or "none (no host is configured)"
            raise UnknownOs(f"unknown OS {os!r}; the OSes that exist are: {known}")

    def available_count(self, os: str) -> int:
        settings = self.settings
        self.check_os(settings, os)
        with self.leases.db.read() as conn:
            reserved = self.leases.pending_reservations(conn)
        return capacity.available(self._candidates(settings, os, None, None, reserved))

    # -- acquire -----------------------------------------------------------------------

    def acquire(self, request: LeaseRequest) -> list[Lease]:
        """Create ``request.count`` VMs and return their leases, ready, with IPs.

        Blocks for as long as the VMs take to boot: call it from a worker thread."""
        request_id = request.request_id or str(uuid.uuid4())
        self.tracker.start(request_id, request.username, request.os, request.count)
        try:
            leases = self._acquire(request, request_id)
        except LeaseError as e:
            self.tracker.finish(request_id, e)
            raise
        except Exception as e:
            self.tracker.finish(request_id, e)
            raise
        self.tracker.finish(request_id)
        return leases

    def validate(self, request: LeaseRequest) -> None:
        """Refuse, at once, a request that can never be served as asked (a count over the
        limit, an unknown OS, a host that does not exist or lacks the OS). Cheap: reads
        only the configuration. ``acquire`` calls it too."""
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

    def _acquire(self, request: LeaseRequest, request_id: str) -> list[Lease]:
        settings = self.settings
        new = self._reserve(settings, request, request_id, immediate=True)
        return self._build(settings, new, request_id, pinned=request.host_ref is not None)

    def _reserve(self, settings: Settings, request: LeaseRequest, request_id: str, immediate: bool) -> list[Lease]:
        """Name the VMs, reserve their room and insert their leases, in one transaction.
        ``immediate``: a request that does not wait, which may take room only if that
        delays no queued request (``Scheduler.may_serve_now``)."""
        if self._stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.validate(request)
        names = vm_names(request.username, request.count)
        self._refuse_leased_names(self.leases.by_name(names), request)
        self._refuse_names_on_hosts(names)
        now = self.clock()
        minutes = settings.common.expiry_minutes
        if request.expires_in_minutes is not None:
            minutes = min(request.expires_in_minutes, minutes)
        with self.leases.db.write() as conn:
            self._refuse_leased_names(self.leases.by_name(names, conn), request)
            self.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            reserved = self.leases.pending_reservations(conn)
            candidates = self._candidates(
                settings, request.os, request.cpus, request.memory, reserved, only=request.host_ref
            )
            try:
                placement = capacity.place(request.count, request.os, candidates)
            except NotEnoughCapacity as e:
                raise NotEnoughCapacity(self._explain_shortage(settings, str(e), request)) from None
            if immediate and not self.scheduler.may_serve_now(settings, reserved, _record_of(request, request_id)):
                waiting = len(self.requests.in_state(QUEUED))
                raise NotEnoughCapacity(
                    f"not enough capacity for {request.count} {request.os} VM(s) now: {waiting} request(s) wait in "
                    "the queue for the room it would take; ask with wait=<minutes> to queue behind them"
                )
            self._check_quota(settings, request, [c.need.static_max for c in placement], conn)
            new = [
                Lease(
                    id=str(uuid.uuid4()),
                    request_id=request_id,
                    name=name,
                    username=request.username,
                    os=request.os,
                    host_ref=choice.host.ref,
                    state="creating",
                    cpus=choice.need.cpus,
                    memory=choice.need.static_max,
                    disk=choice.need.disk,
                    created_at=now,
                    expires_at=now + minutes * 60,
                    owner=self.owner,
                    template=choice.need.template,
                    caller=request.caller,
                    member=choice.member or None,
                )
                for name, choice in zip(names, placement, strict=True)
            ]
            self.leases.insert(conn, new, [choice.need.memory for choice in placement])
        self.tracker.placed(request_id, [(lease.name, lease.host_ref) for lease in new])
        log.info(
            "request %s: %s x %s for %s on host(s) %s",
            request_id,
            request.count,
            request.os,
            request.username,
            ", ".join(sorted({lease.host_ref for lease in new})),
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

    # -- the queue ---------------------------------------------------------------------

    def submit(self, request: LeaseRequest, wait_seconds: float, origin: str = "v1") -> RequestRecord:
        """Queue a request that may wait up to ``wait_seconds`` for room. Refused at once
        (as ``acquire`` would) when it can never be served as asked. Returns the queued
        request; the leader's scheduler serves it."""
        if self._stopping.is_set():
            raise ShuttingDown("dynvm is stopping; try again in a moment")
        self.validate(request)
        request_id = request.request_id or str(uuid.uuid4())
        record = dataclasses.replace(
            _record_of(request, request_id),
            state=QUEUED,
            owner=self.owner,
            origin=origin,
            created_at=self.clock(),
            wait_until=self.clock() + wait_seconds,
        )
        if not self.scheduler.can_ever_fit(self.settings, record):
            raise NotEnoughCapacity(
                f"{request.count} {request.os} VM(s) can never be served at once: more than every host "
                f"{'(host ' + request.host_ref + ') ' if request.host_ref else ''}holds for {request.os}; "
                "ask for fewer"
            )
        self._refuse_leased_names(self.leases.by_name(vm_names(request.username, request.count)), request)
        self.requests.insert(record)
        self.scheduler.wake()
        return record

    def grant(self, record: RequestRecord) -> bool:
        """Serve a queued request now (the scheduler decided): reserve its room and start
        making its VMs in the background. False, and the request still queued, when its
        room is gone after all; a request that can no longer be served as asked (its name
        taken meanwhile, a quota) ends failed with the reason (True: it was dealt with)."""
        if not self.requests.transition(record.id, [QUEUED], CREATING, builder=self.owner, position=None, eta_at=None):
            return False  # cancelled or timed out meanwhile
        request = _request_of(record)
        settings = self.settings
        try:
            new = self._reserve(settings, request, record.id, immediate=False)
        except NotEnoughCapacity:
            self.requests.transition(record.id, [CREATING], QUEUED, builder=None, started_at=None)
            return False
        except LeaseError as e:
            self.tracker.finish(record.id, e)
            return True
        except Exception as e:
            log.exception("request %s: could not be served", record.id)
            self.tracker.finish(record.id, e)
            return True

        def build() -> None:
            try:
                self._build(settings, new, record.id, pinned=request.host_ref is not None)
            except LeaseError as e:
                self.tracker.finish(record.id, e)
            except Exception as e:
                log.exception("request %s failed", record.id)
                self.tracker.finish(record.id, e)

        self._pool.submit(build)
        return True

    def cancel(self, request_id: str, caller: Caller = ANONYMOUS) -> RequestRecord:
        """Cancel a request before it is ready: a queued one ends at once; a creating one
        has its VMs removed by the process making them. Cancelling a ready request is
        refused (release its VMs instead)."""
        record = self.requests.get(request_id)
        if record is None:
            raise NoSuchLease(f"no request {request_id}")
        if not (caller.admin or record.caller is None or record.caller == caller.user):
            raise Forbidden(f"request {request_id} belongs to {record.caller}: only they or an admin may cancel it")
        if record.state == "ready":
            raise NameInUse(
                f"request {request_id} is ready: its VMs were handed over; release them instead "
                f"(releaseservers/{record.username}?count={record.count})"
            )
        if record.finished:
            return record
        updated = self.requests.request_cancel(request_id)
        if updated is not None and updated.state == CANCELLED:
            self._request_event("cancelled", request_id)
        self.scheduler.wake()
        return updated or record

    def leases_of(self, request_id: str) -> list[Lease]:
        """The ready leases of a request, in the order of its answer."""
        found = {lease.name: lease for lease in self.leases.by_request(request_id) if lease.state in ACTIVE_STATES}
        record = self.requests.get(request_id)
        names = vm_names(record.username, record.count) if record else sorted(found)
        return [found[name] for name in names if name in found]

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
        for view in self.inventory.views():
            clash = sorted(wanted & {vm.name for vm in view.vms})
            if clash:
                raise NameInUse(
                    f"{', '.join(clash)} already exist(s) on host {view.ref}: choose another name "
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

    def _end_cancelled(self, request_id: str | None) -> None:
        if request_id is not None:
            self.requests.transition(
                request_id,
                [CREATING],
                CANCELLED,
                error="cancelled by its caller; what was built was removed",
                error_status=409,
                error_kind="RequestCancelled",
            )

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
    ) -> tuple[ReleaseOutcome, list[Lease]]:
        """Take these leases (those still in ``only_from``, and owned by ``expect_owner``
        when given) into ``releasing`` as this process's, destroy their VMs, end them.
        They count as this process's releases from before the claim until the end, so a
        reconcile pass in this process never redoes one meanwhile."""
        ids = [lease.id for lease in candidates]
        with self._releasing_lock:
            self._releasing.update(ids)
        try:
            moved = set(self.leases.set_state(ids, "releasing", only_from, owner=self.owner, expect_owner=expect_owner))
            taken = [lease for lease in candidates if lease.id in moved]
            return self._destroy_all(settings, taken, final_state, reason), taken
        finally:
            self.scheduler.wake()  # room was given back
            with self._releasing_lock:
                self._releasing.subtract(ids)
                for lease_id in ids:
                    if self._releasing[lease_id] <= 0:
                        del self._releasing[lease_id]

    def _create_one(
        self, settings: Settings, lease: Lease, pinned: bool = False, cancel: _RequestCancel | None = None
    ) -> Lease:
        """Create one VM. Unpinned, it may move: when its host stops answering, to the host
        with most room among those not tried yet; when its host's guests get no usable IP
        (APIPA, DHCP exhausted), its last attempt goes to another host if one has room. A
        failed xapi call is retried where it happened."""
        tried = {lease.host_ref}
        attempts_left = CREATE_ATTEMPTS
        attempts = attempts_left if pinned else attempts_left - 1  # unpinned: one is kept for elsewhere
        while True:
            try:
                return self._create_on(settings, lease, attempts, cancel)
            except ProvisionError as e:
                if e.unreachable:
                    self._abandon_clone(self.leases.get(lease.id) or lease)  # its vm_ref as the create left it
                if e.exhausted:
                    attempts_left -= attempts
                    attempts = attempts_left
                    if attempts_left <= 0 and len(tried) > 1:
                        hosts = ", ".join(sorted(tried))
                        raise ProvisionError(
                            f"{e} ({CREATE_ATTEMPTS} attempts in all, on hosts {hosts})", e.host
                        ) from None
                    if attempts_left <= 0:
                        raise
                    if pinned or not e.no_address:
                        continue  # the last attempt, on the same host
                elif pinned or not e.unreachable:
                    raise
                else:
                    attempts_left = max(1, attempts_left - e.attempts_used)
                moved = self._move(settings, lease, exclude=tried)
                if moved is None:
                    if e.unreachable:
                        raise ProvisionError(f"{e}; no other host has room for it", e.host, unreachable=True) from None
                    continue  # no room elsewhere: the last attempt stays here
                why = "stopped answering" if e.unreachable else "gives its guests no usable IP"
                log.warning("%s: host %s %s; trying host %s", lease.name, lease.host_ref, why, moved.host_ref)
                self.tracker.stage(lease.request_id, lease.name, "moved", host=moved.host_ref)
                tried.add(moved.host_ref)
                lease = moved
                attempts = attempts_left

    def _abandon_clone(self, lease: Lease) -> None:
        """dynvm stops waiting for this lease's create (its host went silent, or the process
        that ran it died): if a clone was running, it may still end and leave a VM without
        dynvm's marker. Remember its task for ``_collect_abandoned_clones``."""
        vm_ref = lease.vm_ref or ""
        if vm_ref.startswith(CLONE_TASK):
            task = vm_ref.removeprefix(CLONE_TASK)
            self.leases.abandon_clone(lease.host_ref, task, lease.id, lease.name, self.clock())
            log.warning("%s: a clone may still run on host %s; reconcile removes it", lease.name, lease.host_ref)

    def _move(self, settings: Settings, lease: Lease, exclude: set[str]) -> Lease | None:
        with self.leases.db.write() as conn:
            self.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            reserved = [r for r in self.leases.pending_reservations(conn) if r["lease_id"] != lease.id]
            candidates = [
                c
                for c in self._candidates(settings, lease.os, lease.cpus, lease.memory, reserved)
                if c.host.ref not in exclude
            ]
            if capacity.available(candidates) < 1:
                return None
            [choice] = capacity.place(1, lease.os, candidates)
            return self.leases.move(
                conn,
                lease.id,
                choice.host.ref,
                choice.need.cpus,
                choice.need.static_max,
                choice.need.disk,
                choice.need.template,
                reserve_memory=choice.need.memory,
                member=choice.member or None,
            )

    def _create_on(
        self,
        settings: Settings,
        lease: Lease,
        attempts: int = CREATE_ATTEMPTS,
        cancel: _RequestCancel | None = None,
    ) -> Lease:
        host = settings.host(lease.host_ref)
        if host is None:
            raise ProvisionError(f"host {lease.host_ref} was removed from the configuration")
        spec = VmSpec(
            name=lease.name,
            os=lease.os,
            template=lease.template,
            lease_id=lease.id,
            cpus=lease.cpus,
            memory=lease.memory,
            windows=lease.os.startswith("win"),
            member=lease.member,
        )

        def progress(stage: str) -> None:
            self.tracker.stage(lease.request_id, lease.name, stage)

        try:
            created: CreatedVm = self._provisioner(settings, host).create(
                spec,
                progress,
                cancel=cancel or self._cancel,  # type: ignore[arg-type]
                on_clone_task=lambda task: self.leases.remember_vm(lease.id, f"{CLONE_TASK}{task}"),
                attempts=attempts,
            )
        except Exception as e:
            self.tracker.stage(lease.request_id, lease.name, "failed", error=str(e))
            self._report("create_failed", type(e).__name__)
            raise
        ready = self.leases.mark_ready(lease.id, created, self.clock(), self.owner)
        if ready is None:  # another replica took this process for dead and failed the lease
            with contextlib.suppress(Exception):  # else reconcile removes it: its lease has ended
                self._provisioner(settings, host).destroy(created.ref, lease.id)
            raise ProvisionError(f"{lease.name}: the lease ended while its VM was being made", host.ref)
        self.tracker.stage(lease.request_id, lease.name, "ready", ip=ready.ip)
        self.history.record_created(ready, origin_of(host.url))
        self._report("created", ready)
        return ready

    def _provisioner(self, settings: Settings, host: HostSettings) -> Provisioner:
        pool = self.inventory.pool(host.ref)
        if pool is None:
            raise ProvisionError(f"host {host.ref} is not in the inventory")
        return Provisioner(host, pool, settings.common.network_timeout_secs, self.installation)

    # -- release and expiry ------------------------------------------------------------

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
                outcome.finishing[lease.name] = "already being released; dynvm finishes it in the background"
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

    def _destroy_all(
        self, settings: Settings, leases: list[Lease], final_state: str, reason: str = ""
    ) -> ReleaseOutcome:
        """Destroy these leases' VMs side by side: releasing eight VMs, or reaping a hundred,
        takes about as long as the slowest destroy, not the sum. Its own short-lived threads,
        not the create pool, so a release still completes while dynvm stops."""
        outcome = ReleaseOutcome()
        if len(leases) <= 1:
            for lease in leases:
                outcome.add(self._destroy(settings, lease, final_state, reason))
            return outcome
        with ThreadPoolExecutor(min(len(leases), DESTROYS_AT_ONCE), thread_name_prefix="destroy") as pool:
            for one in pool.map(lambda lease: self._destroy(settings, lease, final_state, reason), leases):
                outcome.add(one)
        return outcome

    def _destroy(self, settings: Settings, lease: Lease, final_state: str, reason: str = "") -> ReleaseOutcome:
        """Destroy one lease's VM and disks, then end the lease. When the VM cannot be
        destroyed (its host does not answer, xapi refuses), the lease stays ``releasing``
        and keeps its name, owned by ``RELEASE_RETRY``: the leader's reconcile tries again
        within a minute. A disk that will not go does not hold the lease: it keeps dynvm's
        marker and reconcile destroys it. Never raises for a VM's sake: one failing VM
        never stops the others. Called only through ``_release``, which claimed it."""
        outcome = ReleaseOutcome()
        started = time.monotonic()
        host = settings.host(lease.host_ref)
        result = DestroyResult()  # nothing left, unless the destroy below says otherwise
        if lease.vm_ref and not lease.vm_ref.startswith(CLONE_TASK):
            if host is None:  # out of dynvm's reach: the lease ends, the VM stays where it is
                reason = f"host {lease.host_ref} left the configuration; {lease.name} may still be on it"
                log.error("%s: %s", lease.name, reason)
            else:
                try:
                    result = self._provisioner(settings, host).destroy(lease.vm_ref, lease.id)
                except NotDynvmVm as e:
                    log.error("%s", e)  # never touched; the lease ends (it cannot hold this VM)
                except Exception as e:
                    self.leases.set_owner(lease.id, RELEASE_RETRY)
                    outcome.failed[lease.name] = (
                        f"could not destroy {lease.name} on {host.display} ({e}); dynvm tries again within a minute"
                    )
                    log.warning("%s: destroy failed (%s); reconcile will retry", lease.name, e)
                    return outcome
        self.leases.finish([lease.id], final_state, self.clock(), reason or None)
        if result.disks_left:
            outcome.finishing[lease.name] = (
                f"{lease.name} is gone, but {len(result.disks_left)} of its disk(s) could not be deleted yet "
                f"({'; '.join(result.disks_left)}); dynvm deletes them within a minute"
            )
        else:
            outcome.released.append(lease.name)
        current = self.leases.get(lease.id) or lease
        self.history.record_deleted(current, time.monotonic() - started)
        self._report("ended", current, final_state)
        log.info("%s: %s%s", lease.name, final_state, f" ({reason})" if reason else "")
        return outcome

    def extend(self, name: str, minutes: float, caller: Caller = ANONYMOUS) -> Lease:
        """Move a ready lease's expiry to ``minutes`` from now, capped at the maximum."""
        [lease] = self.leases.by_name([name]) or [None]
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

    def expire_due(self) -> list[str]:
        """Destroy every lease past its expiry (the reaper calls this every few seconds).
        Only handed-over leases expire: a request still being made keeps all its VMs."""
        _, expired = self._release(self.settings, self.leases.expired(self.clock()), ["ready"], "expired", "expired")
        return [lease.name for lease in expired]

    # -- reconcile ---------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Tell other replicas this process is alive (every reaper tick)."""
        self.leases.heartbeat(self.owner, self.clock())

    def recover(self) -> list[str]:
        """Creates left by a process that died never finish: fail them, so that their VMs
        become leftovers for ``reconcile``. A process is dead when its heartbeat is older
        than ``REPLICA_STALE_SECONDS``; creates of live replicas are theirs to finish. A
        dead process's request whose VMs were all ready is handed over now (its lifetime
        starts). Releases that are not under way any more (their process died, or the
        destroy failed) are redone; a release this process is doing right now is left
        alone. Runs at start-up and with each reconcile."""
        self.heartbeat()
        alive = self._live_processes()
        stale = [lease for lease in self.leases.in_state("creating") if lease.owner not in alive]
        settings = self.settings
        for lease in stale:  # a clone that was still running when its process died
            self._abandon_clone(lease)
        self.leases.finish([lease.id for lease in stale], "failed", self.clock(), "dynvm stopped during the create")
        if stale:  # their clones get RECOVER_CLONE_WAIT in all; what still runs is left to reconcile
            give_up_at = time.monotonic() + RECOVER_CLONE_WAIT
            self._collect_abandoned_clones(settings, ReconcileReport(), give_up_at=give_up_at)
        self._roll_back_unanswered_requests(settings, alive)
        self._recover_requests(alive)
        for lease in self.leases.in_state("releasing"):
            if lease.owner in alive and (lease.owner != self.owner or self._is_releasing(lease.id)):
                continue
            final = "expired" if lease.handed_over_at is not None and lease.expires_at <= self.clock() else "released"
            self._release(settings, [lease], ["releasing"], final, "release finished by reconcile", lease.owner)
        return [lease.name for lease in stale]

    def _recover_requests(self, alive: set[str]) -> None:
        """Requests a dead process left. One it was making VMs for (their leases were just
        failed above) goes back to the queue, in its old place, if its caller can still
        be answered (v1: its status is read by id) and its wait has not run out; else it
        fails. A queued one whose caller waited on the dead process (a legacy request: the
        HTTP answer died with it) is cancelled; v1 ones stay queued for the leader."""
        now = self.clock()
        for record in self.requests.in_state(CREATING):
            if record.builder in alive or record.builder is None:
                continue
            if record.origin == "v1" and record.wait_until is not None and record.wait_until > now:
                self.requests.transition(record.id, [CREATING], QUEUED, builder=None, started_at=None, vms=[])
                log.warning("request %s: dynvm stopped while making its VMs; queued again", record.id)
            else:
                self.requests.transition(
                    record.id,
                    [CREATING],
                    FAILED,
                    error="dynvm stopped while making its VMs; everything built was removed: ask again",
                    error_status=503,
                )
        for record in self.requests.in_state(QUEUED):
            if record.origin == "legacy" and record.owner not in alive:
                self.requests.transition(
                    record.id,
                    [QUEUED],
                    CANCELLED,
                    error="the dynvm process its caller waited on stopped",
                    error_status=409,
                    error_kind="RequestCancelled",
                )
        self.requests.forget_finished(now - FINISHED_REQUESTS_KEPT)

    def _roll_back_unanswered_requests(self, settings: Settings, alive: set[str]) -> None:
        """Ready leases a dead process never handed over (it died before its request
        answered): nobody got them, so they are removed, all or nothing."""
        waiting = [lease for lease in self.leases.in_state("ready") if lease.handed_over_at is None]
        orphaned = [lease for lease in waiting if lease.owner not in alive]
        if orphaned:
            self._roll_back(settings, orphaned, "dynvm stopped before the request answered")

    def reconcile(self, startup: bool = False) -> ReconcileReport:
        """Make the hosts and the leases agree (at start-up and every minute). Only VMs and
        disks of this installation are looked at (``xen/marker.py``):

        - a VM whose lease has ended (or moved to another host) is destroyed with its disks;
        - a VM whose lease this database does not know (restored from an older backup, say)
          is quarantined: halted and tagged, destroyed only ``[common]
          orphan.quarantine.hours`` later;
        - a ready lease whose VM is gone from its (answering) host is closed in the history;
        - a marked disk that no VM uses and no active lease holds is destroyed (quarantined
          like a VM when its lease is unknown).

        One VM or disk that fails is logged and counted in the report; the pass goes on.

        ``startup``: the mirror was just loaded whole, so a lease made by no live process
        (this one's past lives included) whose VM is not in it is gone: it is closed at
        once, not after the grace given to a VM the mirror may not show yet."""
        report = ReconcileReport()
        settings = self.settings
        active = {lease.id: lease for lease in self.leases.active()}
        live = self._live_processes() - ({self.owner} if startup else set())
        for host in settings.hosts:
            view = self.inventory.view(host.ref)
            if view is None or view.state is not HostState.UP:
                continue
            for vm in view.vms:
                self._guarded(report, f"{vm.name} on {host.display}", self._reconcile_vm, host, vm, active, report)
            on_host = {vm.uuid for vm in view.vms}
            for lease in active.values():
                settled = (lease.ready_at or 0) < self.clock() - VANISH_GRACE  # the mirror may lag a moment
                if (
                    lease.host_ref == host.ref
                    and lease.state == "ready"
                    and lease.vm_uuid not in on_host
                    and (settled or (startup and lease.owner not in live))
                ):
                    self._guarded(report, lease.name, self._close_vanished, lease, host, report)
            self._reconcile_disks(settings, host, view, report)
        self._collect_abandoned_clones(settings, report)
        self._report("reconciled", report)
        return report

    def _guarded(self, report: ReconcileReport, what: str, step: Callable[..., object], *args: object) -> None:
        try:
            step(*args)
        except Exception as e:
            log.warning("reconcile: %s: %s", what, e)
            report.errors.append(f"{what}: {e}")

    def _reconcile_vm(self, host: HostSettings, vm: VmView, active: dict[str, Lease], report: ReconcileReport) -> None:
        owner = ownership(vm.other_config, self.installation)
        if owner is Ownership.NOT_DYNVM:
            made_for = lease_of_clone_name(vm.name)
            if made_for is None or self.leases.get(made_for) is None:
                return  # never ours to touch
            # a clone of ours that dynvm died before marking: its name holds one of our leases
            self._provisioner(self.settings, host).claim(vm.ref, made_for)
            log.warning(
                "reconcile: %s on %s is a clone of lease %s that was never marked", vm.name, host.display, made_for
            )
            vm = dataclasses.replace(vm, other_config={**vm.other_config, **marker(made_for, self.installation)})
            owner = Ownership.OURS
        if owner is Ownership.OTHER_INSTALLATION:
            return  # never ours to touch
        lease_id = lease_of(vm.other_config) or ""
        holder = active.get(lease_id)
        if holder is None or holder.host_ref != host.ref:
            holder = self.leases.get(lease_id)  # a create that began after `active` was read ...
        known = holder is not None
        left_behind = holder is not None and holder.vm_uuid is not None and holder.vm_uuid != vm.uuid
        if holder is not None and holder.state in ACTIVE_STATES and holder.host_ref == host.ref and not left_behind:
            if owner is Ownership.UNNAMED:  # made before installation ids: write ours on it
                self._provisioner(self.settings, host).claim(vm.ref, lease_id)
            return  # (... on another host, or not the lease's VM: an attempt left behind)
        if not known:
            if owner is Ownership.UNNAMED:
                return  # dynvm's, from before installation ids, and not this database's: leave it
            self._quarantine_or_destroy(host, vm.ref, vm.name, vm.other_config, report)
            return
        self._provisioner(self.settings, host).destroy(vm.ref, lease_id)
        report.orphans_destroyed.append(vm.name)
        log.warning("reconcile: destroyed %s on %s (dynvm's, but no lease holds it)", vm.name, host.display)

    def _quarantine_or_destroy(
        self, host: HostSettings, ref: str, name: str, other_config: dict[str, str], report: ReconcileReport
    ) -> None:
        """A VM of this installation whose lease the database does not know: halt and tag
        it the first time it is seen, destroy it once the quarantine is over."""
        provisioner = self._provisioner(self.settings, host)
        step = self._quarantine_step(other_config)
        keep = self.settings.common.quarantine_hours * 3600
        now = self.clock()
        if step == "quarantine":
            if provisioner.quarantine(ref, now):
                report.quarantined.append(name)
                log.warning(
                    "reconcile: %s on %s is this installation's, but its lease %s is unknown to this database "
                    "(restored from an older backup?): halted and kept until %s, then destroyed",
                    name,
                    host.display,
                    lease_of(other_config),
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now + keep)),
                )
            return
        if step == "wait":
            return
        provisioner.destroy(ref, lease_of(other_config))
        report.orphans_destroyed.append(name)
        log.warning("reconcile: destroyed %s on %s (its quarantine is over)", name, host.display)

    def _quarantine_step(self, other_config: dict[str, str]) -> str:
        """For a VM or disk whose lease this database does not know: "quarantine" it (the
        first time it is seen), "wait" (its quarantine is not over), or "destroy" it."""
        since = quarantined_at(other_config)
        keep = self.settings.common.quarantine_hours * 3600
        if since is None:
            return "quarantine" if keep > 0 else "destroy"
        return "wait" if self.clock() < since + keep else "destroy"

    def _reconcile_disks(self, settings: Settings, host: HostSettings, view: HostView, report: ReconcileReport) -> None:
        """Marked disks that no VM uses: destroyed when their lease has ended, quarantined
        when this database does not know it (the lease's VM is gone, so the disk is
        tagged rather than halted)."""
        for disk in view.disks:
            owner = ownership(disk.other_config, self.installation)
            if disk.attached or owner in (Ownership.NOT_DYNVM, Ownership.OTHER_INSTALLATION):
                continue
            lease_id = lease_of(disk.other_config) or ""
            lease = self.leases.get(lease_id)
            if lease is not None and lease.state in ACTIVE_STATES:
                continue  # being made, or detached by its user: theirs
            if lease is None and owner is Ownership.UNNAMED:
                continue

            def collect(disk=disk, lease=lease, lease_id=lease_id) -> None:  # type: ignore[no-untyped-def]
                provisioner = self._provisioner(settings, host)
                step = "destroy" if lease is not None else self._quarantine_step(disk.other_config)
                if step == "quarantine":
                    provisioner.quarantine_disk(disk.ref, self.clock())
                    report.quarantined.append(disk.uuid)
                if step != "destroy":
                    return
                problem = provisioner.destroy_disk(disk.ref, lease_id)
                if problem:
                    raise DestroyFailed(problem, host.ref)
                report.disks_destroyed.append(disk.uuid)
                log.warning(
                    "reconcile: destroyed disk %s (%s) on %s: no VM or lease held it",
                    disk.uuid,
                    disk.name,
                    host.display,
                )

            self._guarded(report, f"disk {disk.uuid} on {host.display}", collect)

    def quarantined(self) -> list[QuarantinedVm]:
        """VMs of this installation that reconcile holds halted in quarantine, from the mirror."""
        keep = self.settings.common.quarantine_hours * 3600
        out = []
        for view in self.inventory.views():
            for vm in view.vms:
                since = quarantined_at(vm.other_config)
                if since is not None and ownership(vm.other_config, self.installation) is Ownership.OURS:
                    out.append(
                        QuarantinedVm(vm.name, vm.uuid, view.ref, lease_of(vm.other_config) or "", since, since + keep)
                    )
        return sorted(out, key=lambda q: (q.quarantined_at, q.name))

    def _close_vanished(self, lease: Lease, host: HostSettings, report: ReconcileReport) -> None:
        self.leases.finish([lease.id], "released", self.clock(), "the VM vanished from its host")
        self.history.record_deleted(self.leases.get(lease.id) or lease, 0.0)
        report.vanished.append(lease.name)
        log.warning("reconcile: %s vanished from %s; lease closed", lease.name, host.display)

    def _collect_abandoned_clones(
        self, settings: Settings, report: ReconcileReport, give_up_at: float | None = None
    ) -> None:
        """Clones dynvm stopped waiting for (its host went silent, or its process died):
        once their host answers, find the VM each made (through its task), mark it and
        destroy it. A clone still running is waited for ``ADOPT_WAIT`` seconds, or until
        ``give_up_at`` (monotonic) when given, then looked at again on the next pass; a task
        xapi no longer knows left no VM to find."""
        for row in self.leases.abandoned_clones():
            host_ref, task, lease_id, name = (str(row[k]) for k in ("host_ref", "task", "lease_id", "name"))
            host = settings.host(host_ref)
            if host is None:
                log.warning("reconcile: host %s left the configuration; cannot look for %s's clone", host_ref, name)
                self.leases.forget_clone(host_ref, task)
                continue
            view = self.inventory.view(host_ref)
            if view is None or view.state is not HostState.UP:
                continue
            try:
                provisioner = self._provisioner(settings, host)
                wait = ADOPT_WAIT if give_up_at is None else max(0.0, give_up_at - time.monotonic())
                vm = provisioner.adopt_clone(task, lease_id, wait=wait)
                if vm is not None:
                    provisioner.destroy(vm, lease_id)
                    report.orphans_destroyed.append(name)
                    log.warning("reconcile: destroyed %s on %s (cloned after dynvm gave up)", name, host.display)
            except Exception as e:  # one clone that cannot be looked at never stops the pass
                log.warning("reconcile: cannot look at %s's clone on %s yet (%s)", name, host.display, e)
                report.errors.append(f"{name}'s clone on {host.display}: {e}")
                continue
            self.leases.forget_clone(host_ref, task)

    # -- stopping ----------------------------------------------------------------------

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for ``grace`` seconds, then
        cancel the rest (their VMs are removed) and wait for the roll-back."""
        self._stopping.set()
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace):
                log.warning("stopping: cancelling %d request(s) still in flight", self._in_flight)
                self._cancel.set()
                self._idle.wait_for(lambda: self._in_flight == 0, timeout=300)
        self._pool.shutdown(wait=True, cancel_futures=True)


class _RequestCancel:
    """What a create checks between its steps: dynvm stopping, or its request cancelled
    (read from the request's row at most every ``CANCEL_CHECK`` seconds)."""

    CANCEL_CHECK = 0.5

    def __init__(self, stopping: threading.Event, store: RequestStore, request_id: str | None) -> None:
        self._stopping = stopping
        self._store = store
        self._request_id = request_id
        self._checked_at = -self.CANCEL_CHECK
        self._cancelled = False
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        if self._stopping.is_set() or self._cancelled:
            return True
        if self._request_id is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.CANCEL_CHECK:
                self._checked_at = now
                record = self._store.get(self._request_id)
                self._cancelled = bool(record and record.cancel_requested)
        return self._cancelled


def _record_of(request: LeaseRequest, request_id: str) -> RequestRecord:
    return RequestRecord(
        id=request_id,
        username=request.username,
        os=request.os,
        count=request.count,
        state=CREATING,
        owner="",
        created_at=0.0,
        caller=request.caller,
        cpus=request.cpus,
        memory=request.memory,
        expires_in_minutes=request.expires_in_minutes,
        host_ref=request.host_ref,
    )


def _request_of(record: RequestRecord) -> LeaseRequest:
    return LeaseRequest(
        username=record.username,
        os=record.os,
        count=record.count,
        cpus=record.cpus,
        memory=record.memory,
        expires_in_minutes=record.expires_in_minutes,
        host_ref=record.host_ref,
        caller=record.caller,
        request_id=record.id,
    )
