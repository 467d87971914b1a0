"""What third-party clients call beyond dynvm's own path, through the XenAPI SDK: a full
copy (``VM.copy``), a snapshot, pause, a CD's disc, a disk that grows, the old event API
(``event.register``/``event.next``), and xapi's answers to a filter it cannot read."""

from __future__ import annotations

import threading

import pytest
import XenAPI

from .simtools import login, new_vm


def disks(xapi, vm: str) -> list[str]:
    return [xapi.VBD.get_VDI(b) for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "Disk"]


def test_copy_makes_a_full_copy_on_the_sr_asked_for_and_it_boots(xapi):
    source = new_vm(xapi, "original")
    [sr] = xapi.SR.get_by_name_label("Local Storage 01")
    free = int(xapi.SR.get_physical_size(sr)) - int(xapi.SR.get_physical_utilisation(sr))
    copy = xapi.VM.copy(source, "copied", sr)
    [old], [new] = disks(xapi, source), disks(xapi, copy)
    assert new != old
    assert xapi.VDI.get_virtual_size(new) == xapi.VDI.get_virtual_size(old)
    assert xapi.VDI.get_SR(new) == sr
    used = free - (int(xapi.SR.get_physical_size(sr)) - int(xapi.SR.get_physical_utilisation(sr)))
    assert used == int(xapi.VDI.get_virtual_size(new))  # a full copy costs its full size
    assert "copy" in xapi.VM.get_allowed_operations(copy)
    xapi.VM.start(copy, False, False)
    assert xapi.VM.get_power_state(copy) == "Running"
    with pytest.raises(XenAPI.Failure) as failure:  # a running VM is not copied
        xapi.VM.copy(copy, "again", sr)
    assert failure.value.details[:3] == ["VM_BAD_POWER_STATE", copy, "halted"]


def test_a_template_copied_stays_a_template(xapi):
    [template] = xapi.VM.get_by_name_label("tmpl-cnt7.7")
    copy = xapi.VM.copy(template, "tmpl-copy", "OpaqueRef:NULL")
    assert xapi.VM.get_is_a_template(copy) is True
    assert "provision" in xapi.VM.get_allowed_operations(copy)


def test_a_snapshot_of_a_running_vm_is_a_template_with_disks_of_its_own(xapi):
    vm = new_vm(xapi, "snapped", start=True)
    snap = xapi.VM.snapshot(vm, "before upgrade")
    record = xapi.VM.get_record(snap)
    assert (record["is_a_snapshot"], record["is_a_template"], record["snapshot_of"]) == (True, True, vm)
    assert xapi.VM.get_snapshots(vm) == [snap]
    [original], [copy] = disks(xapi, vm), disks(xapi, snap)
    assert xapi.VDI.get_is_a_snapshot(copy) is True
    assert xapi.VDI.get_snapshot_of(copy) == original
    bare = xapi.VM.snapshot(vm, "no disks", [original])  # ignore_vdis, the parameter added later
    assert disks(xapi, bare) == []


def test_pause_and_unpause_keep_the_vm_where_it_runs(xapi):
    vm = new_vm(xapi, "paused", start=True)
    host = xapi.VM.get_resident_on(vm)
    xapi.VM.pause(vm)
    assert xapi.VM.get_power_state(vm) == "Paused"
    assert set(xapi.VM.get_allowed_operations(vm)) == {"unpause", "hard_shutdown", "snapshot"}
    assert xapi.VM.get_resident_on(vm) == host
    xapi.VM.unpause(vm)
    assert xapi.VM.get_power_state(vm) == "Running"
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.unpause(vm)
    assert failure.value.details[0] == "VM_BAD_POWER_STATE"


