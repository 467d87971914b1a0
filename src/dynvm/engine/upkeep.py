"""The lease engine's upkeep: what keeps the leases and the hosts in agreement when nobody
asks — expiry, recovery after a process died, and reconcile (leftover VMs and disks,
quarantine, vanished VMs, clones left running). Run by the leader's background loops and
at start-up; never on a request's path.

``Upkeep`` is a part of ``LeaseService`` (``leases.py``), which it extends: it uses the
service's stores, provider and release path. What a machine of a lease is (kept, ended,
unknown) is judged here; finding and removing them is the provider's (``collect_leaks``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..model import HeldElsewhere, Lease
from ..provider import QuarantinedVm, QuarantineStep, ReconcileReport, Verdict
from ..store.tables import ACTIVE_STATES
from .requests import CREATING, FAILED, QUEUED, RequestRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import HostSettings, Settings
    from ..provider import Provider
    from ..store.history import HistoryStore
    from ..store.leases import LeaseStore
    from .claim import ClaimKeeper
    from .lifecycle import ReleaseOutcome
    from .requests import RequestStore

log = logging.getLogger(__name__)

VANISH_GRACE = 30.0  # seconds a new lease's VM may take to show in the mirror
ADOPT_WAIT = 5.0  # seconds reconcile waits on a clone still running before it moves on
RECOVER_CLONE_WAIT = 30.0  # seconds start-up waits, in all, for clones a dead process left running
FINISHED_REQUESTS_KEPT = 7 * 24 * 3600.0  # seconds a finished request's status stays readable


class Upkeep:
    """Expiry, recovery and reconcile, as methods of ``LeaseService``."""

    # LeaseService's (leases.py) and its other parts', which these methods use
    leases: LeaseStore
    history: HistoryStore
    provider: Provider
    requests: RequestStore
    clock: Callable[[], float]
    owner: str
    claim: ClaimKeeper

    if TYPE_CHECKING:

        @property
        def settings(self) -> Settings: ...
        def _report(self, event: str, *args: object) -> None: ...
        def _release(
            self,
            settings: Settings,
            candidates: list[Lease],
            only_from: list[str],
            final_state: str,
            reason: str = "",
            expect_owner: str | None = None,
            pooled: bool | None = None,
        ) -> tuple[ReleaseOutcome, list[Lease]]: ...
        def _roll_back(self, settings: Settings, ready: list[Lease], reason: str) -> None: ...
        def _is_releasing(self, lease_id: str) -> bool: ...
        def _live_processes(self) -> set[str]: ...
        def _abandon_clone(self, lease: Lease) -> None: ...

    def expire_due(self) -> list[str]:
        """Destroy every lease past its expiry (the reaper calls this every few seconds).
        Only handed-over leases expire: a request still being made keeps all its VMs."""
        if self.claim.contested is not None:
            return []
        _, expired = self._release(self.settings, self.leases.expired(self.clock()), ["ready"], "expired", "expired")
        return [lease.name for lease in expired]

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
        if self.claim.contested is not None:
            return []
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
        failed above) goes back to the queue, in its old place, if it waits and its caller
        can still be answered (v1: its status is read by id; legacy: the process its
        caller waits on is alive); a wait that ran out meanwhile then times out as any
        other. Else it fails (nobody waits for the answer). A queued one whose caller
        waited on the dead process (legacy: the HTTP answer died with it) is cancelled;
        v1 ones stay queued for the leader."""
        now = self.clock()
        for record in self.requests.in_state(CREATING):
            if record.builder in alive or record.builder is None:
                continue
            if self.may_requeue(record, alive):
                self.requests.transition(record.id, [CREATING], QUEUED, builder=None, started_at=None, vms=[])
                log.warning("request %s: the dynvm making its VMs stopped; queued again", record.id)
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
                self.requests.end_cancelled(record.id, [QUEUED], "the dynvm process its caller waited on stopped")
        self.requests.forget_finished(now - FINISHED_REQUESTS_KEPT)

    @staticmethod
    def may_requeue(record: RequestRecord, alive: set[str]) -> bool:
        """Whether a request whose VMs stopped being made goes back to the queue: it waits,
        and whoever waits for its answer is still there."""
        return record.wait_until is not None and (record.origin == "v1" or record.owner in alive)

    def _roll_back_unanswered_requests(self, settings: Settings, alive: set[str]) -> None:
        """Ready leases a dead process never handed over (it died before its request
        answered): nobody got them, so they are removed, all or nothing."""
        waiting = [
            lease for lease in self.leases.in_state("ready") if lease.handed_over_at is None and not lease.pooled
        ]
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
        if self.claim.contested is not None:
            report.errors.append(self.claim.contested)
            return report
        settings = self.settings
        self.rehome_same_pools(settings)
        active = {lease.id: lease for lease in self.leases.active()}
        live = self._live_processes() - ({self.owner} if startup else set())
        judge = _Judge(self, active)
        for host in settings.hosts:
            status = self.provider.status(host)
            if status is None or not status.up:
                continue
            self.provider.collect_leaks(host, judge, report)
            on_host = {machine.uuid for machine in self.provider.machines(host)}
            for lease in active.values():
                settled = (lease.ready_at or 0) < self.clock() - VANISH_GRACE  # the mirror may lag a moment
                if (
                    lease.host_ref == host.ref
                    and lease.state == "ready"
                    and lease.vm_uuid not in on_host
                    and (settled or (startup and lease.owner not in live))
                ):
                    report.guarded(lease.name, self._close_vanished, lease, host, report)
        self._collect_abandoned_clones(settings, report)
        self._report("reconciled", report)
        return report

    def other_pools(self, a: str, b: str) -> bool:
        """Whether configured hosts ``a`` and ``b`` are known to be different pools: both
        reached, with pools of their own. A host that is gone from the configuration, or
        not reached yet, may be the same pool, so nothing of it is judged left behind."""
        settings = self.settings
        ids = []
        for ref in (a, b):
            host = settings.host(ref)
            status = self.provider.status(host) if host is not None else None
            if status is None or not status.pool_id:
                return False
            ids.append(status.pool_id)
        return ids[0] != ids[1]

    def same_pools(self, settings: Settings) -> dict[str, str]:
        """Configured host ref -> the ref of the earlier section that counts its pool, for
        every section that names a pool another section counts."""
        out = {}
        for host in settings.hosts:
            status = self.provider.status(host)
            if status is not None and status.same_pool_as:
                out[host.ref] = status.same_pool_as
        return out

    def rehome_same_pools(self, settings: Settings) -> None:
        """Leases held on a section that names the same pool as an earlier one (a pool
        written as a section per member, and an upgrade from a dynvm that counted each
        section alone) move to the section that counts the pool, so that each rule that
        compares hosts (room, verdicts, vanished VMs) sees one host. Called before every
        reconcile pass, and so at start-up."""
        for ref, counting in self.same_pools(settings).items():
            moved = self.leases.rehome(ref, counting)
            if moved:
                log.warning("%d lease(s) on host %s moved to host %s, which counts the same pool", moved, ref, counting)

    def quarantine_step(self, since: float | None) -> QuarantineStep:
        """For a VM or disk whose lease this database does not know: quarantine it (the
        first time it is seen), wait (its quarantine is not over), or destroy it."""
        keep = self.settings.common.quarantine_hours * 3600
        if since is None:
            return QuarantineStep.QUARANTINE if keep > 0 else QuarantineStep.DESTROY
        return QuarantineStep.WAIT if self.clock() < since + keep else QuarantineStep.DESTROY

    def quarantined(self) -> list[QuarantinedVm]:
        """VMs of this installation that reconcile holds halted in quarantine."""
        keep = self.settings.common.quarantine_hours * 3600
        out = [vm for host in self.settings.hosts for vm in self.provider.quarantined(host, keep)]
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
            status = self.provider.status(host)
            if status is None or not status.up:
                continue
            try:
                wait = ADOPT_WAIT if give_up_at is None else max(0.0, give_up_at - time.monotonic())
                vm = self.provider.adopt(host, task, lease_id, wait=wait)
                if vm is not None:
                    self.provider.destroy(host, vm, lease_id)
                    report.orphans_destroyed.append(name)
                    log.warning("reconcile: destroyed %s on %s (cloned after dynvm gave up)", name, host.display)
            except HeldElsewhere as e:  # it went on to be handed out: a restored database; quarantined
                log.error("reconcile: %s's clone on %s: %s", name, host.display, e)
            except Exception as e:  # one clone that cannot be looked at never stops the pass
                log.warning("reconcile: cannot look at %s's clone on %s yet (%s)", name, host.display, e)
                report.errors.append(f"{name}'s clone on {host.display}: {e}")
                continue
            self.leases.forget_clone(host_ref, task)


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
            holder = self._upkeep.leases.get(lease_id)
        if holder is None:
            return Verdict.UNKNOWN
        if held_by is not None and self._disagrees(holder, held_by):
            return Verdict.UNKNOWN
        if holder.state not in ACTIVE_STATES:
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
        return Verdict.ENDED if self._upkeep.other_pools(holder.host_ref, host_ref) else Verdict.KEEP

    def _disagrees(self, lease: Lease, held_by: str) -> bool:
        """The host says request ``held_by`` holds the lease's VM; does the database say
        otherwise? It does when the lease has ended, waits in a ready pool, or belongs to
        another request: this database is older than the host (a restored backup) or not
        the one that handed it out (a copy). Such a VM is quarantined, never handed out or
        destroyed at once; an active lease that disagrees ends here, its VM left alone."""
        if lease.state in ACTIVE_STATES and not lease.pooled and lease.request_id == held_by:
            return False
        if lease.state in ACTIVE_STATES:
            self._upkeep.leases.finish(
                [lease.id],
                "failed",
                self._upkeep.clock(),
                f"the host says request {held_by} holds its VM, not this lease "
                "(the database was restored from a backup, or copied): quarantined",
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
        return self._upkeep.clock()
