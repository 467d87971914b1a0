"""VM, disk and device operations with xapi's rules: power states, memory admission,
copy-on-write clones, provisioning from ``other_config['disks']``, and VDIs that outlive
their VM until ``VDI.destroy``.

Each function is called from a request thread. Slow steps (``clone_seconds``,
``start_seconds``, ``shutdown_seconds``) sleep outside the store lock, so many calls proceed
at once; checks and changes happen together under the lock, so two calls cannot both pass a check
that only one of them should (the last free memory, the last free disk space).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import cast

from .errors import XapiError, bad_power_state
from .guest import boot, stop
from .host import SimHost
from .schema import NULL_REF
from .store import copy_record, new_uuid

# What a VM advertises in allowed_operations is what the real records list for its power
# state (real-records/ansible-test-vm-2 and -3, XenServer 7.2) less what the simulator
# does not serve (export, make_into_template, migrate_send, checkpoint, changing the
# shadow memory or live vCPUs): a third-party client that reads the list and calls an
# operation must find it served. A template lists provision instead of start (xen-api
# xapi_vm_lifecycle.ml: provision is a template's, start a VM's).
HALTED_OPERATIONS = [
    "changing_dynamic_range",
    "changing_static_range",
    "clone",
    "copy",
    "destroy",
    "snapshot",
    "start",
    "start_on",
]
TEMPLATE_OPERATIONS = ["changing_dynamic_range", "changing_static_range", "clone", "copy", "destroy", "provision"]
RUNNING_OPERATIONS = [
    "changing_dynamic_range",
    "clean_reboot",
    "clean_shutdown",
    "hard_reboot",
    "hard_shutdown",
    "pause",
    "pool_migrate",
    "snapshot",
    "suspend",
]
PAUSED_OPERATIONS = ["hard_shutdown", "snapshot", "unpause"]
SUSPENDED_OPERATIONS = ["resume", "hard_shutdown"]


MiB = 1024**2


def hvm_memory_overhead(static_max: int, vcpus_max: int, shadow_multiplier: float) -> int:
    """``VM.memory_overhead`` as xapi computes it for an HVM guest (xen-api
    ocaml/xenopsd/lib/memory.ml: 1 + 1 MiB extra, plus shadow pages: 256 per vCPU and two
    per MiB of static_max, in MiB rounded up, times the shadow multiplier). The real
    records agree: 2 GiB / 2 vCPUs -> 20 MiB, 1 GiB / 1 vCPU -> 11 MiB."""
    static_max_mib = -(-static_max // MiB)
    pages = 256 * vcpus_max + 2 * static_max_mib
    shadow_mib = max(1, int(-(-pages // 256) * shadow_multiplier))
    return (2 + shadow_mib) * MiB


def refresh_memory_overhead(host: SimHost, vm: str) -> None:
    """xapi recomputes the overhead when vCPUs or memory change (hold the store's lock)."""
    record = host.store.get("VM", vm)
    overhead = hvm_memory_overhead(
        int(str(record["memory_static_max"])),
        int(str(record["VCPUs_max"])),
        float(record["HVM_shadow_multiplier"]),  # type: ignore[arg-type]  # a record's fields are object-typed; this one is a float
    )
    host.store.update("VM", vm, memory_overhead=str(overhead))


def random_mac(host: SimHost) -> str:
    octets = [0x02 | (host.random.randint(0, 255) & 0xFC)] + [host.random.randint(0, 255) for _ in range(5)]
    return ":".join(f"{o:02x}" for o in octets)


def _vm(host: SimHost, vm: str) -> dict[str, object]:
    return host.store.get("VM", vm)


def _fault(host: SimHost, operation: str, vm: str) -> None:
    """Raise the error a test asked the next ``operation`` to fail with, if any."""
    code = host.faults.take_failure(operation)
    if code is None:
        return
    params: list[object]
    match code:
        case "HOST_NOT_ENOUGH_FREE_MEMORY":
            params = [str(int(str(_vm(host, vm)["memory_static_max"]))), str(host.memory_free())]
        case "SR_FULL":
            params = ["0", str(host.sr_free(host.refs.sr))]
        case "NO_HOSTS_AVAILABLE" | "EVENTS_LOST":
            params = []
        case "INTERNAL_ERROR":
            params = [f"simulated {operation} failure"]
        case _:
            params = [vm]
    raise XapiError(code, *params)


def _require_power_state(host: SimHost, vm: str, *expected: str) -> dict[str, object]:
    record = _vm(host, vm)
    actual = str(record["power_state"])
    if actual not in expected:
        raise bad_power_state(vm, expected[0], actual)
    return record


# -- clone and provision ---------------------------------------------------------------


def clone(host: SimHost, vm: str, new_name: str, instant: bool = False) -> str:
    store = host.store
    with store.lock:
        _require_power_state(host, vm, "Halted")
        _fault(host, "clone", vm)
    if not instant:
        host.sleep(host.timing.clone_seconds)
    with store.lock:
        source = _vm(host, vm)
        if source["power_state"] != "Halted":  # it may have been started while we copied
            raise bad_power_state(vm, "halted", str(source["power_state"]))
        new_vm = new_vm_like(host, vm, source, new_name)
        for vbd in list(source["VBDs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
            _clone_vbd(host, vbd, new_vm)
        copy_vifs(host, source, new_vm)
        return new_vm


def new_vm_like(host: SimHost, vm: str, source: dict[str, object], new_name: str, snapshot: bool = False) -> str:
    """A halted VM made from ``source`` as a clone, copy or snapshot starts: its settings,
    a new identity (uuid, metrics), and no devices yet. As xapi's ``copy_vm_record``
    (xapi_vm_clone.ml) has it: a clone or copy is no snapshot and has no parent, loses
    ``default_template`` and gets a MAC seed of its own; a snapshot keeps the MAC seed and
    takes its VM's parent, and the VM's parent becomes the snapshot. Hold the store's lock."""
    store = host.store
    record = copy_record(source)
    other_config = dict(record["other_config"])  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
    if not snapshot:
        other_config["mac_seed"] = new_uuid()
        other_config.pop("default_template", None)
    metrics = store.create("VM_metrics", {"memory_actual": "0", "VCPUs_number": "0", "install_time": host.now()})
    record.update(
        uuid=new_uuid(),
        name_label=new_name,
        power_state="Halted",
        is_default_template=False,
        resident_on=NULL_REF,
        domid="-1",
        VBDs=[],
        VIFs=[],
        consoles=[],
        snapshots=[],
        children=[],
        parent=source["parent"] if snapshot else NULL_REF,
        is_a_snapshot=snapshot,
        snapshot_of=vm if snapshot else NULL_REF,
        metrics=metrics,
        guest_metrics=NULL_REF,
        other_config=other_config,
        current_operations={},
        allowed_operations=list(TEMPLATE_OPERATIONS if source["is_a_template"] else HALTED_OPERATIONS),
    )
    new_vm = store.create("VM", record)
    if snapshot:
        store.update("VM", vm, parent=new_vm)
    if vm in host.guest_os:
        host.guest_os[new_vm] = host.guest_os[vm]
    return new_vm


def copy_vifs(host: SimHost, source: dict[str, object], new_vm: str) -> None:
    """The source's network interfaces, on the same networks, for ``new_vm``."""
    for vif in list(source["VIFs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
        old = host.store.get("VIF", vif)
        create_vif(host, {"VM": new_vm, "network": old["network"], "device": old["device"], "MTU": old["MTU"]})


def _clone_vbd(host: SimHost, vbd: str, new_vm: str) -> None:
    store = host.store
    old = store.get("VBD", vbd)
    vdi = str(old["VDI"])
    if old["type"] == "Disk" and vdi != NULL_REF:
        # Copy-on-write: a new VDI whose parent is the original's; it costs what the
        # original costs on a thick SR, which is what capacity planning must assume.
        source = store.get("VDI", vdi)
        vdi = store.create(
            "VDI",
            {
                "name_label": source["name_label"],
                "name_description": source["name_description"],
                "SR": source["SR"],
                "virtual_size": source["virtual_size"],
                "physical_utilisation": source["physical_utilisation"],
                "type": source["type"],
                "sharable": source["sharable"],
                "read_only": False,
                "managed": True,
                "sm_config": {"vdi_type": "vhd", "vhd-parent": str(source["uuid"])},
                "allowed_operations": ["destroy"],
            },
        )
        host.refresh_sr_usage(str(source["SR"]))
    attach_like(host, old, new_vm, vdi, bool(old["empty"]))


def attach_like(host: SimHost, old: dict[str, object], new_vm: str, vdi: str, empty: bool) -> str:
    """A VBD for ``new_vm`` like the source's ``old`` one (its device, boot order, mode,
    type), holding ``vdi``."""
    return create_vbd(
        host,
        {
            "VM": new_vm,
            "VDI": vdi,
            "userdevice": old["userdevice"],
            "bootable": old["bootable"],
            "mode": old["mode"],
            "type": old["type"],
            "empty": empty,
            "unpluggable": old["unpluggable"],
        },
    )


def provision(host: SimHost, vm: str) -> None:
    """Turn a cloned template into a VM and create the disks its ``other_config['disks']``
    asks for, each on the SR named by uuid. An empty ``sr`` (as built-in templates have it)
    is ``UUID_INVALID [sr, ""]``: xe rewrites it to the default SR on the client side, xapi
    does not (xen-api xapi_templates.ml, create_disk; cli_util.ml)."""
    store = host.store
    with store.lock:
        record = _require_power_state(host, vm, "Halted")
        _fault(host, "provision", vm)
        store.update("VM", vm, is_a_template=False, allowed_operations=list(HALTED_OPERATIONS))
        spec = dict(record["other_config"]).get("disks", "")  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
        if not spec:
            return
        try:
            disks = ET.fromstring(spec).findall("disk")
        except ET.ParseError as e:
            raise XapiError("INTERNAL_ERROR", f"bad provision spec: {e}") from None
        created: list[str] = []
        try:
            for disk in disks:
                sr_uuid = disk.get("sr", "")
                if not sr_uuid:
                    raise XapiError("UUID_INVALID", "sr", sr_uuid)
                sr = store.by_uuid("SR", sr_uuid)
                size = int(disk.get("size", "0"))
                vdi = create_vdi(
                    host,
                    {
                        "name_label": f"{record['name_label']} {disk.get('device', '0')}",
                        "SR": sr,
                        "virtual_size": str(size),
                        "type": disk.get("type", "system"),
                        "sharable": False,
                        "read_only": False,
                    },
                )
                created.append(vdi)
                create_vbd(
                    host,
                    {
                        "VM": vm,
                        "VDI": vdi,
                        "userdevice": disk.get("device", "0"),
                        "bootable": disk.get("bootable", "false") == "true",
                        "mode": "RW",
                        "type": "Disk",
                        "empty": False,
                        "unpluggable": False,
                    },
                )
        except XapiError:
            for vdi in created:  # xapi deletes what it created when an install fails
                destroy_vdi(host, vdi)
            raise
        other_config = dict(record["other_config"])  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
        other_config.pop("disks", None)
        store.update("VM", vm, other_config=other_config)


# -- power -----------------------------------------------------------------------------


def start(host: SimHost, vm: str, start_paused: bool = False, instant: bool = False, on: str | None = None) -> None:
    """``VM.start`` (``on`` None: xapi chooses the member) or ``VM.start_on`` (``on``: that
    member, and only it)."""
    store = host.store
    with store.lock:
        record = _vm(host, vm)
        _refuse_template(record, vm, "start")
        _require_power_state(host, vm, "Halted")
        _fault(host, "start", vm)
        member = choose_member(host, record, on)  # xapi's assert_can_boot_here runs before the platform check
        _check_cores_per_socket(record)
        store.update(
            "VM",
            vm,
            power_state="Paused" if start_paused else "Running",
            resident_on=member,
            domid=host.next_domid(),
            allowed_operations=list(PAUSED_OPERATIONS if start_paused else RUNNING_OPERATIONS),
        )
        _attach_devices(host, record, True)
        old_metrics = str(record["guest_metrics"])
        if old_metrics != NULL_REF and store.exists("VM_guest_metrics", old_metrics):
            store.destroy("VM_guest_metrics", old_metrics)
        store.update("VM", vm, guest_metrics=NULL_REF)
        metrics = str(record["metrics"])
        if store.exists("VM_metrics", metrics):
            store.update(
                "VM_metrics",
                metrics,
                start_time=host.now(),
                last_updated=host.now(),
                memory_actual=str(record["memory_static_max"]),
                VCPUs_number=str(record["VCPUs_at_startup"]),
                hvm=True,
                current_domain_type="hvm",
            )
        host.refresh_memory_free()
    if not instant:
        host.sleep(host.timing.start_seconds)
    if not start_paused:
        boot(host, vm, instant=instant)


def _refuse_template(record: dict[str, object], vm: str, operation: str) -> None:
    """xapi's check_template (xapi_vm_lifecycle.ml): VM_IS_TEMPLATE [vm, operation]."""
    if record["is_a_template"]:
        raise XapiError("VM_IS_TEMPLATE", vm, operation)


def _admit(host: SimHost, record: dict[str, object], member: str) -> None:
    """Memory admission: static_max plus xapi's overhead must fit in the member's free memory."""
    needed = int(str(record["memory_static_max"])) + int(str(record["memory_overhead"]))
    free = host.memory_free(member)
    if needed > free:
        raise XapiError("HOST_NOT_ENOUGH_FREE_MEMORY", str(needed), str(free))


def choose_member(host: SimHost, record: dict[str, object], on: str | None) -> str:
    """Where a VM starts or resumes, admitted there (``assert_can_boot_here``).

    ``on`` (``VM.start_on``): that member or its error (HANDLE_INVALID for a ref that is
    no host of this pool). Otherwise xapi chooses (xen-api xapi_vm_helpers.ml,
    ``choose_host_for_vm``): the VM's ``affinity`` host when the VM can boot there, else one
    of the members it can boot on — here the one with most free memory, so a test can
    predict it; none: ``NO_HOSTS_AVAILABLE`` in a pool, the member's own error in a
    one-host pool (xapi reports the single host's reason)."""
    members = host.refs.members
    if on is not None:
        host.store.get("host", on)  # HANDLE_INVALID [host, ref]
        if on not in members:
            raise XapiError("HANDLE_INVALID", "host", on)
        assert_can_boot_here(host, record, on)
        return on
    if len(members) == 1:
        assert_can_boot_here(host, record, members[0])
        return members[0]
    by_room = sorted(members, key=lambda m: (-host.memory_free(m), members.index(m)))
    affinity = str(record.get("affinity", NULL_REF))
    if affinity in members:
        by_room.remove(affinity)
        by_room.insert(0, affinity)
    for member in by_room:
        try:
            assert_can_boot_here(host, record, member)
        except XapiError:
            continue
        return member
    raise XapiError("NO_HOSTS_AVAILABLE")


def assert_can_boot_here(host: SimHost, record: dict[str, object], member: str) -> None:
    """xapi's checks before a VM runs on a member (xapi_vm_helpers.ml,
    ``assert_can_boot_here``), in its order: the member is live (``HOST_NOT_LIVE``), it
    is enabled (``HOST_DISABLED [host]``), it reaches every SR the VM's disks are on
    (``VM_REQUIRES_SR [vm, sr]``: a member's local SR is no other member's), then memory."""
    store = host.store
    host_record = store.get("host", member)
    if not store.get("host_metrics", str(host_record["metrics"]))["live"]:
        raise XapiError("HOST_NOT_LIVE")
    if not host_record["enabled"]:
        raise XapiError("HOST_DISABLED", member)
    for sr in vm_srs(host, record):
        if not member_reaches(host, member, sr):
            raise XapiError("VM_REQUIRES_SR", _ref_of(host, record), sr)
    _admit(host, record, member)


def _ref_of(host: SimHost, record: dict[str, object]) -> str:
    return host.store.by_uuid("VM", str(record["uuid"]))


def vm_srs(host: SimHost, record: dict[str, object]) -> list[str]:
    """The SRs the VM's disks are on (CD drives aside), in VBD order."""
    store, out = host.store, []
    for vbd in cast("list[str]", record["VBDs"]):
        vbd_record = store.get("VBD", vbd)
        vdi = str(vbd_record["VDI"])
        if vbd_record["type"] == "Disk" and vdi != NULL_REF and store.exists("VDI", vdi):
            sr = str(store.get("VDI", vdi)["SR"])
            if sr not in out:
                out.append(sr)
    return out


def member_reaches(host: SimHost, member: str, sr: str) -> bool:
    """A member reaches an SR it has an attached PBD for."""
    store = host.store
    return any(
        store.get("PBD", pbd)["host"] == member and store.get("PBD", pbd)["currently_attached"]
        for pbd in cast("list[str]", store.get("SR", sr)["PBDs"])
    )


def _check_cores_per_socket(record: dict[str, object]) -> None:
    """xapi refuses to start a VM whose VCPUs_max is not a multiple of its
    platform:cores-per-socket (xen-api vm_platform.ml, sanity_check, at VM.start only:
    VCPU_MAX_NOT_CORES_PER_SOCKET_MULTIPLE [vcpu_max, cores_per_socket], also for 0 or a
    negative value; INVALID_VALUE [platform:cores-per-socket, value] for a non-integer)."""
    raw = dict(record["platform"]).get("cores-per-socket")  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
    if raw is None:
        return
    vcpus = int(str(record["VCPUs_max"]))
    try:
        cores = int(str(raw))
    except ValueError:
        raise XapiError("INVALID_VALUE", "platform:cores-per-socket", str(raw)) from None
    if cores < 1 or vcpus % cores:
        raise XapiError("VCPU_MAX_NOT_CORES_PER_SOCKET_MULTIPLE", str(vcpus), str(raw))


def require_member_live(host: SimHost, vm: str) -> None:
    """A VM on a member that does not answer cannot be acted on until the member is back:
    ``CANNOT_CONTACT_HOST [host]`` while the master still counts it live, ``HOST_OFFLINE
    [host]`` once it marked it dead (xen-api message_forwarding.ml, ``do_op_on``)."""
    resident = str(_vm(host, vm)["resident_on"])
    if resident in host.refs.members:
        metrics = str(host.store.get("host", resident)["metrics"])
        if not host.store.get("host_metrics", metrics)["live"]:
            raise XapiError("HOST_OFFLINE", resident)
        if host.refs.members.index(resident) in host.members_down:
            raise XapiError("CANNOT_CONTACT_HOST", resident)


def hard_shutdown(host: SimHost, vm: str) -> None:
    store = host.store
    with store.lock:
        require_member_live(host, vm)
    host.sleep(host.timing.shutdown_seconds)
    with store.lock:
        record = _vm(host, vm)
        if record["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "the control domain cannot be shut down")
        _require_power_state(host, vm, "Running", "Paused", "Suspended")
        require_member_live(host, vm)
        _fault(host, "hard_shutdown", vm)
        stop(host, vm)
        store.update(
            "VM",
            vm,
            power_state="Halted",
            resident_on=NULL_REF,
            domid="-1",
            allowed_operations=list(HALTED_OPERATIONS),
        )
        _attach_devices(host, record, False)
        metrics = str(record["guest_metrics"])
        if metrics != NULL_REF and store.exists("VM_guest_metrics", metrics):
            store.update("VM_guest_metrics", metrics, live=False)
        host.refresh_memory_free()


def clean_shutdown(host: SimHost, vm: str) -> None:
    with host.store.lock:
        _require_power_state(host, vm, "Running")
    hard_shutdown(host, vm)


def reboot(host: SimHost, vm: str, clean: bool) -> None:
    """``hard_reboot`` / ``clean_reboot``: the domain restarts, its guest boots again (new
    guest metrics, its address asked for anew) and it stays Running."""
    with host.store.lock:
        record = _vm(host, vm)
        _refuse_template(record, vm, "clean_reboot" if clean else "hard_reboot")
        _require_power_state(host, vm, "Running")
        stop(host, vm)
        old_metrics = str(record["guest_metrics"])
        if old_metrics != NULL_REF and host.store.exists("VM_guest_metrics", old_metrics):
            host.store.destroy("VM_guest_metrics", old_metrics)
        host.store.update("VM", vm, guest_metrics=NULL_REF, domid=host.next_domid())
    host.sleep(host.timing.shutdown_seconds if clean else 0.0)
    with host.store.lock:  # a shutdown or suspend during the reboot wins: no guest comes up
        if not host.store.exists("VM", vm) or _vm(host, vm)["power_state"] != "Running":
            return
    boot(host, vm)


def pause(host: SimHost, vm: str) -> None:
    """The domain stops being scheduled; it keeps its memory, member and guest."""
    _set_paused(host, vm, True)


def unpause(host: SimHost, vm: str) -> None:
    _set_paused(host, vm, False)


def _set_paused(host: SimHost, vm: str, paused: bool) -> None:
    with host.store.lock:
        record = _vm(host, vm)
        _refuse_template(record, vm, "pause" if paused else "unpause")
        _require_power_state(host, vm, "Running" if paused else "Paused")
        require_member_live(host, vm)
        state, operations = ("Paused", PAUSED_OPERATIONS) if paused else ("Running", RUNNING_OPERATIONS)
        host.store.update("VM", vm, power_state=state, allowed_operations=list(operations))


def suspend(host: SimHost, vm: str) -> None:
    """The VM's memory goes to disk; it holds no host memory and keeps its address lease."""
    with host.store.lock:
        record = _vm(host, vm)
        _refuse_template(record, vm, "suspend")
        _require_power_state(host, vm, "Running")
        host.boot_epochs[vm] = host.boot_epochs.get(vm, 0) + 1  # pending guest timers stop
        host.store.update(
            "VM",
            vm,
            power_state="Suspended",
            resident_on=NULL_REF,
            domid="-1",
            allowed_operations=list(SUSPENDED_OPERATIONS),
        )
        host.refresh_memory_free()


def resume(host: SimHost, vm: str) -> None:
    with host.store.lock:
        record = _vm(host, vm)
        _refuse_template(record, vm, "resume")
        _require_power_state(host, vm, "Suspended")
        member = choose_member(host, record, None)
        host.store.update(
            "VM",
            vm,
            power_state="Running",
            resident_on=member,
            domid=host.next_domid(),
            allowed_operations=list(RUNNING_OPERATIONS),
        )
        host.refresh_memory_free()


def _attach_devices(host: SimHost, record: dict[str, object], attached: bool) -> None:
    """Plug (or unplug) the VM's devices. xapi names a VBD's device (xvda, xvdd, ...) the
    first time its VM runs, and keeps the name after a shutdown (the real records: a
    halted, once-run VM's disk is xvda; its never-plugged CD has device "")."""
    for vbd in list(record["VBDs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
        fields: dict[str, object] = {"currently_attached": attached}
        vbd_record = host.store.get("VBD", vbd)
        if attached and not vbd_record["device"] and str(vbd_record["userdevice"]).isdigit():
            fields["device"] = "xvd" + "abcdefghijklmnop"[int(str(vbd_record["userdevice"])) % 16]
        host.store.update("VBD", vbd, **fields)
    for vif in list(record["VIFs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
        host.store.update("VIF", vif, currently_attached=attached)


# -- destroy ---------------------------------------------------------------------------


def destroy_vm(host: SimHost, vm: str) -> None:
    """Destroy the VM and its devices; its VDIs stay until ``VDI.destroy``."""
    store = host.store
    with store.lock:
        record = _vm(host, vm)
        if record["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "the control domain cannot be destroyed")
        _require_power_state(host, vm, "Halted")
        _fault(host, "destroy", vm)
        for vbd in list(record["VBDs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
            store.destroy("VBD", vbd)
        for vif in list(record["VIFs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
            store.destroy("VIF", vif)
        for cls, ref in (("VM_metrics", record["metrics"]), ("VM_guest_metrics", record["guest_metrics"])):
            if store.exists(cls, str(ref)):
                store.destroy(cls, str(ref))
        store.destroy("VM", vm)
        host.guest_os.pop(vm, None)
        host.boot_epochs.pop(vm, None)
        host.dhcp.release(vm)


def destroy_vdi(host: SimHost, vdi: str) -> None:
    store = host.store
    with store.lock:
        record = store.get("VDI", vdi)
        sr = str(record["SR"])
        if store.get("SR", sr)["content_type"] == "iso":
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
        for vbd in cast("list[str]", record["VBDs"]):
            if store.get("VBD", vbd)["currently_attached"]:
                raise XapiError("VDI_IN_USE", vdi, "destroy")
        _fault(host, "vdi_destroy", vdi)
        for vbd in list(record["VBDs"]):  # type: ignore[call-overload]  # a record's fields are object-typed; this one is a map or a list of refs
            store.destroy("VBD", vbd)
        store.destroy("VDI", vdi)
        host.refresh_sr_usage(sr)


# -- devices and disks -----------------------------------------------------------------


def create_vdi(host: SimHost, fields: dict[str, object]) -> str:
    store = host.store
    with store.lock:
        sr = str(fields.get("SR", NULL_REF))
        store.get("SR", sr)
        size = int(str(fields.get("virtual_size", "0")))
        free = host.sr_free(sr)
        if size > free:
            raise XapiError("SR_FULL", size, free)
        values = {
            "physical_utilisation": str(size),  # thick provisioning: what you ask is what you use
            "managed": True,
            "location": "",
            "sm_config": {"vdi_type": "vhd"},
            "allowed_operations": ["destroy"],
            **fields,
        }
        vdi = store.create("VDI", values)
        store.update("VDI", vdi, location=store.get("VDI", vdi)["uuid"])
        host.refresh_sr_usage(sr)
        return vdi


def create_vbd(host: SimHost, fields: dict[str, object]) -> str:
    store = host.store
    with store.lock:
        vm = str(fields.get("VM", NULL_REF))
        record = _vm(host, vm)
        vdi = str(fields.get("VDI", NULL_REF))
        if vdi != NULL_REF:
            store.get("VDI", vdi)
        device = str(fields.get("userdevice", ""))
        used = {str(store.get("VBD", v)["userdevice"]) for v in cast("list[str]", record["VBDs"])}
        if device in ("", "autodetect"):
            device = next(str(n) for n in range(16) if str(n) not in used)
        elif device in used:
            raise XapiError("DEVICE_ALREADY_EXISTS", device)
        values = {
            "storage_lock": False,
            "status_code": "0",
            "device": "",
            "allowed_operations": ["attach"],
            **fields,
            "userdevice": device,
            "currently_attached": False,
        }
        return store.create("VBD", values)


def create_vif(host: SimHost, fields: dict[str, object]) -> str:
    store = host.store
    with store.lock:
        vm = str(fields.get("VM", NULL_REF))
        record = _vm(host, vm)
        store.get("network", str(fields.get("network", NULL_REF)))
        device = str(fields.get("device", "0"))
        if any(store.get("VIF", v)["device"] == device for v in cast("list[str]", record["VIFs"])):
            raise XapiError("DEVICE_ALREADY_EXISTS", device)
        mac = str(fields.get("MAC", "")) or random_mac(host)
        values = {
            "MTU": "1500",
            "status_code": "0",
            "allowed_operations": ["attach"],
            "locking_mode": "network_default",
            **fields,
            "device": device,
            "MAC": mac,
            "MAC_autogenerated": not fields.get("MAC"),
            "currently_attached": False,
        }
        return store.create("VIF", values)


def destroy_device(host: SimHost, cls: str, ref: str) -> None:
    """``VBD.destroy`` / ``VIF.destroy``: only an unplugged device can go."""
    with host.store.lock:
        if host.store.get(cls, ref)["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"{cls} is currently attached; unplug it first")
        host.store.destroy(cls, ref)


# -- vCPUs and memory ------------------------------------------------------------------


def set_vcpus(host: SimHost, vm: str, field: str, value: int) -> None:
    """``set_VCPUs_max`` / ``set_VCPUs_at_startup`` on a halted VM.

    xapi requires 1 <= VCPUs_at_startup <= VCPUs_max, so growing means max first and
    shrinking means at_startup first; otherwise xapi answers INVALID_VALUE with its
    sentence in the field slot, then the value (xen-api xapi_vm.ml, set_VCPUs_max and
    set_VCPUs_at_startup).
    """
    with host.store.lock:
        record = _require_power_state(host, vm, "Halted")
        at_startup = value if field == "VCPUs_at_startup" else int(str(record["VCPUs_at_startup"]))
        maximum = value if field == "VCPUs_max" else int(str(record["VCPUs_max"]))
        if value < 1 or at_startup > maximum:
            raise XapiError("INVALID_VALUE", "VCPU values must satisfy: 0 < VCPUs_at_startup ≤ VCPUs_max", str(value))
        host.store.update("VM", vm, **{field: str(value)})
        refresh_memory_overhead(host, vm)


MEMORY_FIELDS = ("memory_static_min", "memory_dynamic_min", "memory_dynamic_max", "memory_static_max")


def set_memory(host: SimHost, vm: str, **changes: int) -> None:
    """Any of the memory setters: checks static_min <= dynamic_min <= dynamic_max <= static_max."""
    with host.store.lock:
        record = _vm(host, vm)
        if "memory_static_min" in changes or "memory_static_max" in changes:
            _require_power_state(host, vm, "Halted")
        values = {f: int(str(record[f])) for f in MEMORY_FIELDS}
        values.update({f: int(v) for f, v in changes.items()})
        ordered = [values[f] for f in MEMORY_FIELDS]
        if ordered != sorted(ordered) or ordered[0] < 0:
            raise XapiError(
                "MEMORY_CONSTRAINT_VIOLATION",
                "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max",
            )
        host.store.update(
            "VM", vm, **{f: str(v) for f, v in changes.items()}, memory_target=str(values["memory_dynamic_max"])
        )
        refresh_memory_overhead(host, vm)