def test_a_cd_drive_takes_and_gives_back_a_disc(xapi):
    vm = new_vm(xapi, "cd")
    [cd] = [b for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "CD"]
    [iso] = xapi.VDI.get_by_name_label("guest-tools.iso")
    xapi.VBD.insert(cd, iso)
    assert (xapi.VBD.get_VDI(cd), xapi.VBD.get_empty(cd)) == (iso, False)
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VBD.insert(cd, iso)
    assert failure.value.details == ["VBD_NOT_EMPTY", cd]
    xapi.VBD.eject(cd)
    assert xapi.VBD.get_empty(cd) is True
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VBD.eject(cd)
    assert failure.value.details == ["VBD_IS_EMPTY", cd]
    [disk] = [b for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "Disk"]
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VBD.eject(disk)
    assert failure.value.details == ["VBD_NOT_REMOVABLE_MEDIA", disk]


def test_a_disk_grows_and_never_shrinks(xapi):
    [disk] = disks(xapi, new_vm(xapi, "grows"))
    size = int(xapi.VDI.get_virtual_size(disk))
    xapi.VDI.resize(disk, str(size * 2))
    assert int(xapi.VDI.get_virtual_size(disk)) == size * 2
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VDI.resize(disk, str(size))
    assert failure.value.details[0] == "VDI_TOO_SMALL"


def test_event_next_tells_a_registered_session_what_changed(xapi, node):
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.event.next()
    assert failure.value.details[0] == "SESSION_NOT_REGISTERED"
    xapi.event.register(["VM"])
    found: list = []
    reader = threading.Thread(target=lambda: found.extend(xapi.event.next()))
    reader.start()
    vm = new_vm(login(node).xenapi, "seen")  # another session makes the change
    reader.join(timeout=10)
    assert any(e["class"] == "vm" and e["ref"] == vm and e["operation"] == "add" for e in found)


def test_a_filter_on_a_field_the_class_lacks_is_xapis_internal_error(xapi):
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.get_all_records_where('field "no_such_field" = "x"')
    assert failure.value.details == ["INTERNAL_ERROR", "missing field", "no_such_field", ""]
    assert xapi.VM.get_all_records_where('field "name__label" = "nothing by that name"') == {}
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.get_all_records_where('field "name_label" = ')
    assert failure.value.details[0] == "INVALID_VALUE"


def test_a_clone_of_a_snapshot_is_a_vm_of_its_own_and_xapis_refusals_hold(xapi):
    vm = new_vm(xapi, "base", start=True)
    snap = xapi.VM.snapshot(vm, "base snap")
    assert xapi.VM.get_parent(vm) == snap  # the VM's parent becomes its newest snapshot
    clone = xapi.VM.clone(snap, "from snapshot")
    record = xapi.VM.get_record(clone)
    assert (record["is_a_snapshot"], record["snapshot_of"], record["parent"]) == (
        False,
        "OpaqueRef:NULL",
        "OpaqueRef:NULL",
    )
    assert xapi.VM.get_snapshots(vm) == [snap]
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.snapshot(snap, "again")
    assert failure.value.details == ["VM_IS_SNAPSHOT", snap, "snapshot"]
    [template] = xapi.VM.get_by_name_label("tmpl-cnt7.7")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.snapshot(template, "nope")
    assert failure.value.details == ["VM_IS_TEMPLATE", template, "snapshot"]
    [disk] = disks(xapi, vm)
    with pytest.raises(XenAPI.Failure) as failure:  # a running VM's disk grows only online
        xapi.VDI.resize(disk, str(int(xapi.VDI.get_virtual_size(disk)) * 2))
    assert failure.value.details == ["VDI_IN_USE", disk, "resize"]


def test_a_snapshot_that_does_not_fit_leaves_nothing(node, xapi):
    from dynvm.sim.control import SimControlClient

    vm = new_vm(xapi, "big")
    before = (set(xapi.VM.get_all()), set(xapi.VDI.get_all()))
    SimControlClient(node.url + "/", node.host.spec.password).set_sr_free("0")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.snapshot(vm, "too big")
    assert failure.value.details[0] == "SR_FULL"
    assert (set(xapi.VM.get_all()), set(xapi.VDI.get_all())) == before
