"""libvirt as the lease engine's provider: the inventory mirror answers what hosts hold,
a ``Provisioner`` per call makes and destroys VMs, and ``leaks.py`` collects what this
installation left behind. Nothing outside ``libvirt/`` knows libvirt, its XML or the mark."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..config import Settings
from ..hosts import HostSettings
from ..model import CreatedVm, ProvisionError, VmSpec
from ..provider import (
    Cancel,
    DestroyResult,
    HostRoom,
    HostStatus,
    LeakJudge,
    Machine,
    MemberStatus,
    Need,
    Progress,
    QuarantinedVm,
    ReconcileReport,
)
from . import leaks, marker
from .inventory import HostState, HostView, Inventory
from .libvirt_api import libvirt
from .provision import Provisioner
from .room import need_on, room_on
from .settings import LibvirtHostSettings


class LibvirtProvider:
    def __init__(
        self,
        inventory: Inventory,
        settings: Callable[[], Settings],
        installation: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inventory = inventory
        self._settings = settings
        self._installation = installation
        self._monotonic = monotonic
        self._loose_since: dict[str, float] = {}  # leaks.LeakCollector's, from one pass to the next
        self._hold_locks = tuple(threading.Lock() for _ in range(64))  # striped by VM: a hand-out reads, then writes

    # -- life ------------------------------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        self.inventory.apply(settings)

    def wait_synced(self, timeout: float) -> bool:
        return self.inventory.wait_synced(timeout)

    def stop(self) -> None:
        self.inventory.stop()

    # -- hosts and room --------------------------------------------------------------------

    def _up(self, host: HostSettings) -> HostView | None:
        view = self.inventory.view(host.ref)
        return view if view is not None and view.state is HostState.UP else None

    def status(self, host: HostSettings) -> HostStatus | None:
        view = self.inventory.view(host.ref)
        if view is None:
            return None
        running = sum(1 for d in view.domains if d.active)
        up = view.state is HostState.UP
        return HostStatus(
            ref=host.ref,
            up=up,
            state=view.state.value,
            error=view.error,
            name=view.name,
            cpus=view.cpus,
            memory_total=view.memory_total,
            memory_free=view.memory_free,
            running_vms=running,
            same_pool_as=view.same_as,
            pool_id=view.host_uuid,
            members=(
                MemberStatus("", view.name, True, True, up, view.cpus, view.memory_total, view.memory_free, running),
            )
            if up
            else (),
        )

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        view = self.inventory.view(host.ref)
        return None if view is None else need_on(libvirt_host(host), view, os, cpus, memory)

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        view = self._up(host)
        return None if view is None else room_on(libvirt_host(host), view, overcommit, reserved, empty=empty)

    def shortage(self, host: HostSettings, os: str) -> str | None:
        settings = libvirt_host(host)
        image = settings.images.get(os)
        if image is None:
            return f"{host.section} has no image for {os}"
        view = self.inventory.view(host.ref)
        if view is None or view.state is not HostState.UP:
            why = view.error if view is not None and view.error else "not answering yet"
            return f"{host.section} is down: {why}"
        return self._problem(settings, view, os)

    def _problem(self, host: LibvirtHostSettings, view: HostView, os: str) -> str | None:
        image = host.images[os]
        if view.pool_available is None:
            return f"{host.section}: storage pool {host.storage_pool!r} is missing or not active (storage.pool)"
        if not view.network_active:
            return f"{host.section}: network {host.network!r} is missing or not active (network)"
        if view.volume(image.volume) is None:
            return f"{host.section}: no volume {image.volume!r} in storage pool {host.storage_pool!r} ({os}.image)"
        return None

    def template_problems(self, host: HostSettings) -> list[str]:
        view = self._up(host)
        if view is None:
            return []
        settings = libvirt_host(host)
        found = (self._problem(settings, view, os) for os in sorted(settings.images))
        return list(dict.fromkeys(p for p in found if p))

    # -- one VM ----------------------------------------------------------------------------

    def _provisioner(self, host: HostSettings) -> Provisioner:
        common = self._settings().common
        return Provisioner(
            libvirt_host(host),
            self.inventory,
            common.network_timeout_secs,
            self._installation(),
            self._hold_locks,
            self._monotonic,
        )

    def create(
        self,
        host: HostSettings,
        spec: VmSpec,
        progress: Progress,
        cancel: Cancel | threading.Event,
        on_pending: Callable[[str], None],
        attempt: int,
    ) -> CreatedVm:
        """The domain is defined, marked, before anything else: there is no pending job
        whose result could be unmarked, so ``on_pending`` is never called."""
        return self._provisioner(host).create(spec, progress, cancel, attempt)

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        self._provisioner(host).hand_out(machine_ref, spec)

    def pending_job(self, machine_ref: str) -> str | None:
        return None

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return None

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        return self._provisioner(host).destroy(machine_ref, lease_id, holder)

    # -- the installation's claim ------------------------------------------------------------

    def _claim_connection(self, host: HostSettings) -> Any:
        """The connection to keep the claim through: None while the host is down, or
        counted under an earlier section (that one keeps it)."""
        return self.inventory.connection(host.ref) if self._up(host) is not None else None

    def read_claim(self, host: HostSettings) -> str | None:
        """The installation's claim as the host keeps it: a libvirt secret (a value the host
        stores, readable by any client of it) named by the installation id
        (``marker.claim_secret``); None when there is none or the host is down."""
        connection = self._claim_connection(host)
        if connection is None:
            return None
        try:
            value: bytes = connection.secretLookupByUUIDString(marker.claim_secret(self._installation())).value()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return None
            raise
        return value.decode()

    def write_claim(self, host: HostSettings, claim: str) -> None:
        connection = self._claim_connection(host)
        if connection is None:
            return
        uuid = marker.claim_secret(self._installation())
        try:
            secret = connection.secretLookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                raise
            secret = connection.secretDefineXML(marker.claim_secret_xml(uuid, self._installation()), 0)
        secret.setValue(claim.encode(), 0)

    # -- what this installation owns -------------------------------------------------------

    def machines(self, host: HostSettings) -> list[Machine]:
        view = self._up(host)
        if view is None:
            return []
        return [
            Machine(
                host_ref=host.ref,
                ref=d.uuid,
                uuid=d.uuid,
                name=d.label,
                description=d.description,
                power_state=d.state,
                running=d.active,
                vcpus=str(d.vcpus),
                memory=str(d.memory),
                addresses=d.addresses,
                networkinfo=";".join(f"{n}/ip: {a}" for n, a in enumerate(d.addresses)),
                member=view.name,
                lease_id=d.mark.lease if d.mark is not None else None,
                ours=d.mark is not None,
            )
            for d in view.domains
        ]

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        view = self._up(host)
        domain = view.domain(machine.uuid) if view is not None else None
        return domain is not None and domain.mark is not None and domain.mark.os == os

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        """On a fresh read of the host (volumes change without an event)."""
        self.inventory.refresh(host.ref)
        view = self._up(host)
        if view is None:
            return
        leaks.LeakCollector(
            libvirt_host(host), view, self._provisioner(host), self._installation(), judge, report, self._loose_since
        ).run()

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        view = self.inventory.view(host.ref)
        return [] if view is None else leaks.quarantined(view, self._installation(), keep_seconds)


def libvirt_host(host: HostSettings) -> LibvirtHostSettings:
    if not isinstance(host, LibvirtHostSettings):
        raise ProvisionError(f"{host.display} is not a libvirt host", host.ref)
    return host
