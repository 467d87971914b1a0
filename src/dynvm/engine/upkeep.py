"""The lease engine's upkeep: what keeps the leases and the hosts in agreement when nobody
asks — expiry, recovery after a process died, and reconcile (leftover VMs and disks,
quarantine, vanished VMs, clones left running). Run by the leader's background loops and
at start-up; never on a request's path.

What a machine of a lease is (kept, ended, unknown) is judged here; finding and removing
them is the provider's (``collect_leaks``); ending leases goes through ``release.py``.
"""

from __future__ import annotations

import logging
import time

from ..config import Settings
from ..hosts import HostSettings
from ..model import HeldElsewhere, Lease
from ..provider import QuarantinedVm, QuarantineStep, ReconcileReport, Verdict
from ..states import ACTIVE_LEASE_STATES, Actor, LeaseState, RequestState
from .capacity import Capacity
from .context import EngineContext
from .creator import Creator
from .queue import may_requeue
from .release import Releaser

log = logging.getLogger(__name__)

VANISH_GRACE = 30.0  # seconds a new lease's VM may take to show in the mirror
ADOPT_WAIT = 5.0  # seconds reconcile waits on a clone still running before it moves on
RECOVER_CLONE_WAIT = 30.0  # seconds start-up waits, in all, for clones a dead process left running
FINISHED_REQUESTS_KEPT = 7 * 24 * 3600.0  # seconds a finished request's status stays readable


