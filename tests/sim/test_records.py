"""Generated accessors: records, lookups, getters, setters and map/set edits."""

from __future__ import annotations

import pytest
import XenAPI

from .simtools import new_vm


def test_get_all_records_and_get_record_agree(xapi):
    records = xapi.VM.get_all_records()
    for ref, record in records.items():
        assert xapi.VM.get_record(ref) == record
    names = {r["name_label"] for r in records.values()}
    assert {"tmpl-cnt7.7", "tmpl-win16dc - PATCHED (1)", "tmpl-suse15"} <= names
    assert sum(1 for r in records.values() if r["is_control_domain"]) == 1


def test_lookups_by_uuid_and_name_label(xapi):
    template = xapi.VM.get_by_name_label("tmpl-cnt8.0")
    assert len(template) == 1
    assert xapi.VM.get_by_uuid(xapi.VM.get_uuid(template[0])) == template[0]
    assert xapi.VM.get_by_name_label("no such VM") == []
    assert xapi.SR.get_by_name_label("Local Storage 01")


def test_get_all_records_where_filters_like_xapis_database(xapi, make_lab):
    running = xapi.VM.get_all_records_where('field "power_state" = "Running" and field "is_control_domain" = "false"')
    assert running == {}
    templates = xapi.VM.get_all_records_where('field "is_a_template" = "true"')
    ci = [r for r in templates.values() if not r["is_default_template"] and not r["is_a_snapshot"]]
    assert len(ci) == 7  # dynvm's OS templates; beside them, the host's built-ins and two snapshots
    builtin = [r for r in templates.values() if r["is_default_template"]]
    assert len(builtin) >= 20
    assert all(r["other_config"]["default_template"] == "true" and r["VBDs"] == [] for r in builtin)
    snapshots = [r for r in templates.values() if r["is_a_snapshot"]]
    assert sorted(r["name_label"] for r in snapshots) == [
        "tmpl-cnt7.7 before patch",
        "tmpl-win16dc - PATCHED (1) before KB5005043",
    ]
    for snap in snapshots:
        assert xapi.VM.get_snapshots(snap["snapshot_of"]) == [
            ref for ref, r in templates.items() if r["uuid"] == snap["uuid"]
        ]
    # the database spelling of namespaced fields works too
    named = xapi.VM.get_all_records_where('field "name__label" = "tmpl-oel8" or field "name_label" = "tmpl-suse15"')
    assert sorted(r["name_label"] for r in named.values()) == ["tmpl-oel8", "tmpl-suse15"]
    negated = xapi.VM.get_all_records_where('not (field "is_a_template" = "true")')
    assert all(not r["is_a_template"] for r in negated.values())


def test_setters_change_writable_fields_and_bump_nothing_else(xapi):
    vm = new_vm(xapi, "setter")
    before = xapi.VM.get_record(vm)
    xapi.VM.set_name_description(vm, "changed")
    after = xapi.VM.get_record(vm)
    assert after["name_description"] == "changed"
    assert {k for k in before if before[k] != after[k]} == {"name_description"}


def test_read_only_fields_have_no_setter(xapi):
    vm = new_vm(xapi, "readonly")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.set_power_state(vm, "Running")
    assert failure.value.details[0] == "MESSAGE_METHOD_UNKNOWN"


def test_map_edits_and_duplicate_keys(xapi):
    vm = new_vm(xapi, "maps")
    xapi.VM.add_to_other_config(vm, "dynvm_lease", "lease-1")
    assert xapi.VM.get_other_config(vm)["dynvm_lease"] == "lease-1"
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.add_to_other_config(vm, "dynvm_lease", "lease-2")
    assert failure.value.details == ["MAP_DUPLICATE_KEY", "VM", "other_config", vm, "dynvm_lease"]
    xapi.VM.remove_from_other_config(vm, "dynvm_lease")
    xapi.VM.remove_from_other_config(vm, "dynvm_lease")  # removing a missing key is no error
    assert "dynvm_lease" not in xapi.VM.get_other_config(vm)


def test_set_edits_and_field_type_errors(xapi):
    vm = new_vm(xapi, "sets")
    xapi.VM.add_tags(vm, "ci")
    xapi.VM.add_tags(vm, "ci")
    assert xapi.VM.get_tags(vm) == ["ci"]
    xapi.VM.remove_tags(vm, "ci")
    assert xapi.VM.get_tags(vm) == []
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.set_VCPUs_max(vm, "many")
    assert failure.value.details == ["FIELD_TYPE_ERROR", "value"]


def test_relations_are_kept_on_both_sides(xapi):
    vm = new_vm(xapi, "relations", start=True)
    host = xapi.host.get_all()[0]
    assert vm in xapi.host.get_resident_VMs(host)
    for vbd in xapi.VM.get_VBDs(vm):
        assert xapi.VBD.get_VM(vbd) == vm
        vdi = xapi.VBD.get_VDI(vbd)
        if vdi != "OpaqueRef:NULL":
            assert vbd in xapi.VDI.get_VBDs(vdi)
    for vif in xapi.VM.get_VIFs(vm):
        assert vif in xapi.network.get_VIFs(xapi.VIF.get_network(vif))


def test_host_reports_its_size_as_dynvm_reads_it(xapi):
    host = xapi.host.get_all()[0]
    record = xapi.host.get_record(host)
    assert record["cpu_info"]["cpu_count"] == "32"
    assert len(record["host_CPUs"]) == 32
    metrics = xapi.host_metrics.get_record(record["metrics"])
    assert metrics["memory_total"] == str(128 * 1024**3)
    dom0 = record["control_domain"]
    overhead = int(record["memory_overhead"])  # Xen's own share, growing with the host's memory
    assert 4 * 1024**3 < overhead < 5 * 1024**3
    assert int(metrics["memory_free"]) == 128 * 1024**3 - overhead - int(xapi.VM.get_memory_static_max(dom0))
    pif = next(p for p in record["PIFs"] if xapi.PIF.get_management(p))
    assert xapi.PIF.get_network(pif) in xapi.network.get_all()
    pool = xapi.pool.get_all()[0]
    assert xapi.pool.get_master(pool) == host
    assert xapi.SR.get_name_label(xapi.pool.get_default_SR(pool)) == "Local Storage 01"
