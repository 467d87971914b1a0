"""Making one lease's VM through the provider: the retries and moves of a create (SPEC.md
§3), a ready-pool VM's check when a request takes it, and the hold written on each VM
just before its request hands it over. Called from a request's build (``build.py``) and
from a ready pool's refill; it never decides which request is served (``scheduler.py``)
nor where a VM goes (``admission.py`` places it, and places it again when it moves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from .. import probe
from ..config import Settings
from ..model import CreatedVm, FailureKind, Lease, ProvisionError, VmSpec
from ..provider import Cancel
from ..states import Actor, LeaseState
from .admission import Admission
from .context import EngineContext
from .ready_stock import pool_name
from .release import Releaser
from .tracker import DurableTracker

log = logging.getLogger(__name__)

WARM_PROBE_SECONDS = 3.0  # how long a ready VM's service port is given to answer at its hand-out
CREATE_ATTEMPTS = 3  # per VM (SPEC.md §3); unpinned, the last one goes to another host if one has room


class Creator:
    def __init__(self, ctx: EngineContext, admission: Admission, releaser: Releaser, tracker: DurableTracker) -> None:
        self.ctx = ctx
        self.admission = admission
        self.releaser = releaser
        self.tracker = tracker

    def _stage(self, lease: Lease, stage: str, **details: str | None) -> None:
        """Report a create's progress on its request (a ready-pool VM has none)."""
        if not lease.pooled:
            self.tracker.stage(lease.request_id, lease.name, stage, **details)

    def take_warm(self, settings: Settings, lease: Lease) -> Lease:
        """A ready-pool VM this request took: still there and answering? Nothing on its
        host changes yet: ``hold`` gives it to the request with the others."""
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
            if not isinstance(e, ProvisionError):  # else it is made cold (``create_one``)
                self._stage(lease, "failed", error=str(e))
            raise
        return lease

    def replace_with_cold(
        self, settings: Settings, warm: Lease, why: str, pinned: bool, cancel: Cancel | None = None
    ) -> Lease:
        """A ready-pool VM the request took cannot be handed out (its guest stopped
        answering, or its host would not hand it over): it goes, and a VM is made for the
        request in its place, under the same name (on the same host when pinned). Raises
        when no host has room for it, or its create fails (its lease then ends failed)."""
        ctx = self.ctx
        log.warning("%s: its ready VM is not handed out (%s); making one for it", warm.name, why)
        # the ready VM gives the name back (its destroy may wait on a host that is down)
        going = ctx.leases.rename(warm.id, pool_name(warm.os)) or warm
        self.releaser.release(settings, [going], [LeaseState.READY], LeaseState.FAILED, f"not handed out: {why}")
        cold = self.admission.reserve_in_place_of(settings, warm, only=warm.host_ref if pinned else None)
        if cold is None:
            self._stage(warm, "failed", error=why)
            raise ProvisionError(f"{warm.name}: {why}; and no host has room to make one in its place", warm.host_ref)
        self._stage(cold, "moved", host=cold.host_ref)
        try:
            return self.create_one(settings, cold, pinned, cancel)
        except BaseException as e:
            ctx.leases.finish([cold.id], LeaseState.FAILED, ctx.clock(), str(e), by=Actor.BUILDER)
            raise

    @staticmethod
    def _still_answers(ip: str, port: int) -> bool:
        """A few seconds' tries, not one: a busy guest or a lost SYN is not a dead one."""
        try:
            probe.wait_until_answering(ip, port, time.monotonic() + WARM_PROBE_SECONDS)
        except probe.ServiceDown:
            return False
        return True

    def hold(self, settings: Settings, ready: list[Lease]) -> list[tuple[Lease, Exception]]:
        """Write on each VM, on its host, that its request holds it: the step just before
        the database hands them over (``provider.hand_out``: compare-and-set, so a VM the
        host says another request holds is refused, whatever this database says). A
        ready-pool VM takes its lease's name here. Side by side, as destroys are. The VMs
        that could not be held, and why."""
        outcomes = self.ctx.side_by_side.map(lambda lease: self._hold_one(settings, lease), ready)
        return [(lease, error) for lease, error in zip(ready, outcomes, strict=True) if error is not None]

    def _hold_one(self, settings: Settings, lease: Lease) -> Exception | None:
        host = settings.host(lease.host_ref)
        spec = VmSpec(name=lease.name, os=lease.os, template=lease.template, lease_id=lease.id, holder=lease.request_id)
        try:
            if host is None or not lease.vm_ref:
                raise ProvisionError(f"{lease.name}: its host left the configuration", lease.host_ref)
            self.ctx.provider.hand_out(host, lease.vm_ref, spec)
            if lease.pooled_at is not None:  # a ready-pool VM enters the history once a request takes it
                self._stage(lease, "ready", ip=lease.ip)
                self.ctx.history.record_created(lease, host.origin, handed_out_at=self.ctx.clock())
        except Exception as e:
            log.error("%s: not handed out: %s", lease.name, e)
            self._stage(lease, "failed", error=str(e))
            return e
        return None

    def create_one(self, settings: Settings, lease: Lease, pinned: bool = False, cancel: Cancel | None = None) -> Lease:
        """Create one VM. Unpinned, it may move: when its host stops answering, to the host
        with most room among those not tried yet; when its host's guests get no usable IP
        (APIPA, DHCP exhausted), its last attempt goes to another host if one has room. A
        failed xapi call is retried where it happened. A ready-pool VM the request took is
        only checked (``take_warm``); one that no longer answers is made cold instead."""
        self.ctx.refuse_if_contested()
        if lease.pooled_at is not None and lease.state == LeaseState.READY:
            try:
                return self.take_warm(settings, lease)
            except ProvisionError as e:
                return self.replace_with_cold(settings, lease, str(e), pinned, cancel)
        started = time.monotonic()
        tried = {lease.host_ref}
        refused: set[tuple[str, str]] = set()  # (host, member) that would not start it
        left, attempt = CREATE_ATTEMPTS, 0
        while True:
            attempt, left = attempt + 1, left - 1
            try:
                spent = time.monotonic() - started if attempt > 1 else 0.0
                return self._create_on(settings, lease, attempt, spent, cancel)
            except ProvisionError as e:
                failure = e
            kind = failure.kind
            if kind is FailureKind.HOST_UNREACHABLE:
                self.abandon_clone(self.ctx.leases.get(lease.id) or lease)  # its vm_ref as the create left it
            if kind is FailureKind.FINAL or self.ctx.cancel.is_set() or (cancel is not None and cancel.is_set()):
                raise failure
            if kind is FailureKind.MEMBER_REFUSED:  # the member failed, not the VM: one more try at least
                left = max(1, left)
                refused.add((lease.host_ref, failure.member))
                only = lease.host_ref if pinned else None
                moved = self.admission.place_again(settings, lease, tried - {lease.host_ref}, refused, only)
                if moved is None:
                    raise ProvisionError(f"{failure}; no other member has room for it", failure.host, kind=kind)
                lease = self._moved(lease, moved, str(failure), tried)
                continue
            if kind is FailureKind.HOST_UNREACHABLE:
                if pinned:
                    raise failure
                left = max(1, left)
                moved = self.admission.place_again(settings, lease, tried)
                if moved is None:
                    raise ProvisionError(f"{failure}; no other host has room for it", failure.host, kind=kind)
                lease = self._moved(lease, moved, f"host {lease.host_ref} stopped answering", tried)
                continue
            if left <= 0:  # the VM itself failed, every time
                hosts = f"hosts {', '.join(sorted(tried))}" if len(tried) > 1 else self._where(settings, lease)
                last = str(failure).removeprefix(f"{lease.name}: ")
                raise ProvisionError(
                    f"{lease.name}: no usable VM on {hosts} after {CREATE_ATTEMPTS} attempts; last: {last}",
                    failure.host,
                    kind=kind,
                )
            if left == 1 and kind is FailureKind.NO_ADDRESS and not pinned:
                # the last attempt goes where guests may get an address (another DHCP scope)
                moved = self.admission.place_again(settings, lease, tried)
                if moved is not None:
                    why = f"host {lease.host_ref} gives its guests no usable IP"
                    lease = self._moved(lease, moved, why, tried)
                    continue
            self._stage(lease, "retrying")

    def _moved(self, lease: Lease, moved: Lease, why: str, tried: set[str]) -> Lease:
        log.warning("%s: %s; placed again on host %s", lease.name, why, moved.host_ref)
        self._stage(lease, "moved", host=moved.host_ref)
        tried.add(moved.host_ref)
        return moved

    @staticmethod
    def _where(settings: Settings, lease: Lease) -> str:
        host = settings.host(lease.host_ref)
        return host.display if host is not None else f"host {lease.host_ref}"

    def abandon_clone(self, lease: Lease) -> None:
        """dynvm stops waiting for this lease's create (its host went silent, or the process
        that ran it died): if a clone was running, it may still end and leave a VM without
        dynvm's marker. Remember its task for ``Upkeep.collect_abandoned_clones``."""
        task = self.ctx.provider.pending_job(lease.vm_ref or "")
        if task is not None:
            self.ctx.clones.abandon_clone(lease.host_ref, task, lease.id, lease.name, self.ctx.clock())
            log.warning("%s: a clone may still run on host %s; reconcile removes it", lease.name, lease.host_ref)

    def _create_on(
        self, settings: Settings, lease: Lease, attempt: int, spent: float, cancel: Cancel | None = None
    ) -> Lease:
        """One attempt on the lease's host. ``spent``: seconds the VM's earlier attempts took
        (its create time counts them)."""
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
            created: CreatedVm = self.ctx.provider.create(
                host,
                spec,
                progress,
                cancel or self.ctx.cancel,
                on_pending=lambda handle: self.ctx.leases.remember_vm(lease.id, handle),
                attempt=attempt,
            )
            created = dataclasses.replace(created, create_seconds=created.create_seconds + spent, attempts=attempt)
        except Exception as e:
            self._stage(lease, "failed", error=str(e))
            self.ctx.report("create_failed", type(e).__name__)
            raise
        now = self.ctx.clock()
        # a ready-pool VM joins its pool as it turns ready, for its ready TTL
        pooled_until = now + settings.ready_pools.ready_ttl_minutes * 60 if lease.pooled else None
        with self.ctx.leases.db.write() as conn:  # the lease turns ready, and its VM's history begins, together
            ready = self.ctx.leases.mark_ready(lease.id, created, now, self.ctx.owner, conn, pooled_until)
            if ready is not None and not ready.pooled:  # a ready-pool VM enters the history once a request takes it
                self.ctx.history.record_created(ready, host.origin, conn=conn)
        if ready is None:  # another replica took this process for dead and failed the lease
            with contextlib.suppress(Exception):  # else reconcile removes it: its lease has ended
                self.ctx.provider.destroy(host, created.ref, lease.id)
            raise ProvisionError(f"{lease.name}: the lease ended while its VM was being made", host.ref)
        self._stage(lease, "ready", ip=ready.ip)
        self.ctx.report("created", ready)
        return ready
