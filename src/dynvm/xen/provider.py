"""Xen (XenServer, XCP-ng) as the lease engine's provider (``provider.py``): the inventory
mirror answers what hosts hold, a ``Provisioner`` per call makes and destroys VMs, and
``leaks.py`` collects what this installation left behind. Nothing outside ``xen/`` knows
xapi, the marker or templates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

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
from . import leaks
from .inventory import HostState, HostView, Inventory
from .marker import MARKER_KEY, claim_key
from .provision import Provisioner
from .room import find_template, need_on, room_on, template_choice
from .settings import XenHostSettings

CLONE_TASK = "task/"  # a lease's machine ref while its clone runs: "task/<xapi task ref>"


class XenProvider:
    """The engine's view of the configured Xen pools. ``installation`` is called when a
    VM is made or judged (it reads the database once)."""

    def __init__(
        self,
        inventory: Inventory,
        settings: Callable[[], Settings],
        installation: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``monotonic``: what creates are timed and their deadlines kept on (compressed by
        ``dynvm replay --live``, ``clock.py``)."""
        self.inventory = inventory
        self._settings = settings
        self._installation = installation
        self._monotonic = monotonic
        # host ref -> (the view they were read from, its machines): a view is a snapshot that
        # stays the same object until its host changes, so listing is free between changes
        self._listed: dict[str, tuple[HostView, list[Machine]]] = {}

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
        running = view.running_vms
        return HostStatus(
            ref=host.ref,
            up=view.state is HostState.UP,
            state=view.state.value,
            error=view.error,
            name=view.name,
            cpus=view.cpus,
            memory_total=view.memory_total,
            memory_free=view.memory_free,
            running_vms=len(running),
            same_pool_as=view.same_pool_as,
            pool_id=view.pool_uuid,
            members=tuple(
                MemberStatus(
                    ref=m.ref,
                    name=m.name,
                    master=m.master,
                    enabled=m.enabled,
                    live=m.live,
                    cpus=m.cpus,
                    memory_total=m.memory_total,
                    memory_free=m.memory_free,
                    running_vms=sum(1 for vm in running if vm.resident_on == m.ref),
                )
                for m in view.members
            ),
        )

    def need(self, host: HostSettings, os: str, cpus: int | None, memory: int | None) -> Need | None:
        view = self.inventory.view(host.ref)
        return None if view is None else need_on(xen(host), view, os, cpus, memory)

    def room(
        self, host: HostSettings, overcommit: float, reserved: Iterable[Mapping[str, object]], empty: bool = False
    ) -> HostRoom | None:
        view = self._up(host)
        return None if view is None else room_on(xen(host), view, overcommit, reserved, empty=empty)

    def shortage(self, host: HostSettings, os: str) -> str | None:
        name = host.templates.get(os)
        view = self.inventory.view(host.ref)
        if name is None:
            return f"{host.section} has no template for {os}"
        if view is not None and view.state is HostState.SAME_POOL:
            return f"{host.section} is {view.error}"
        if view is None or view.state is not HostState.UP:
            why = view.error if view is not None and view.error else "not answering yet"
            return f"{host.section} is down: {why}"
        choice = template_choice(view, name)
        if choice.template is None:
            return f"{host.section}: {choice.problem} ({os}.template)"
        return None

    def template_problems(self, host: HostSettings) -> list[str]:
        view = self._up(host)
        if view is None:
            return []
        problems = []
        for os, name in sorted(host.templates.items()):
            choice = template_choice(view, name)
            if choice.template is None:
                problems.append(f"[{host.section}] {os}.template: {choice.problem} on {host.display}")
        return problems

    # -- one VM ----------------------------------------------------------------------------

    def _provisioner(self, host: HostSettings) -> Provisioner:
        pool = self.inventory.pool(host.ref)
        if pool is None:
            raise ProvisionError(f"host {host.ref} is not in the inventory")
        common = self._settings().common
        return Provisioner(
            xen(host),
            pool,
            common.network_timeout_secs,
            self._installation(),
            clock=self._monotonic,
            cpu_overcommit=common.cpu_overcommit,
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
        return self._provisioner(host).create(
            spec,
            progress,
            cancel=cancel,  # type: ignore[arg-type]  # any object with is_set() cancels; the provisioner's signature says Event
            on_clone_task=lambda task: on_pending(f"{CLONE_TASK}{task}"),
            attempt=attempt,
        )

    def hand_out(self, host: HostSettings, machine_ref: str, spec: VmSpec) -> None:
        self._provisioner(host).hand_out(machine_ref, spec, spec.template)

    def pending_job(self, machine_ref: str) -> str | None:
        return machine_ref.removeprefix(CLONE_TASK) if machine_ref.startswith(CLONE_TASK) else None

    def adopt(self, host: HostSettings, job: str, lease_id: str, wait: float) -> str | None:
        return self._provisioner(host).adopt_clone(job, lease_id, wait=wait)

    def destroy(
        self, host: HostSettings, machine_ref: str, lease_id: str | None, holder: str | None = None
    ) -> DestroyResult:
        return self._provisioner(host).destroy(machine_ref, lease_id, holder)

    # -- the installation's claim ------------------------------------------------------------

    def read_claim(self, host: HostSettings) -> str | None:
        view = self._up(host)
        if view is None or view.same_pool_as:
            return None
        with self._provisioner(host).pool.session() as xapi:
            [pool] = xapi.pool.get_all()
            claim: str | None = xapi.pool.get_other_config(pool).get(claim_key(self._installation()))
            return claim

    def write_claim(self, host: HostSettings, claim: str) -> None:
        view = self._up(host)
        if view is None or view.same_pool_as:
            return
        key = claim_key(self._installation())
        with self._provisioner(host).pool.session() as xapi:
            [pool] = xapi.pool.get_all()
            xapi.pool.remove_from_other_config(pool, key)  # xapi: a key that is not there is fine
            xapi.pool.add_to_other_config(pool, key, claim)

    # -- what this installation owns -------------------------------------------------------

    def machines(self, host: HostSettings) -> list[Machine]:
        view = self._up(host)
        if view is None:
            return []
        listed = self._listed.get(host.ref)
        if listed is not None and listed[0] is view:
            return list(listed[1])
        machines = self._machines_of(host, view)
        self._listed[host.ref] = (view, machines)
        return list(machines)

    def _machines_of(self, host: HostSettings, view: HostView) -> list[Machine]:
        """A VM on a member the master lost is not counted as running: xapi still says
        Running, but nobody can reach it or know what it does until the member is back."""
        names = {m.ref: m.name for m in view.members}
        lost = {m.ref for m in view.members if not m.live}
        return [
            Machine(
                host_ref=host.ref,
                ref=vm.ref,
                uuid=vm.uuid,
                name=vm.name,
                description=vm.description,
                power_state=vm.power_state,
                running=vm.running and vm.resident_on not in lost,
                vcpus=vm.vcpus,
                memory=vm.memory,
                addresses=tuple(vm.addresses),
                networkinfo=vm.networkinfo,
                member=names.get(vm.resident_on, ""),
                lease_id=vm.other_config.get(MARKER_KEY),
                ours=MARKER_KEY in vm.other_config,
            )
            for vm in view.vms
        ]

    def made_for(self, host: HostSettings, machine: Machine, os: str) -> bool:
        """Made from the OS's template: create writes "... from <template> on ..." into
        the description (SPEC.md §3), which outlives the lease."""
        view = self._up(host)
        name = host.templates.get(os)
        if view is None or name is None:
            return False
        template = find_template(view, name)
        return template is not None and f" from {template.name} on " in machine.description

    def collect_leaks(self, host: HostSettings, judge: LeakJudge, report: ReconcileReport) -> None:
        view = self._up(host)
        if view is None:
            return
        keep = self._settings().common.quarantine_hours * 3600
        leaks.LeakCollector(xen(host), view, self._provisioner(host), self._installation(), judge, report, keep).run()

    def quarantined(self, host: HostSettings, keep_seconds: float) -> list[QuarantinedVm]:
        view = self.inventory.view(host.ref)
        return [] if view is None else leaks.quarantined(view, self._installation(), keep_seconds)


def xen(host: HostSettings) -> XenHostSettings:
    """A configured host, as the Xen one it is (the engine gives this provider only its own)."""
    if not isinstance(host, XenHostSettings):
        raise ProvisionError(f"{host.display} is not a Xen host", host.ref)
    return host
