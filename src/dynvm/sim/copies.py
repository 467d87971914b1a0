"""Copies of VMs and changes to their media, as third-party clients ask for them:
``VM.copy`` (a full copy, onto another SR if asked), ``VM.snapshot`` (a template pointing
at its VM, with snapshot disks), ``VBD.insert``/``eject`` (a CD drive's disc) and
``VDI.resize`` (a disk grows). The simulator keeps no disk contents: a copy or snapshot is
records, and costs on its SR what a thick SR would charge.

xapi's rules (xen-api xapi_vm_clone.ml, xapi_vm_snapshot.ml, xapi_vbd.ml, xapi_vdi.ml): a
copy needs a halted VM (``VM_BAD_POWER_STATE``), keeps whether it is a template, and fits
on its SR (``SR_FULL``); a snapshot works on a running VM too and leaves out the disks
named in ``ignore_vdis``; only a CD drive takes a disc (``VBD_NOT_REMOVABLE_MEDIA``), into
an empty drive (``VBD_NOT_EMPTY``), and an empty one has nothing to eject
(``VBD_IS_EMPTY``); a disk never shrinks.
"""

from __future__ import annotations

from .errors import XapiError, bad_power_state
from .host import SimHost
from .lifecycle import HALTED_OPERATIONS, TEMPLATE_OPERATIONS, create_vbd, create_vdi, create_vif
from .schema import NULL_REF
from .store import copy_record, new_uuid

SNAPSHOT_OPERATIONS = ["clone", "copy", "destroy"]


def copy(host: SimHost, vm: str, new_name: str, sr: str) -> str:
    """A full copy of a halted VM or template: its disks copied whole onto ``sr`` (each
    on its own disk's SR when ``sr`` is NULL)."""
    store = host.store
    with store.lock:
        source = store.get("VM", vm)
        if source["power_state"] != "Halted":
            raise bad_power_state(vm, "halted", str(source["power_state"]).lower())
        if sr != NULL_REF:
            store.get("SR", sr)  # HANDLE_INVALID
        disks = _disks(host, source)
        needed: dict[str, int] = {}
        for _, vdi in disks:
            target = sr if sr != NULL_REF else str(store.get("VDI", vdi)["SR"])
            needed[target] = needed.get(target, 0) + int(str(store.get("VDI", vdi)["virtual_size"]))
        for target, size in needed.items():
            if size > host.sr_free(target):
                raise XapiError("SR_FULL", str(size), str(host.sr_free(target)))
        new_vm = _new_vm(host, vm, source, new_name)
        operations = TEMPLATE_OPERATIONS if source["is_a_template"] else HALTED_OPERATIONS
        store.update("VM", new_vm, allowed_operations=list(operations))
        for vbd, vdi in disks:
            old = store.get("VDI", vdi)
            target = sr if sr != NULL_REF else str(old["SR"])
            copied = create_vdi(host, _vdi_fields(old, target))
            _attach(host, vbd, new_vm, copied)
        _copy_other_devices(host, source, new_vm, disks)
    host.sleep(host.timing.clone_seconds)
    return new_vm


def snapshot(host: SimHost, vm: str, new_name: str, ignore_vdis: list[str]) -> str:
    """A snapshot: a template (``is_a_snapshot``, ``snapshot_of`` its VM) whose disks are
    snapshots of the VM's, but those in ``ignore_vdis``."""
    store = host.store
    with store.lock:
        source = store.get("VM", vm)
        if source["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "a snapshot cannot be snapshotted")
        if source["power_state"] not in ("Halted", "Running", "Paused", "Suspended"):
            raise bad_power_state(vm, "running", str(source["power_state"]).lower())
        disks = [(vbd, vdi) for vbd, vdi in _disks(host, source) if vdi not in ignore_vdis]
        now = host.now()
        new_vm = _new_vm(host, vm, source, new_name)
        store.update(
            "VM",
            new_vm,
            is_a_template=True,
            is_a_snapshot=True,
            snapshot_of=vm,
            snapshot_time=now,
            power_state="Halted",
            allowed_operations=list(SNAPSHOT_OPERATIONS),
        )
        for vbd, vdi in disks:
            old = store.get("VDI", vdi)
            fields = _vdi_fields(old, str(old["SR"]))
            fields.update(is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now, read_only=False)
            snap = create_vdi(host, fields)
            _attach(host, vbd, new_vm, snap)
        _copy_other_devices(host, source, new_vm, disks)
        return new_vm


def _disks(host: SimHost, record: dict[str, object]) -> list[tuple[str, str]]:
    """(VBD, VDI) of the VM's disks, CD drives aside."""
    out = []
    for vbd in record["VBDs"]:  # type: ignore[union-attr]
        vbd_record = host.store.get("VBD", vbd)
        vdi = str(vbd_record["VDI"])
        if vbd_record["type"] == "Disk" and vdi != NULL_REF and host.store.exists("VDI", vdi):
            out.append((vbd, vdi))
    return out


def _new_vm(host: SimHost, vm: str, source: dict[str, object], new_name: str) -> str:
    store = host.store
    record = copy_record(source)
    other_config = dict(record["other_config"])  # type: ignore[call-overload]
    other_config["mac_seed"] = new_uuid()
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
        parent=vm,
        metrics=metrics,
        guest_metrics=NULL_REF,
        other_config=other_config,
        current_operations={},
    )
    new_vm = store.create("VM", record)
    if vm in host.guest_os:
        host.guest_os[new_vm] = host.guest_os[vm]
    return new_vm