class Upkeep:
    def __init__(self, ctx: EngineContext, releaser: Releaser, creator: Creator, capacity: Capacity) -> None:
        self.ctx = ctx
        self.releaser = releaser
        self.creator = creator
        self.capacity = capacity

    def expire_due(self) -> list[str]:
        """Destroy every lease past its expiry (the reaper calls this every few seconds).
        Only handed-over leases expire: a request still being made keeps all its VMs."""
        ctx = self.ctx
        if ctx.contested is not None:
            return []
        due = ctx.leases.expired(ctx.clock())
        _, expired = self.releaser.release(ctx.settings(), due, [LeaseState.READY], LeaseState.EXPIRED, "expired")
        return [lease.name for lease in expired]

    def heartbeat(self) -> None:
        """Tell other replicas this process is alive (every reaper tick)."""
        self.ctx.replicas.heartbeat(self.ctx.owner, self.ctx.clock())

    def recover(self) -> list[str]:
        """Creates left by a process that died never finish: fail them, so that their VMs
        become leftovers for ``reconcile``. A process is dead when its heartbeat is older
        than ``REPLICA_STALE_SECONDS``; creates of live replicas are theirs to finish. A
        dead process's request whose VMs were all ready is handed over now (its lifetime
        starts). Releases that are not under way any more (their process died, or the
        destroy failed) are redone; a release this process is doing right now is left
        alone. Runs at start-up and with each reconcile."""
        ctx = self.ctx
        self.heartbeat()
        if ctx.contested is not None:
            return []
        alive = ctx.live_processes()
        stale = [lease for lease in ctx.leases.in_state(LeaseState.CREATING) if lease.owner not in alive]
        settings = ctx.settings()
        for lease in stale:  # a clone that was still running when its process died
            self.creator.abandon_clone(lease)
        why = "dynvm stopped during the create"
        ctx.leases.finish([lease.id for lease in stale], LeaseState.FAILED, ctx.clock(), why, by=Actor.RECOVERY)
        if stale:  # their clones get RECOVER_CLONE_WAIT in all; what still runs is left to reconcile
            give_up_at = time.monotonic() + RECOVER_CLONE_WAIT
            self.collect_abandoned_clones(settings, ReconcileReport(), give_up_at=give_up_at)
        self._roll_back_unanswered_requests(settings, alive)
        self._recover_requests(alive)
        for lease in ctx.leases.in_state(LeaseState.RELEASING):
            if lease.owner in alive and (lease.owner != ctx.owner or self.releaser.is_releasing(lease.id)):
                continue
            over = lease.handed_over_at is not None and lease.expires_at <= ctx.clock()
            final = LeaseState.EXPIRED if over else LeaseState.RELEASED
            reason = "release finished by reconcile"
            self.releaser.release(settings, [lease], [LeaseState.RELEASING], final, reason, lease.owner)
        return [lease.name for lease in stale]

    def _recover_requests(self, alive: set[str]) -> None:
        """Requests a dead process left. One it was making VMs for (their leases were just
        failed above) goes back to the queue, in its old place, if it waits and its caller
        can still be answered (v1: its status is read by id; legacy: the process its
        caller waits on is alive); a wait that ran out meanwhile then times out as any
        other. Else it fails (nobody waits for the answer). A queued one whose caller
        waited on the dead process (legacy: the HTTP answer died with it) is cancelled;
        v1 ones stay queued for the leader."""
        requests = self.ctx.requests
        now = self.ctx.clock()
        creating, queued = [RequestState.CREATING], [RequestState.QUEUED]
        for record in requests.in_state(RequestState.CREATING):
            if record.builder in alive or record.builder is None:
                continue
            if may_requeue(record, alive):
                requests.transition(
                    record.id, creating, RequestState.QUEUED, by=Actor.RECOVERY, builder=None, started_at=None, vms=[]
                )
                log.warning("request %s: the dynvm making its VMs stopped; queued again", record.id)
            else:
                requests.transition(
                    record.id,
                    creating,
                    RequestState.FAILED,
                    by=Actor.RECOVERY,
                    error="dynvm stopped while making its VMs; everything built was removed: ask again",
                    error_status=503,
                )
        for record in requests.in_state(RequestState.QUEUED):
            if record.origin == "legacy" and record.owner not in alive:
                why = "the dynvm process its caller waited on stopped"
                requests.end_cancelled(record.id, queued, why, by=Actor.RECOVERY)
        requests.forget_finished(now - FINISHED_REQUESTS_KEPT)

    def _roll_back_unanswered_requests(self, settings: Settings, alive: set[str]) -> None:
        """Ready leases a dead process never handed over (it died before its request
        answered): nobody got them, so they are removed, all or nothing."""
        waiting = [
            lease
            for lease in self.ctx.leases.in_state(LeaseState.READY)
            if lease.handed_over_at is None and not lease.pooled
        ]
        orphaned = [lease for lease in waiting if lease.owner not in alive]
        if orphaned:
            self.releaser.roll_back(settings, orphaned, "dynvm stopped before the request answered")

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
        ctx = self.ctx
        report = ReconcileReport()
        if ctx.contested is not None:
            report.errors.append(ctx.contested)
            return report
        settings = ctx.settings()
        self.rehome_same_pools(settings)
        active = {lease.id: lease for lease in ctx.leases.active()}
        live = ctx.live_processes() - ({ctx.owner} if startup else set())
        judge = _Judge(self, active)
        for host in settings.hosts:
            status = ctx.provider.status(host)
            if status is None or not status.up:
                continue
            ctx.provider.collect_leaks(host, judge, report)
            on_host = {machine.uuid for machine in ctx.provider.machines(host)}
            for lease in active.values():
                settled = (lease.ready_at or 0) < ctx.clock() - VANISH_GRACE  # the mirror may lag a moment
                if (
                    lease.host_ref == host.ref
                    and lease.state == LeaseState.READY
                    and lease.vm_uuid not in on_host
                    and (settled or (startup and lease.owner not in live))
                ):
                    report.guarded(lease.name, self._close_vanished, lease, host, report)
        self.collect_abandoned_clones(settings, report)
        ctx.report("reconciled", report)
        return report

    def rehome_same_pools(self, settings: Settings) -> None:
        """Leases held on a section that names the same pool as an earlier one (a pool
        written as a section per member, and an upgrade from a dynvm that counted each
        section alone) move to the section that counts the pool, so that each rule that
        compares hosts (room, verdicts, vanished VMs) sees one host. Called before every
        reconcile pass, and so at start-up."""
        for ref, counting in self.capacity.same_pools(settings).items():
            moved = self.ctx.leases.rehome(ref, counting)
            self.ctx.clones.rehome(ref, counting)
            if moved:
                log.warning("%d lease(s) on host %s moved to host %s, which counts the same pool", moved, ref, counting)

    def quarantine_step(self, since: float | None) -> QuarantineStep:
        """For a VM or disk whose lease this database does not know: quarantine it (the
        first time it is seen), wait (its quarantine is not over), or destroy it."""
        keep = self.ctx.settings().common.quarantine_hours * 3600
        if since is None:
            return QuarantineStep.QUARANTINE if keep > 0 else QuarantineStep.DESTROY
        return QuarantineStep.WAIT if self.ctx.clock() < since + keep else QuarantineStep.DESTROY

    def quarantined(self) -> list[QuarantinedVm]:
        """VMs of this installation that reconcile holds halted in quarantine."""
        settings = self.ctx.settings()
        keep = settings.common.quarantine_hours * 3600
        out = [vm for host in settings.hosts for vm in self.ctx.provider.quarantined(host, keep)]
        return sorted(out, key=lambda q: (q.quarantined_at, q.name))

    def _close_vanished(self, lease: Lease, host: HostSettings, report: ReconcileReport) -> None:
        ctx = self.ctx
        ctx.leases.finish(
            [lease.id], LeaseState.RELEASED, ctx.clock(), "the VM vanished from its host", by=Actor.RECONCILE
        )
        ctx.history.record_deleted(ctx.leases.get(lease.id) or lease, 0.0)
        report.vanished.append(lease.name)
        log.warning("reconcile: %s vanished from %s; lease closed", lease.name, host.display)

    def collect_abandoned_clones(
        self, settings: Settings, report: ReconcileReport, give_up_at: float | None = None
    ) -> None:
        """Clones dynvm stopped waiting for (its host went silent, or its process died):
        once their host answers, find the VM each made (through its task), mark it and
        destroy it. A clone still running is waited for ``ADOPT_WAIT`` seconds, or until
        ``give_up_at`` (monotonic) when given, then looked at again on the next pass; a task
        xapi no longer knows left no VM to find."""
        ctx = self.ctx
        for row in ctx.clones.abandoned_clones():
            host_ref, task, lease_id, name = (str(row[k]) for k in ("host_ref", "task", "lease_id", "name"))
            host = settings.host(host_ref)
            if host is None:
                log.warning("reconcile: host %s left the configuration; cannot look for %s's clone", host_ref, name)
                ctx.clones.forget_clone(host_ref, task)
                continue
            status = ctx.provider.status(host)
            if status is None or not status.up:
                continue
            try:
                wait = ADOPT_WAIT if give_up_at is None else max(0.0, give_up_at - time.monotonic())
                vm = ctx.provider.adopt(host, task, lease_id, wait=wait)
                if vm is not None:
                    ctx.provider.destroy(host, vm, lease_id)
                    report.orphans_destroyed.append(name)
                    log.warning("reconcile: destroyed %s on %s (cloned after dynvm gave up)", name, host.display)
            except HeldElsewhere as e:  # it went on to be handed out: a restored database; quarantined
                log.error("reconcile: %s's clone on %s: %s", name, host.display, e)
            except Exception as e:  # one clone that cannot be looked at never stops the pass
                log.warning("reconcile: cannot look at %s's clone on %s yet (%s)", name, host.display, e)
                report.errors.append(f"{name}'s clone on {host.display}: {e}")
                continue
            ctx.clones.forget_clone(host_ref, task)


