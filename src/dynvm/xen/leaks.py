"""Leak collection on one Xen pool: the VMs and disks this installation made, found by
their marker (``marker.py``), each acted on as the engine's ``LeakJudge`` says.

- a VM or disk whose lease ended (or that its lease left behind) is destroyed;
- one whose lease this database does not know is quarantined: a VM is halted and tagged,
  a disk tagged; both are destroyed once the quarantine is over;
- a clone named ``dynvm-clone-<lease>-of-<installation>`` that dynvm died before marking
  is marked when the name is this installation's (or, for a clone named before the
  installation was in the name, when this database knows the lease), then judged as any
  other: a lease this database forgot (restored from an older backup) is quarantined;
- a VM marked before installation ids existed is claimed when its lease is active here,
  and left alone when this database does not know its lease.

Nothing without the marker, and nothing of another installation, is ever touched. Called
by reconcile (``engine/upkeep.py``) through ``XenProvider.collect_leaks``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..model import DestroyFailed
from ..provider import LeakJudge, QuarantinedVm, QuarantineStep, ReconcileReport, Verdict
from .inventory import DiskView, HostView, VmView
from .marker import (
    Ownership,
    holder_of,
    installation_of_clone_name,
    lease_of,
    lease_of_clone_name,
    marker,
    ownership,
    quarantined_at,
)
from .provision import Provisioner
from .settings import XenHostSettings

log = logging.getLogger(__name__)


class LeakCollector:
    """One pass over one pool's mirror (``view``), acting through ``provisioner``."""

    def __init__(
        self,
        host: XenHostSettings,
        view: HostView,
        provisioner: Provisioner,
        installation: str,
        judge: LeakJudge,
        report: ReconcileReport,
        keep_seconds: float,
    ) -> None:
        self.host = host
        self.view = view
        self.provisioner = provisioner
        self.installation = installation
        self.judge = judge
        self.report = report
        self.keep_seconds = keep_seconds

    def run(self) -> None:
        for vm in self.view.vms:
            self.report.guarded(f"{vm.name} on {self.host.display}", self._vm, vm)
        for disk in self.view.disks:
            self.report.guarded(f"disk {disk.uuid} on {self.host.display}", self._disk, disk)

    def _vm(self, vm: VmView) -> None:
        owner = ownership(vm.other_config, self.installation)
        if owner is Ownership.NOT_DYNVM:
            made_for = lease_of_clone_name(vm.name)
            if made_for is None:
                return  # never ours to touch
            made_by = installation_of_clone_name(vm.name)
            if made_by is not None and made_by != self.installation:
                return  # another installation's clone
            if made_by is None and self.judge.verdict(made_for) is Verdict.UNKNOWN:
                return  # named before installations were: ours only if this database knows its lease
            self.provisioner.claim(vm.ref, made_for)
            log.warning(
                "reconcile: %s on %s is a clone of lease %s that was never marked", vm.name, self.host.display, made_for
            )
            vm = dataclasses.replace(vm, other_config={**vm.other_config, **marker(made_for, self.installation)})
            owner = Ownership.OURS
        if owner is Ownership.OTHER_INSTALLATION:
            return  # never ours to touch
        lease_id = lease_of(vm.other_config) or ""
        verdict = self.judge.verdict(lease_id, self.host.ref, vm.uuid, holder_of(vm.other_config))
        if verdict is Verdict.KEEP:
            if owner is Ownership.UNNAMED:  # made before installation ids: write ours on it
                self.provisioner.claim(vm.ref, lease_id)
            return
        if verdict is Verdict.UNKNOWN:
            if owner is not Ownership.UNNAMED:  # an unnamed one not this database's: leave it
                self._quarantine_or_destroy(vm)
            return
        self.provisioner.destroy(vm.ref, lease_id)
        self.report.orphans_destroyed.append(vm.name)
        log.warning("reconcile: destroyed %s on %s (dynvm's, but no lease holds it)", vm.name, self.host.display)

    def _quarantine_or_destroy(self, vm: VmView) -> None:
        step = self.judge.quarantine_step(quarantined_at(vm.other_config))
        if step is QuarantineStep.WAIT:
            return
        if step is QuarantineStep.QUARANTINE:
            now = self.judge.now()
            if self.provisioner.quarantine(vm.ref, now):
                self.report.quarantined.append(vm.name)
                held = holder_of(vm.other_config)
                why = (
                    f"the host says request {held} holds it and this database does not agree"
                    if held is not None
                    else f"its lease {lease_of(vm.other_config)} is unknown to this database"
                )
                log.warning(
                    "reconcile: %s on %s is this installation's, but %s (restored from an older backup?): "
                    "halted and kept until %s, then destroyed",
                    vm.name,
                    self.host.display,
                    why,
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now + self.keep_seconds)),
                )
            return
        self.provisioner.destroy(vm.ref, lease_of(vm.other_config), holder_of(vm.other_config))
        self.report.orphans_destroyed.append(vm.name)
        log.warning("reconcile: destroyed %s on %s (its quarantine is over)", vm.name, self.host.display)

    def _disk(self, disk: DiskView) -> None:
        """A marked disk that no VM uses: destroyed when its lease has ended, quarantined
        when this database does not know it (the lease's VM is gone, so the disk is
        tagged rather than halted)."""
        owner = ownership(disk.other_config, self.installation)
        if disk.attached or owner in (Ownership.NOT_DYNVM, Ownership.OTHER_INSTALLATION):
            return
        lease_id = lease_of(disk.other_config) or ""
        verdict = self.judge.verdict(lease_id)
        if verdict is Verdict.KEEP:
            return  # being made, or detached by its user: theirs
        if verdict is Verdict.UNKNOWN and owner is Ownership.UNNAMED:
            return
        if verdict is Verdict.UNKNOWN:
            step = self.judge.quarantine_step(quarantined_at(disk.other_config))
            if step is QuarantineStep.QUARANTINE:
                self.provisioner.quarantine_disk(disk.ref, self.judge.now())
                self.report.quarantined.append(disk.uuid)
            if step is not QuarantineStep.DESTROY:
                return
        problem = self.provisioner.destroy_disk(disk.ref, lease_id)
        if problem:
            raise DestroyFailed(problem, self.host.ref)
        self.report.disks_destroyed.append(disk.uuid)
        log.warning(
            "reconcile: destroyed disk %s (%s) on %s: no VM or lease held it", disk.uuid, disk.name, self.host.display
        )


def quarantined(view: HostView, installation: str, keep_seconds: float) -> list[QuarantinedVm]:
    """This installation's VMs on this pool that reconcile holds halted in quarantine."""
    out = []
    for vm in view.vms:
        since = quarantined_at(vm.other_config)
        if since is not None and ownership(vm.other_config, installation) is Ownership.OURS:
            out.append(
                QuarantinedVm(
                    vm.name,
                    vm.uuid,
                    view.ref,
                    lease_of(vm.other_config) or "",
                    since,
                    since + keep_seconds,
                    holder_of(vm.other_config) or "",
                )
            )
    return out
