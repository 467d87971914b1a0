"""How many more VMs of an OS fit, host by host, and where a request's VMs go (SPEC.md §3).

Per host, from the inventory mirror (no xapi call):

- CPU: ``cpu_count x cpu.overcommit`` minus the vCPUs of its running VMs (dom0 aside),
- memory: ``memory_total`` minus dom0 minus the memory of its running VMs,
- disk: free space on the SR named ``host.storage.name``,

each less what in-flight creates have reserved, until their VM runs (from then on the
host's own figures count it). The count for an OS is the smallest of the three divided by
what one VM of that OS needs. A down host counts 0; a host without the OS's template is
skipped. Placement takes one VM at a time to the host with the most room left for it, so a
request spreads over hosts; ``xhostref`` pins it to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .config import HostSettings
from .model import NotEnoughCapacity
from .xen import templates
from .xen.inventory import HostState, HostView, TemplateView
from .xen.marker import MARKER_KEY
from .xen.memory import memory_overhead

FULL_HINT = "; release some VMs or try again later"


@dataclass(frozen=True)
class Need:
    """What one VM takes on a host: from its template unless the request says otherwise."""

    cpus: int
    memory: int  # what the host must have free: memory_static_max + overhead
    disk: int
    template: str
    static_max: int = 0  # memory_static_max alone (what the lease records)


@dataclass
class HostRoom:
    ref: str
    cpus: float
    memory: int
    disk: int

    def fits(self, need: Need) -> int:
        if need.cpus <= 0 or need.memory <= 0:
            return 0
        by_disk = self.disk // need.disk if need.disk > 0 else 1 << 30
        return max(0, int(min(self.cpus // need.cpus, self.memory // need.memory, by_disk)))

    def take(self, need: Need) -> None:
        self.cpus -= need.cpus
        self.memory -= need.memory
        self.disk -= need.disk


def template_choice(view: HostView, name: str) -> templates.Choice:
    """What ``<os>.template=name`` picks on this host (``xen/templates.py``: the same rule
    create follows); the mirror already leaves snapshots out."""
    return templates.choose((templates.Candidate(t.ref, t.name, builtin=t.builtin) for t in view.templates), name)


def find_template(view: HostView, name: str) -> TemplateView | None:
    """The one template ``name`` picks, or None (missing or ambiguous)."""
    choice = template_choice(view, name)
    return next((t for t in view.templates if choice.template and t.ref == choice.template.ref), None)


def need_on(host: HostSettings, view: HostView, os: str, cpus: int | None, memory: int | None) -> Need | None:
    """What one VM of ``os`` takes on this host. Its memory counts what xapi admits it on:
    ``memory_static_max`` plus the overhead (the template's own, or recomputed for asked
    vCPUs or memory as xapi would)."""
    name = host.templates.get(os)
    if name is None or view.state is not HostState.UP:
        return None
    template = find_template(view, name)
    if template is None:
        return None
    vcpus = cpus or template.vcpus
    static_max = memory or template.memory
    if cpus is None and memory is None and template.memory_overhead:
        overhead = template.memory_overhead
    else:
        overhead = memory_overhead(static_max, vcpus, template.shadow_multiplier)  # provision sets VCPUs_max so
    return Need(vcpus, static_max + overhead, template.disk, template.name, static_max)


def room_on(
    host: HostSettings, view: HostView, overcommit: float, reserved: Iterable[Mapping[str, object]]
) -> HostRoom:
    """What is left on a host. ``reserved``: this host's reservations (lease_id, cpus,
    memory, disk); those whose VM already runs are counted by the host and skipped."""
    if view.state is not HostState.UP:
        return HostRoom(host.ref, 0, 0, 0)
    running = view.running_vms
    materialised = {vm.other_config.get(MARKER_KEY) for vm in running}
    room = HostRoom(
        ref=host.ref,
        cpus=view.cpus * overcommit - sum(int(vm.vcpus) for vm in running),
        memory=view.memory_total - view.dom0_memory - sum(int(vm.memory) + vm.memory_overhead for vm in running),
        disk=view.storage_free(host.storage_name) or 0,
    )
    for reservation in reserved:
        if reservation["lease_id"] not in materialised:
            room.cpus -= int(reservation["cpus"])  # type: ignore[call-overload]
            room.memory -= int(reservation["memory"])  # type: ignore[call-overload]
            room.disk -= int(reservation["disk"])  # type: ignore[call-overload]
    return room


@dataclass(frozen=True)
class Candidate:
    host: HostSettings
    room: HostRoom
    need: Need


def available(candidates: Iterable[Candidate]) -> int:
    return sum(c.room.fits(c.need) for c in candidates)


def place(count: int, os: str, candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per VM, most room first; ``NotEnoughCapacity`` when they do not fit."""
    room_left = available(candidates)
    if count > room_left:
        raise NotEnoughCapacity(
            f"not enough capacity for {count} {os} VM(s): {room_left} can be made now"
            + ("" if room_left else FULL_HINT)
        )
    chosen = []
    for _ in range(count):
        best = max(candidates, key=lambda c: (c.room.fits(c.need), -int(c.host.ref)))
        best.room.take(best.need)
        chosen.append(best)
    return chosen
