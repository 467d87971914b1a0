"""Making and destroying one lease's VM through the provider: the retries and moves of
a create (SPEC.md §3), and a destroy that never loses a lease whose VM would not go.

``Lifecycle`` is a part of ``LeaseService`` (``leases.py``), which it extends: it uses the
service's stores, provider and tracker. Called from a request's build and from releases,
expiry and reconcile; it never decides which request is served or where (``placement.py``,
``scheduler.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .. import probe
from ..model import CreatedVm, Lease, LeaseError, NotDynvmVm, ProvisionError, VmSpec
from ..provider import DestroyResult
from ..store.history import origin_of
from . import placement
from .queue import _RequestCancel

if TYPE_CHECKING:
    import threading

    from sqlalchemy.engine import Connection

    from ..config import Settings
    from ..provider import Provider
    from ..store.history import HistoryStore
    from ..store.leases import LeaseStore
    from .requests import DurableTracker

log = logging.getLogger(__name__)
T = TypeVar("T")

DESTROYS_AT_ONCE = 32  # per release or reaper pass: enough to overlap, few enough not to flood a host
WARM_PROBE_SECONDS = 3.0  # how long a ready VM's service port is given to answer at its hand-out
RELEASE_RETRY = "release-retry"  # the owner of a lease whose destroy failed: whichever replica leads retries it
CREATE_ATTEMPTS = 3  # per VM (SPEC.md §3); unpinned, the last one goes to another host if one has room


def side_by_side(work: Callable[[Lease], T], leases: list[Lease], name: str) -> list[T]:
    """``work`` for each lease, at most ``DESTROYS_AT_ONCE`` at a time, results in order: on
    short-lived threads of its own (not the create pool, so it still runs while dynvm
    stops); one lease is done on the calling thread."""
    if len(leases) <= 1:
        return [work(lease) for lease in leases]
    with ThreadPoolExecutor(min(len(leases), DESTROYS_AT_ONCE), thread_name_prefix=name) as pool:
        return list(pool.map(work, leases))


@dataclass
class ReleaseOutcome:
    """What a release did, name by name.

    ``released``: gone, VM and disks. ``finishing``: the user's part is done, and dynvm
    finishes the rest in the background (a disk that would not go yet, or a release
    another process is doing): name -> sentence. ``failed``: the VM could not be
    destroyed; the lease stays ``releasing`` and reconcile tries again: name -> sentence.
    ``already``: names of the same release that an earlier try already released (a retry
    after a partial failure names every VM it was asked for)."""

    released: list[str] = field(default_factory=list)
    finishing: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    already: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Every name the release took on (the seed's answer)."""
        return sorted([*self.released, *self.finishing, *self.failed, *self.already])

    def states(self) -> list[str]:
        """A sentence per VM, in name order: what became of each."""
        out = []
        for name in self.names:
            if name in self.failed:
                out.append(self.failed[name])
            elif name in self.finishing:
                out.append(self.finishing[name])
            elif name in self.already:
                out.append(f"{name} was already released")
            else:
                out.append(f"{name} is released")
        return out

    def add(self, other: ReleaseOutcome) -> None:
        self.released.extend(other.released)
        self.finishing.update(other.finishing)
        self.failed.update(other.failed)
        self.already.extend(other.already)


