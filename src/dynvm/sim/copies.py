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

from typing import cast

from .errors import XapiError, bad_power_state
from .host import SimHost
from .lifecycle import attach_like, copy_vifs, create_vdi, new_vm_like
from .schema import NULL_REF

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
        _check_room(host, [(vdi, sr if sr != NULL_REF else str(store.get("VDI", vdi)["SR"])) for _, vdi in disks])
        new_vm = new_vm_like(host, vm, source, new_name)
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
        if source["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "the control domain cannot be snapshotted")
        if source["is_a_snapshot"]:
            raise XapiError("VM_IS_SNAPSHOT", vm, "snapshot")
        if source["is_a_template"]:
            raise XapiError("VM_IS_TEMPLATE", vm, "snapshot")
        disks = [(vbd, vdi) for vbd, vdi in _disks(host, source) if vdi not in ignore_vdis]
        _check_room(host, [(vdi, str(store.get("VDI", vdi)["SR"])) for _, vdi in disks])
        now = host.now()
        new_vm = new_vm_like(host, vm, source, new_name, snapshot=True)
        store.update(
            "VM",
            new_vm,
            is_a_template=True,
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


def _check_room(host: SimHost, copies: list[tuple[str, str]]) -> None:
    """Every copy (disk, target SR) fits, before any is made: a copy or snapshot that
    fails leaves nothing behind (``SR_FULL [needed, free]``)."""
    needed: dict[str, int] = {}
    for vdi, target in copies:
        needed[target] = needed.get(target, 0) + int(str(host.store.get("VDI", vdi)["virtual_size"]))
    for target, size in needed.items():
        if size > host.sr_free(target):
            raise XapiError("SR_FULL", str(size), str(host.sr_free(target)))


def _disks(host: SimHost, record: dict[str, object]) -> list[tuple[str, str]]:
    """(VBD, VDI) of the VM's disks, CD drives aside."""
    out = []
    for vbd in cast("list[str]", record["VBDs"]):
        vbd_record = host.store.get("VBD", vbd)
        vdi = str(vbd_record["VDI"])
        if vbd_record["type"] == "Disk" and vdi != NULL_REF and host.store.exists("VDI", vdi):
            out.append((vbd, vdi))
    return out


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
    attach_like(host, host.store.get("VBD", vbd), new_vm, vdi, False)


def _copy_other_devices(host: SimHost, source: dict[str, object], new_vm: str, disks: list[tuple[str, str]]) -> None:
    """The CD drives (with their disc, if any) and the network interfaces."""
    store = host.store
    copied = {vbd for vbd, _ in disks}
    for vbd in cast("list[str]", source["VBDs"]):
        old = store.get("VBD", vbd)
        if vbd in copied or old["type"] != "CD":
            continue
        attach_like(host, old, new_vm, str(old["VDI"]), bool(old["empty"]))
    copy_vifs(host, source, new_vm)


def _media_changeable(host: SimHost, record: dict[str, object]) -> None:
    """A CD's disc changes while its VM is halted or running, not suspended or paused."""
    vm = str(record["VM"])
    state = str(host.store.get("VM", vm)["power_state"])
    if state not in ("Halted", "Running"):
        raise bad_power_state(vm, "running", state.lower())


def insert(host: SimHost, vbd: str, vdi: str) -> None:
    store = host.store
    with store.lock:
        record = store.get("VBD", vbd)
        store.get("VDI", vdi)
        _media_changeable(host, record)
        if record["type"] != "CD":
            raise XapiError("VBD_NOT_REMOVABLE_MEDIA", vbd)
        if not record["empty"]:
            raise XapiError("VBD_NOT_EMPTY", vbd)
        store.update("VBD", vbd, VDI=vdi, empty=False)


def eject(host: SimHost, vbd: str) -> None:
    store = host.store
    with store.lock:
        record = store.get("VBD", vbd)
        _media_changeable(host, record)
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
        if any(store.get("VBD", vbd)["currently_attached"] for vbd in cast("list[str]", record["VBDs"])):
            raise XapiError("VDI_IN_USE", vdi, "resize")  # a running VM's disk grows with resize_online only
        grow = size - current
        if grow > host.sr_free(sr):
            raise XapiError("SR_FULL", str(grow), str(host.sr_free(sr)))
        physical = int(str(record["physical_utilisation"])) + grow
        store.update("VDI", vdi, virtual_size=str(size), physical_utilisation=str(physical))
        host.refresh_sr_usage(sr)
