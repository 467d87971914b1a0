"""A pool's life beyond one VM: maintenance (``host.disable``/``enable``/``evacuate``),
moving a running VM (``VM.pool_migrate``), a new master (``pool.designate_new_master``,
``pool.emergency_transition_to_master``) and a member that the master loses
(``host_metrics.live``).

What each does follows xapi (xen-api ocaml/xapi: xapi_host.ml ``disable``, ``enable``,
``evacuate``; xapi_vm_migrate.ml ``pool_migrate``; xapi_pool.ml
``designate_new_master``, ``emergency_transition_to_master``, ``recover_slaves``): a
disabled member starts no VM (``HOST_DISABLED [host]`` from ``assert_can_boot_here``; its
``allowed_operations`` keep ``vm_start``, as xapi's do); evacuating plans a place for
every VM on the other enabled members first and moves none when one has no place
(``NO_HOSTS_AVAILABLE [vm]``, ``HOST_NOT_ENOUGH_FREE_MEMORY [vm]``), and does not itself
disable the member; a migrated VM keeps its identity, its disks and its guest, and only
its ``resident_on`` changes.
"""

from __future__ import annotations

from typing import cast

from .errors import XapiError, bad_power_state
from .host import SimHost
from .lifecycle import HALTED_OPERATIONS, assert_can_boot_here
from .schema import NULL_REF

# host.allowed_operations as a live host's real record has them, enabled or not (xapi adds
# reboot and shutdown once disabled: the simulator does not serve those, so does not list them)
LIVE_OPERATIONS = ["vm_migrate", "provision", "vm_resume", "evacuate", "vm_start"]
DEAD_OPERATIONS: list[str] = []


def _member(host: SimHost, ref: str) -> dict[str, object]:
    record = host.store.get("host", ref)  # HANDLE_INVALID [host, ref]
    return record


def _live(host: SimHost, member: str) -> bool:
    metrics = str(host.store.get("host", member)["metrics"])
    return bool(host.store.get("host_metrics", metrics)["live"])


def disable(host: SimHost, member: str) -> None:
    with host.store.lock:
        _member(host, member)
        if not _live(host, member):
            raise XapiError("HOST_OFFLINE", member)
        host.store.update("host", member, enabled=False)


def enable(host: SimHost, member: str) -> None:
    with host.store.lock:
        _member(host, member)
        if not _live(host, member):
            raise XapiError("HOST_NOT_LIVE")
        host.store.update("host", member, enabled=True)


def evacuate(host: SimHost, member: str) -> None:
    """Move every VM running on ``member`` to the other enabled, live members; plan them all
    first, and move none when one finds no place."""
    store = host.store
    with store.lock:
        record = _member(host, member)
        resident = list(record["resident_VMs"])  # type: ignore[call-overload]  # a record's fields are object-typed; resident_VMs is a list of refs
        guests = [vm for vm in resident if not store.get("VM", vm)["is_control_domain"]]
        moved: list[str] = []
        try:
            for vm in guests:  # plan by moving for real, so each VM sees the room the last took
                _move(host, vm, _choose_elsewhere(host, vm, member))
                moved.append(vm)
        except XapiError:
            for vm in moved:  # undo: nothing moved when the plan fails
                _move(host, vm, member)
            raise
    if moved:
        host.sleep(host.timing.start_seconds)


def _choose_elsewhere(host: SimHost, vm: str, away_from: str) -> str:
    """The member with most free memory that can run ``vm``; the plan's errors name the VM
    only (xapi_ha_vm_failover.ml, the evacuation plan)."""
    record = host.store.get("VM", vm)
    others = [m for m in host.refs.members if m != away_from]
    short_of_memory = False
    for candidate in sorted(others, key=lambda m: (-host.memory_free(m), host.refs.members.index(m))):
        try:
            assert_can_boot_here(host, record, candidate)
        except XapiError as e:
            short_of_memory |= e.description[0] == "HOST_NOT_ENOUGH_FREE_MEMORY"
            continue
        return candidate
    raise XapiError("HOST_NOT_ENOUGH_FREE_MEMORY" if short_of_memory else "NO_HOSTS_AVAILABLE", vm)


def _move(host: SimHost, vm: str, target: str) -> None:
    host.store.update("VM", vm, resident_on=target)
    host.refresh_memory_free()


