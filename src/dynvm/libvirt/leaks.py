"""Leak collection on one libvirt host: the domains and clone volumes this installation
made, found by their mark (domains) and their name (volumes), each acted on as the
engine's ``LeakJudge`` says:

- a domain whose lease ended (or that its lease left behind) is destroyed, volume and all;
- one whose lease this database does not know is quarantined: stopped, stamped, and
  destroyed once the quarantine is over (``[common] orphan.quarantine.hours``);
- a clone volume that no domain uses (its delete failed, or dynvm died between deleting
  its domain and its volume) is deleted once its lease is over; one whose lease this
  database does not know waits out the quarantine first. A volume cannot carry a stamp:
  its quarantine is counted from the first pass of this process that saw it, so a restart
  only makes it wait longer.

Nothing without the mark, and nothing of another installation, is ever touched. Called by
reconcile (``engine/upkeep.py``) through ``LibvirtProvider.collect_leaks``."""

from __future__ import annotations

import logging

from ..provider import LeakJudge, QuarantinedVm, QuarantineStep, ReconcileReport, Verdict
from . import marker
from .inventory import DomainView, HostView, VolumeView
from .provision import Provisioner
from .settings import LibvirtHostSettings

log = logging.getLogger(__name__)


class LeakCollector:
    def __init__(
        self,
        host: LibvirtHostSettings,
        view: HostView,
        provisioner: Provisioner,
        installation: str,
        judge: LeakJudge,
        report: ReconcileReport,
        loose_since: dict[str, float],
    ) -> None:
        """``loose_since``: loose volume name -> when its quarantine began; kept by the
        provider from one pass to the next (in memory: a volume carries no stamp)."""
        self.loose_since = loose_since
        self.host = host
        self.view = view
        self.provisioner = provisioner
        self.installation = installation
        self.judge = judge
        self.report = report

    def run(self) -> None:
        for domain in self.view.domains:
            self.report.guarded(f"{domain.label} on {self.host.display}", self._domain, domain)
        used = {marker.volume_name(self.installation, d.mark.lease) for d in self.view.domains if d.mark is not None}
        for volume in self.view.volumes:
            if volume.name not in used:
                self.report.guarded(f"volume {volume.name} on {self.host.display}", self._volume, volume)

    def _domain(self, domain: DomainView) -> None:
        if marker.ownership(domain.mark, self.installation) is not marker.Ownership.OURS or domain.mark is None:
            return  # never ours to touch
        mark = domain.mark
        verdict = self.judge.verdict(mark.lease, self.host.ref, domain.uuid, mark.holder)
        if verdict is Verdict.KEEP:
            return
        if verdict is Verdict.UNKNOWN:
            step = self.judge.quarantine_step(mark.quarantined_at)
            if step is QuarantineStep.WAIT:
                return
            if step is QuarantineStep.QUARANTINE:
                if self.provisioner.quarantine(domain.uuid, self.judge.now()):
                    self.report.quarantined.append(domain.label)
                    log.warning(
                        "reconcile: %s on %s is this installation's, but its lease %s is unknown to this "
                        "database (restored from an older backup?): stopped and kept until its quarantine ends",
                        domain.label,
                        self.host.display,
                        mark.lease,
                    )
                return
        self.provisioner.destroy(domain.uuid, mark.lease, mark.holder)
        self.report.orphans_destroyed.append(domain.label)
        log.warning("reconcile: destroyed %s on %s (dynvm's, but no lease holds it)", domain.label, self.host.display)

    def _volume(self, volume: VolumeView) -> None:
        lease_id = marker.lease_of_volume(volume.name, self.installation)
        if lease_id is None:
            return  # not this installation's
        verdict = self.judge.verdict(lease_id)
        if verdict is Verdict.KEEP:
            return  # its create is under way (the domain is defined first, so this is brief)
        if verdict is Verdict.UNKNOWN:
            step = self.judge.quarantine_step(self.loose_since.get(volume.name))
            if step is QuarantineStep.QUARANTINE:
                self.loose_since[volume.name] = self.judge.now()
                self.report.quarantined.append(volume.name)
            if step is not QuarantineStep.DESTROY:
                return
        self.provisioner.delete_volume(volume.name)  # DestroyFailed: counted by the pass, tried again next time
        self.loose_since.pop(volume.name, None)
        self.report.disks_destroyed.append(volume.name)
        log.warning("reconcile: deleted volume %s on %s: no VM or lease held it", volume.name, self.host.display)


def quarantined(view: HostView, installation: str, keep_seconds: float) -> list[QuarantinedVm]:
    out = []
    for domain in view.domains:
        mark = domain.mark
        if mark is not None and mark.quarantined_at is not None and mark.installation == installation:
            since = mark.quarantined_at
            out.append(
                QuarantinedVm(
                    domain.label, domain.uuid, view.ref, mark.lease, since, since + keep_seconds, mark.holder or ""
                )
            )
    return out
