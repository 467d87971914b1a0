"""What a libvirt host has left, and what one VM of an OS takes there, from the inventory
mirror (no call to the host):

- CPU: the host's CPUs x ``cpu.overcommit`` minus the vCPUs of every running domain,
  dynvm's and others';
- memory: the host's memory, less ``host.reserve.mib`` for the host itself, less every
  running domain at its full memory plus QEMU's own overhead (``provision.overhead_mib``),
  and never more than the memory the host reports free now (other work on the host counts);
- disk: the storage pool's free bytes; a clone counts at its full virtual size (it may grow
  to it).

Each less what in-flight creates have reserved until their domain shows in the mirror.
A down host has no room."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..provider import HostRoom, MemberRoom, Need
from .inventory import HostState, HostView
from .provision import overhead_mib
from .settings import LibvirtHostSettings

MIB = 1024 * 1024


def need_on(host: LibvirtHostSettings, view: HostView, os: str, cpus: int | None, memory: int | None) -> Need | None:
    image = host.images.get(os)
    if image is None or view.state is not HostState.UP:
        return None
    base = view.volume(image.volume)
    if base is None:
        return None
    static_max = memory or image.memory_mib * MIB
    return Need(cpus or image.cpus, static_max + overhead_mib(host) * MIB, base.capacity, image.volume, static_max)


def room_on(
    host: LibvirtHostSettings,
    view: HostView,
    overcommit: float,
    reserved: Iterable[Mapping[str, object]],
    empty: bool = False,
) -> HostRoom:
    if view.state is not HostState.UP or view.pool_available is None:
        return HostRoom(host.ref, 0, [])
    running = [d for d in view.domains if d.active and not (empty and d.mark is not None)]
    cpus = view.cpus * overcommit - sum(d.vcpus for d in running)
    counted = view.memory_total - host.reserve_mib * MIB
    counted -= sum(d.memory + overhead_mib(host) * MIB for d in running)
    disk = view.pool_available
    present = {d.mark.lease for d in view.domains if d.active and d.mark is not None}  # counted above
    pending_memory = 0
    for reservation in reserved:
        if reservation["lease_id"] in present:
            continue
        cpus -= int(reservation["cpus"])  # type: ignore[call-overload]  # a reservation row is dict[str, object]; these columns are integers
        pending_memory += int(reservation["memory"])  # type: ignore[call-overload]  # as above
        disk -= int(reservation["disk"])  # type: ignore[call-overload]  # as above
    memory = counted - pending_memory
    if not empty:
        memory = min(memory, view.memory_free - pending_memory)
    return HostRoom(ref=host.ref, disk=disk, members=[MemberRoom("", cpus, memory)])
