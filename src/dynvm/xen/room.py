"""What a Xen pool has left, and what one VM of an OS takes there, from the inventory
mirror (no xapi call). Per member:

- CPU: ``cpu_count x cpu.overcommit`` minus the vCPUs of the VMs running on it (dom0 aside),
- memory: as xapi's admission counts it (memory_check.ml, ``compute_free_memory``):
  ``memory_total`` minus Xen's own ``host.memory_overhead``, minus every domain resident
  on it, dom0 included, at ``memory_static_max`` plus its ``memory_overhead`` (xapi counts
  a ballooning guest at its dynamic minimum: dynvm keeps to the static maximum, never
  over),

and the free space on the SR named ``host.storage.name``: one SR shared by the members of
a pool, counted once; or, where each member has its own SR of that name (local storage),
each member's own. Each is less what in-flight creates have reserved until
their VM runs (from then on the host's own figures count it); a reservation holds CPU and
memory on the member it was placed on. A down pool has no room; a member that is disabled
or that its master lost has none either; a pool without the OS's template needs nothing
(it is skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from ..provider import HostRoom, MemberRoom, Need
from . import templates
from .inventory import HostState, HostView, MemberView, TemplateView
from .marker import MARKER_KEY
from .memory import memory_overhead
from .settings import XenHostSettings


def template_choice(view: HostView, name: str) -> templates.Choice:
    """What ``<os>.template=name`` picks on this host (``xen/templates.py``: the same rule
    create follows); the mirror already leaves snapshots out."""
    return templates.choose((templates.Candidate(t.ref, t.name, builtin=t.builtin) for t in view.templates), name)


def find_template(view: HostView, name: str) -> TemplateView | None:
    """The one template ``name`` picks, or None (missing or ambiguous)."""
    choice = template_choice(view, name)
    return next((t for t in view.templates if choice.template and t.ref == choice.template.ref), None)


def need_on(host: XenHostSettings, view: HostView, os: str, cpus: int | None, memory: int | None) -> Need | None:
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
    host: XenHostSettings,
    view: HostView,
    overcommit: float,
    reserved: Iterable[Mapping[str, object]],
    empty: bool = False,
) -> HostRoom:
    """What is left in a pool. ``reserved``: its reservations (lease_id, member, cpus,
    memory, disk); those whose VM already runs are counted by the host and skipped. A
    reservation with no member known (made before members were recorded) is held on the
    master. ``empty``: as if no VM with dynvm's marker were on it."""
    if view.state is not HostState.UP:
        return HostRoom(host.ref, 0, [])
    if empty:
        view = dataclasses.replace(view, vms=tuple(v for v in view.vms if MARKER_KEY not in v.other_config))
    running = view.running_vms
    materialised = {vm.other_config.get(MARKER_KEY) for vm in running}
    # a view without host records (built by hand) is one host with the view's own figures
    known = view.members or (
        MemberView("", view.name, view.cpus, view.memory_total, view.memory_free, view.dom0_memory, master=True),
    )
    local = view.local_storage.get(host.storage_name, {})

    def own_disk(m: MemberView) -> int | None:
        if not local:
            return None
        size, used = local.get(m.ref, (0, 0))
        return size - used

    members = {
        m.ref: MemberRoom(m.ref, m.cpus * overcommit, m.memory_total - m.memory_overhead - m.dom0_memory, own_disk(m))
        if m.enabled and m.live
        else MemberRoom(m.ref, 0, 0, 0 if local else None)
        for m in known
    }
    shared = view.storage_free(host.storage_name)
    disk = shared if shared is not None else sum(d for m in members.values() if (d := m.disk) is not None)
    room = HostRoom(ref=host.ref, disk=disk or 0, members=list(members.values()))
    master = room.members[0]
    for vm in running:
        member = members.get(vm.resident_on, master)
        member.cpus -= int(vm.vcpus)
        member.memory -= int(vm.memory) + vm.memory_overhead
    for reservation in reserved:
        if reservation["lease_id"] in materialised:
            continue
        member = members.get(str(reservation.get("member") or ""), master)
        member.cpus -= int(reservation["cpus"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
        member.memory -= int(reservation["memory"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
        room.disk -= int(reservation["disk"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
        if member.disk is not None:
            member.disk -= int(reservation["disk"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
    return room