class _Judge:
    """Reconcile's verdicts for one pass (``provider.LeakJudge``): ``active`` are the
    leases read at its start; a lease not among them is looked up (a create may have begun
    since)."""

    def __init__(self, upkeep: Upkeep, active: dict[str, Lease]) -> None:
        self._upkeep = upkeep
        self._active = active

    def verdict(
        self,
        lease_id: str,
        host_ref: str | None = None,
        machine_uuid: str | None = None,
        held_by: str | None = None,
    ) -> Verdict:
        holder = self._active.get(lease_id)
        if holder is None or held_by is not None or (host_ref is not None and holder.host_ref != host_ref):
            # read afresh: a hand-out changes the database before it writes on the host
            holder = self._upkeep.ctx.leases.get(lease_id)
        if holder is None:
            return Verdict.UNKNOWN
        if held_by is not None and self._disagrees(holder, held_by):
            return Verdict.UNKNOWN
        if holder.state not in ACTIVE_LEASE_STATES:
            return Verdict.ENDED
        if host_ref is None:
            return Verdict.KEEP  # a disk: its lease holds it wherever its VM is
        left_behind = holder.vm_uuid is not None and machine_uuid is not None and holder.vm_uuid != machine_uuid
        if holder.host_ref == host_ref:
            return Verdict.ENDED if left_behind else Verdict.KEEP
        if holder.vm_uuid is not None and machine_uuid == holder.vm_uuid:
            return Verdict.KEEP  # its own VM, seen through another section of the same pool
        # found on another host than its lease's: a leftover of an attempt there, unless the
        # two sections may name one pool (the same, or one of them not reached yet)
        return Verdict.ENDED if self._upkeep.capacity.other_pools(holder.host_ref, host_ref) else Verdict.KEEP

    def _disagrees(self, lease: Lease, held_by: str) -> bool:
        """The host says request ``held_by`` holds the lease's VM; does the database say
        otherwise? It does when the lease has ended, waits in a ready pool, or belongs to
        another request: this database is older than the host (a restored backup) or not
        the one that handed it out (a copy). Such a VM is quarantined, never handed out or
        destroyed at once; an active lease that disagrees ends here, its VM left alone."""
        if lease.state in ACTIVE_LEASE_STATES and not lease.pooled and lease.request_id == held_by:
            return False
        if lease.state in ACTIVE_LEASE_STATES:
            self._upkeep.ctx.leases.finish(
                [lease.id],
                LeaseState.FAILED,
                self._upkeep.ctx.clock(),
                f"the host says request {held_by} holds its VM, not this lease "
                "(the database was restored from a backup, or copied): quarantined",
                by=Actor.RECONCILE,
            )
            log.error(
                "reconcile: %s's VM is held by request %s on its host, which this database does not know as its "
                "holder (restored from a backup, or a copy?): the lease ends and the VM is quarantined",
                lease.name,
                held_by,
            )
        return True

    def quarantine_step(self, quarantined_at: float | None) -> QuarantineStep:
        return self._upkeep.quarantine_step(quarantined_at)

    def now(self) -> float:
        return self._upkeep.ctx.clock()