def pool_migrate(host: SimHost, vm: str, target: str, options: dict[str, str]) -> None:
    """Live-migrate a running VM to another member of the pool. The same member is
    ``HOST_NOT_ENOUGH_FREE_MEMORY``-free but pointless: xapi refuses it as
    ``OPERATION_NOT_ALLOWED``."""
    store = host.store
    with store.lock:
        record = store.get("VM", vm)
        _member(host, target)
        if record["is_a_template"]:
            raise XapiError("VM_IS_TEMPLATE", vm)
        if record["power_state"] != "Running":
            raise bad_power_state(vm, "running", str(record["power_state"]))
        if record["resident_on"] == target:
            raise XapiError("OPERATION_NOT_ALLOWED", "Host is the same as the VM's current host")
        assert_can_boot_here(host, record, target)
        _move(host, vm, target)
    host.sleep(host.timing.start_seconds)


def designate_new_master(host: SimHost, member: str) -> None:
    """An orderly hand-over: the member becomes master, the old one a member. Sessions
    live on (the pool database goes with the role)."""
    with host.store.lock:
        _member(host, member)
        if member not in host.refs.members:
            raise XapiError("HANDLE_INVALID", "host", member)
        if not _live(host, member):
            raise XapiError("HOST_NOT_LIVE")
        host.store.update("pool", host.refs.pool, master=member)
        position = host.refs.members.index(member)
        for other in range(len(host.refs.members)):
            host.believed_master[other] = position


def emergency_transition_to_master(host: SimHost, position: int) -> None:
    """Run on a member whose master is gone: it makes itself master. The old master, if it
    ever answers again, is a member like the others."""
    with host.store.lock:
        member = host.refs.members[position]
        host.store.update("pool", host.refs.pool, master=member)
        host.believed_master[position] = position
        for other in host.members_down - {position}:  # the new master hears no heartbeat from them
            set_live(host, other, False)


def recover_slaves(host: SimHost) -> list[str]:
    """Run on the new master: every member that answers is told who the master is now;
    the refs of those told."""
    with host.store.lock:
        master = host.master_position()
        told = []
        for position, ref in enumerate(host.refs.members):
            if position != master and position not in host.members_down:
                host.believed_master[position] = master
                told.append(ref)
        return told


def set_live(host: SimHost, position: int, live: bool) -> None:
    """What the master concludes about a member from its heartbeats (``host_metrics.live``).
    A member it lost keeps its VMs' records as they were (``resident_on``, ``Running``):
    xapi cannot know what they do until the member comes back."""
    with host.store.lock:
        member = host.refs.members[position]
        metrics = str(host.store.get("host", member)["metrics"])
        host.store.update("host_metrics", metrics, live=live, last_updated=host.now())
        host.store.update("host", member, allowed_operations=list(LIVE_OPERATIONS if live else DEAD_OPERATIONS))


def crash(host: SimHost, position: int) -> None:
    """A member that is switched off or crashed: its guests stop at once (their services
    close, their timers end), though xapi goes on calling them Running until the member is
    back or marked dead."""
    with host.store.lock:
        member = host.refs.members[position]
        for vm in list(host.store.get("host", member)["resident_VMs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; resident_VMs is a list of refs
            if not host.store.get("VM", vm)["is_control_domain"]:
                host.boot_epochs[vm] = host.boot_epochs.get(vm, 0) + 1
                host.services.close(vm)


def restart_after_crash(host: SimHost, position: int) -> None:
    """The member boots again: its xapi finds none of its guests' domains, and marks them
    Halted (xen-api xapi_xenops.ml, the resync after a host restart)."""
    with host.store.lock:
        member = host.refs.members[position]
        for vm in list(host.store.get("host", member)["resident_VMs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; resident_VMs is a list of refs
            record = host.store.get("VM", vm)
            if record["is_control_domain"]:
                continue
            host.store.update("VM", vm, power_state="Halted", resident_on=NULL_REF, domid="-1")
            host.store.update("VM", vm, allowed_operations=list(HALTED_OPERATIONS))
            metrics = str(record["guest_metrics"])
            if metrics != NULL_REF and host.store.exists("VM_guest_metrics", metrics):
                host.store.update("VM_guest_metrics", metrics, live=False)
            for vbd in cast("list[str]", record["VBDs"]):
                host.store.update("VBD", vbd, currently_attached=False)
            for vif in cast("list[str]", record["VIFs"]):
                host.store.update("VIF", vif, currently_attached=False)
            host.dhcp.release(vm)
        host.refresh_memory_free()