class Lifecycle:
    """One VM's create and destroy, as methods of ``LeaseService``."""

    # LeaseService's (leases.py), which these methods use
    leases: LeaseStore
    history: HistoryStore
    provider: Provider
    tracker: DurableTracker
    clock: Callable[[], float]
    owner: str
    _cancel: threading.Event

    if TYPE_CHECKING:

        def refuse_if_contested(self) -> None: ...

        def _report(self, event: str, *args: object) -> None: ...
        def reservations(self, conn: Connection) -> list[dict[str, object]]: ...
        def _candidates(
            self,
            settings: Settings,
            os: str,
            req_cpus: int | None,
            req_memory: int | None,
            reserved: list[dict[str, object]],
            only: str | None = None,
        ) -> list[placement.Candidate]: ...

    def _stage(self, lease: Lease, stage: str, **details: str | None) -> None:
        """Report a create's progress on its request (a ready-pool VM has none)."""
        if not lease.pooled:
            self.tracker.stage(lease.request_id, lease.name, stage, **details)

    def _take_warm(self, settings: Settings, lease: Lease) -> Lease:
        """A ready-pool VM this request took: still there and answering? Nothing on its
        host changes yet: ``_hold`` gives it to the request with the others."""
        host = settings.host(lease.host_ref)
        try:
            if host is None or not lease.vm_ref:
                raise ProvisionError(f"{lease.name}: its ready VM's host left the configuration", lease.host_ref)
            port = settings.probe.port_for(lease.os)
            if port and lease.ip and not self._still_answers(lease.ip, port):
                # it answered when it was made; a guest that died in the pool since (its
                # member crashed before the master noticed, a kernel panic) is no one's VM
                raise ProvisionError(
                    f"{lease.name}: its ready VM at {lease.ip} no longer answers on port {port}", lease.host_ref
                )
        except Exception as e:
            self._stage(lease, "failed", error=str(e))
            raise
        return lease

    @staticmethod
    def _still_answers(ip: str, port: int) -> bool:
        """A few seconds' tries, not one: a busy guest or a lost SYN is not a dead one."""
        try:
            probe.wait_until_answering(ip, port, time.monotonic() + WARM_PROBE_SECONDS)
        except probe.ServiceDown:
            return False
        return True

    def _hold(self, settings: Settings, ready: list[Lease]) -> list[tuple[Lease, Exception]]:
        """Write on each VM, on its host, that its request holds it: the step just before
        the database hands them over (``provider.hand_out``: compare-and-set, so a VM the
        host says another request holds is refused, whatever this database says). A
        ready-pool VM takes its lease's name here. Side by side, as destroys are. The VMs
        that could not be held, and why."""
        outcomes = side_by_side(lambda lease: self._hold_one(settings, lease), ready, "hand-out")
        return [(lease, error) for lease, error in zip(ready, outcomes, strict=True) if error is not None]

    def _hold_one(self, settings: Settings, lease: Lease) -> Exception | None:
        host = settings.host(lease.host_ref)
        spec = VmSpec(name=lease.name, os=lease.os, template=lease.template, lease_id=lease.id, holder=lease.request_id)
        try:
            if host is None or not lease.vm_ref:
                raise ProvisionError(f"{lease.name}: its host left the configuration", lease.host_ref)
            self.provider.hand_out(host, lease.vm_ref, spec)
            if lease.pooled_at is not None:  # a ready-pool VM enters the history once a request takes it
                self._stage(lease, "ready", ip=lease.ip)
                self.history.record_created(lease, origin_of(host.url), handed_out_at=self.clock())
        except Exception as e:
            log.error("%s: not handed out: %s", lease.name, e)
            self._stage(lease, "failed", error=str(e))
            return e
        return None

    def _create_one(
        self, settings: Settings, lease: Lease, pinned: bool = False, cancel: _RequestCancel | None = None
    ) -> Lease:
        """Create one VM. Unpinned, it may move: when its host stops answering, to the host
        with most room among those not tried yet; when its host's guests get no usable IP
        (APIPA, DHCP exhausted), its last attempt goes to another host if one has room. A
        failed xapi call is retried where it happened. A ready-pool VM the request took is
        only checked (``_take_warm``)."""
        self.refuse_if_contested()
        if lease.pooled_at is not None and lease.state == "ready":
            return self._take_warm(settings, lease)
        tried = {lease.host_ref}
        refused: set[tuple[str, str]] = set()  # (host, member) that would not start it
        attempts_left = CREATE_ATTEMPTS
        attempts = attempts_left if pinned else attempts_left - 1  # unpinned: one is kept for elsewhere
        while True:
            try:
                return self._create_on(settings, lease, attempts, cancel)
            except ProvisionError as e:
                if e.unreachable:
                    self._abandon_clone(self.leases.get(lease.id) or lease)  # its vm_ref as the create left it
                if e.refused_by:
                    refused.add((lease.host_ref, e.refused_by))
                    attempts_left = max(1, attempts_left - e.attempts_used)
                    moved = self._move(
                        settings,
                        lease,
                        exclude=tried - {lease.host_ref},
                        refused=refused,
                        only=lease.host_ref if pinned else None,
                    )
                    if moved is None:
                        raise ProvisionError(f"{e}; no other member has room for it", e.host) from None
                    log.warning("%s: %s; placed again on host %s", lease.name, e, moved.host_ref)
                    self._stage(lease, "moved", host=moved.host_ref)
                    tried.add(moved.host_ref)
                    lease = moved
                    attempts = attempts_left
                    continue
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
                self._stage(lease, "moved", host=moved.host_ref)
                tried.add(moved.host_ref)
                lease = moved
                attempts = attempts_left

    def _abandon_clone(self, lease: Lease) -> None:
        """dynvm stops waiting for this lease's create (its host went silent, or the process
        that ran it died): if a clone was running, it may still end and leave a VM without
        dynvm's marker. Remember its task for ``_collect_abandoned_clones``."""
        task = self.provider.pending_job(lease.vm_ref or "")
        if task is not None:
            self.leases.abandon_clone(lease.host_ref, task, lease.id, lease.name, self.clock())
            log.warning("%s: a clone may still run on host %s; reconcile removes it", lease.name, lease.host_ref)

    def _move(
        self,
        settings: Settings,
        lease: Lease,
        exclude: set[str],
        refused: Iterable[tuple[str, str]] = (),
        only: str | None = None,
    ) -> Lease | None:
        """Place the lease again, its own reservation aside: on a host not in ``exclude``
        (``only``: that host), on no member in ``refused``."""
        with self.leases.db.write() as conn:
            self.leases.lock_hosts(conn, [h.ref for h in settings.hosts])
            reserved = [r for r in self.reservations(conn) if r["lease_id"] != lease.id]
            candidates = [
                placement.without_members(c, {member for host, member in refused if host == c.host.ref})
                for c in self._candidates(settings, lease.os, lease.cpus, lease.memory, reserved, only=only)
                if c.host.ref not in exclude
            ]
            if placement.available(candidates) < 1:
                return None
            [choice] = placement.place(1, lease.os, candidates)
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
            member=lease.member,
            probe_port=settings.probe.port_for(lease.os),
        )

        def progress(stage: str) -> None:
            self._stage(lease, stage)

        try:
            created: CreatedVm = self.provider.create(
                host,
                spec,
                progress,
                cancel or self._cancel,
                on_pending=lambda handle: self.leases.remember_vm(lease.id, handle),
                attempts=attempts,
            )
        except Exception as e:
            self._stage(lease, "failed", error=str(e))
            self._report("create_failed", type(e).__name__)
            raise
        ready = self.leases.mark_ready(lease.id, created, self.clock(), self.owner)
        if ready is None:  # another replica took this process for dead and failed the lease
            with contextlib.suppress(Exception):  # else reconcile removes it: its lease has ended
                self.provider.destroy(host, created.ref, lease.id)
            raise ProvisionError(f"{lease.name}: the lease ended while its VM was being made", host.ref)
        self._stage(lease, "ready", ip=ready.ip)
        if not ready.pooled:  # a ready-pool VM enters the history once a request takes it
            self.history.record_created(ready, origin_of(host.url))
        self._report("created", ready)
        return ready

    def _destroy_all(
        self, settings: Settings, leases: list[Lease], final_state: str, reason: str = ""
    ) -> ReleaseOutcome:
        """Destroy these leases' VMs side by side: releasing eight VMs, or reaping a hundred,
        takes about as long as the slowest destroy, not the sum. Its own short-lived threads,
        not the create pool, so a release still completes while dynvm stops."""
        outcome = ReleaseOutcome()
        for one in side_by_side(lambda lease: self._destroy(settings, lease, final_state, reason), leases, "destroy"):
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
        try:
            self.refuse_if_contested()
        except LeaseError as e:
            self.leases.set_owner(lease.id, RELEASE_RETRY)  # redone by whichever dynvm may act
            outcome.failed[lease.name] = f"could not destroy {lease.name}: {e}"
            return outcome
        if lease.vm_ref and self.provider.pending_job(lease.vm_ref) is None:
            if host is None:  # out of dynvm's reach: the lease ends, the VM stays where it is
                reason = f"host {lease.host_ref} left the configuration; {lease.name} may still be on it"
                log.error("%s: %s", lease.name, reason)
            else:
                # a VM its host says this lease's request holds is destroyed only when this
                # database handed it over, or by the process that made it (a roll-back)
                holder = lease.request_id if lease.handed_over_at is not None or lease.owner == self.owner else None
                try:
                    result = self.provider.destroy(host, lease.vm_ref, lease.id, holder)
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
