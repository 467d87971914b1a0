"""The lease engine's upkeep: what keeps the leases and the hosts in agreement when nobody
asks — expiry, recovery after a process died, and reconcile (leftover VMs and disks,
quarantine, vanished VMs, clones left running). Run by the leader's background loops and
at start-up; never on a request's path.

``Upkeep`` is a part of ``LeaseService`` (``leases.py``), which it extends: it uses the
service's stores, inventory and release path.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..model import DestroyFailed, Lease
from ..store.tables import ACTIVE_STATES
from ..xen.inventory import HostState, HostView, VmView
from ..xen.marker import Ownership, lease_of, lease_of_clone_name, marker, ownership, quarantined_at
from .requests import CREATING, FAILED, QUEUED, RequestRecord

if TYPE_CHECKING:
    from ..config import HostSettings, Settings

log = logging.getLogger(__name__)

VANISH_GRACE = 30.0  # seconds a new lease's VM may take to show in the mirror
ADOPT_WAIT = 5.0  # seconds reconcile waits on a clone still running before it moves on
RECOVER_CLONE_WAIT = 30.0  # seconds start-up waits, in all, for clones a dead process left running
FINISHED_REQUESTS_KEPT = 7 * 24 * 3600.0  # seconds a finished request's status stays readable


@dataclass
class ReconcileReport:
    orphans_destroyed: list[str] = field(default_factory=list)  # VM names
    vanished: list[str] = field(default_factory=list)  # lease names closed
    failed_creates: list[str] = field(default_factory=list)  # creates of a dead process
    quarantined: list[str] = field(default_factory=list)  # VMs (and disks) this database does not know
    disks_destroyed: list[str] = field(default_factory=list)  # uuids of disks no VM or lease held
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QuarantinedVm:
    name: str
    uuid: str
    host_ref: str
    lease_id: str
    quarantined_at: float
    destroy_at: float


class Upkeep:
    """Expiry, recovery and reconcile, as methods of ``LeaseService``."""

    def expire_due(self) -> list[str]:
        """Destroy every lease past its expiry (the reaper calls this every few seconds).
        Only handed-over leases expire: a request still being made keeps all its VMs."""
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
