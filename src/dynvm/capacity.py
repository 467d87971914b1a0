"""How many more VMs of an OS fit, host by host, and where a request's VMs go (SPEC.md §3).

A configured host is a pool: one host, or a master and its members. Per member, from the
inventory mirror (no xapi call):

- CPU: ``cpu_count x cpu.overcommit`` minus the vCPUs of the VMs running on it (dom0 aside),
- memory: ``memory_total`` minus its dom0 minus the memory (``memory_static_max`` plus
  xapi's overhead) of the VMs running on it,

and per pool the free space on the SR named ``host.storage.name`` (one SR, shared by the
members of a pool, counted once). Each is less what in-flight creates have reserved until
their VM runs (from then on the host's own figures count it); a reservation holds CPU and
memory on the member it was placed on. A member fits ``min(cpu // need, memory // need)``
VMs; a pool fits the sum over its members, capped by its disk. A down pool counts 0, as
does a member that is disabled or that its master lost; a pool without the OS's template
is skipped. Placement takes one VM at a time to the pool with the most room left for it,
and there to the member with the most, so a request spreads; ``xhostref`` pins it to one
pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .config import HostSettings
from .model import NotEnoughCapacity
from .xen import templates
from .xen.inventory import HostState, HostView, MemberView, TemplateView
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
class MemberRoom:
    ref: str  # the member's host ref ("" when the pool's members are not known)
    cpus: float
    memory: int

    def fits(self, need: Need) -> int:
        if need.cpus <= 0 or need.memory <= 0:
            return 0
        return max(0, int(min(self.cpus // need.cpus, self.memory // need.memory)))


@dataclass
class HostRoom:
    """What is left in one configured host (a pool): per member, and the pool's disk."""

    ref: str
    disk: int
    members: list[MemberRoom] = field(default_factory=list)

    @property
    def cpus(self) -> float:
        return sum(m.cpus for m in self.members)

    @property
    def memory(self) -> int:
        return sum(m.memory for m in self.members)

    def fits(self, need: Need) -> int:
        by_disk = self.disk // need.disk if need.disk > 0 else 1 << 30
        return max(0, min(sum(m.fits(need) for m in self.members), by_disk))

    def take(self, need: Need) -> str:
        """Take one VM's room on the member with most room for it; its ref."""
        best = max(self.members, key=lambda m: (m.fits(need), m.memory))
        best.cpus -= need.cpus
        best.memory -= need.memory
        self.disk -= need.disk
        return best.ref


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
    """What is left in a pool. ``reserved``: its reservations (lease_id, member, cpus,
    memory, disk); those whose VM already runs are counted by the host and skipped. A
    reservation with no member known (made before members were recorded) is held on the
    master."""
    if view.state is not HostState.UP:
        return HostRoom(host.ref, 0, [])
    running = view.running_vms
    materialised = {vm.other_config.get(MARKER_KEY) for vm in running}
    # a view without host records (built by hand) is one host with the view's own figures
    known = view.members or (
        MemberView("", view.name, view.cpus, view.memory_total, view.memory_free, view.dom0_memory, master=True),
    )
    members = {
        m.ref: MemberRoom(m.ref, m.cpus * overcommit, m.memory_total - m.dom0_memory)
        if m.enabled and m.live
        else MemberRoom(m.ref, 0, 0)
        for m in known
    }
    room = HostRoom(ref=host.ref, disk=view.storage_free(host.storage_name) or 0, members=list(members.values()))
    master = room.members[0]
    for vm in running:
        member = members.get(vm.resident_on, master)
        member.cpus -= int(vm.vcpus)
        member.memory -= int(vm.memory) + vm.memory_overhead
    for reservation in reserved:
        if reservation["lease_id"] in materialised:
            continue
        member = members.get(str(reservation.get("member") or ""), master)
        member.cpus -= int(reservation["cpus"])  # type: ignore[call-overload]
        member.memory -= int(reservation["memory"])  # type: ignore[call-overload]
        room.disk -= int(reservation["disk"])  # type: ignore[call-overload]
    return room


@dataclass(frozen=True)
class Candidate:
    host: HostSettings
    room: HostRoom
    need: Need


@dataclass(frozen=True)
class Placement:
    """Where one VM goes: a pool (``candidate``) and the member in it."""

    candidate: Candidate
    member: str

    @property
    def host(self) -> HostSettings:
        return self.candidate.host

    @property
    def need(self) -> Need:
        return self.candidate.need


def available(candidates: Iterable[Candidate]) -> int:
    return sum(c.room.fits(c.need) for c in candidates)


def place(count: int, os: str, candidates: list[Candidate]) -> list[Placement]:
    """A pool and a member per VM, most room first; ``NotEnoughCapacity`` when they do not fit."""
    room_left = available(candidates)
    if count > room_left:
        raise NotEnoughCapacity(
            f"not enough capacity for {count} {os} VM(s): {room_left} can be made now"
            + ("" if room_left else FULL_HINT)
        )
    chosen = []
    for _ in range(count):
        best = max(candidates, key=lambda c: (c.room.fits(c.need), -int(c.host.ref)))
        chosen.append(Placement(best, best.room.take(best.need)))
    return chosen