def _vdi_fields(old: dict[str, object], sr: str) -> dict[str, object]:
    return {
        "name_label": old["name_label"],
        "name_description": old["name_description"],
        "SR": sr,
        "virtual_size": old["virtual_size"],
        "type": old["type"],
        "sharable": old["sharable"],
        "read_only": False,
    }


def _attach(host: SimHost, vbd: str, new_vm: str, vdi: str) -> None:
    old = host.store.get("VBD", vbd)
    create_vbd(
        host,
        {
            "VM": new_vm,
            "VDI": vdi,
            "userdevice": old["userdevice"],
            "bootable": old["bootable"],
            "mode": old["mode"],
            "type": old["type"],
            "empty": False,
            "unpluggable": old["unpluggable"],
        },
    )


def _copy_other_devices(host: SimHost, source: dict[str, object], new_vm: str, disks: list[tuple[str, str]]) -> None:
    """The CD drives (with their disc, if any) and the network interfaces."""
    store = host.store
    copied = {vbd for vbd, _ in disks}
    for vbd in source["VBDs"]:  # type: ignore[union-attr]
        old = store.get("VBD", vbd)
        if vbd in copied or old["type"] != "CD":
            continue
        create_vbd(
            host,
            {
                "VM": new_vm,
                "VDI": old["VDI"],
                "userdevice": old["userdevice"],
                "bootable": old["bootable"],
                "mode": old["mode"],
                "type": "CD",
                "empty": old["empty"],
                "unpluggable": old["unpluggable"],
            },
        )
    for vif in list(source["VIFs"]):  # type: ignore[call-overload]
        old = store.get("VIF", vif)
        create_vif(host, {"VM": new_vm, "network": old["network"], "device": old["device"], "MTU": old["MTU"]})


def insert(host: SimHost, vbd: str, vdi: str) -> None:
    store = host.store
    with store.lock:
        record = store.get("VBD", vbd)
        store.get("VDI", vdi)
        if record["type"] != "CD":
            raise XapiError("VBD_NOT_REMOVABLE_MEDIA", vbd)
        if not record["empty"]:
            raise XapiError("VBD_NOT_EMPTY", vbd)
        store.update("VBD", vbd, VDI=vdi, empty=False)


def eject(host: SimHost, vbd: str) -> None:
    store = host.store
    with store.lock:
        record = store.get("VBD", vbd)
        if record["type"] != "CD":
            raise XapiError("VBD_NOT_REMOVABLE_MEDIA", vbd)
        if record["empty"]:
            raise XapiError("VBD_IS_EMPTY", vbd)
        store.update("VBD", vbd, VDI=NULL_REF, empty=True)


def resize(host: SimHost, vdi: str, size: int) -> None:
    """Grow a disk to ``size`` bytes (on a thick SR, it costs the difference at once)."""
    store = host.store
    with store.lock:
        record = store.get("VDI", vdi)
        current = int(str(record["virtual_size"]))
        if size < current:
            raise XapiError("VDI_TOO_SMALL", vdi, str(current))  # xapi's SM refuses to shrink
        sr = str(record["SR"])
        if store.get("SR", sr)["content_type"] == "iso":
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
        grow = size - current
        if grow > host.sr_free(sr):
            raise XapiError("SR_FULL", str(grow), str(host.sr_free(sr)))
        physical = int(str(record["physical_utilisation"])) + grow
        store.update("VDI", vdi, virtual_size=str(size), physical_utilisation=str(physical))
        host.refresh_sr_usage(sr)
