"""The simulator's object model and message table, checked against xapi's own published
data model (../shared/xapi/xenapi.json), so that nothing rests on memory."""

from __future__ import annotations

import xmlrpc.client

import pytest

from dynvm.sim.api import XapiApi
from dynvm.sim.node import HostNode
from dynvm.sim.schema import FieldType, schema

from ..conftest import RUN_ID
from .simtools import guest_ip, login, new_vm, wait_for

ACCESS = {"RW": "w", "RO/constructor": "c", "RO/runtime": "r"}
# Real xapi messages that the published model leaves out (hidden from the docs).
UNDOCUMENTED = {"get_all_records_where"}


def test_every_modelled_class_has_exactly_xapis_fields_types_and_access(xenapi_model):
    for name, cls in schema().items():
        published = {f["name"]: f for f in xenapi_model[name]["fields"]}
        assert set(cls.fields) == set(published), name
        for field in cls.fields.values():
            spec = published[field.name]
            assert field.type == FieldType.parse(spec["type"]), f"{name}.{field.name}"
            assert field.access == ACCESS[spec["qualifier"]], f"{name}.{field.name}"


def test_every_implemented_message_is_xapis_with_its_parameter_count(node: HostNode, xenapi_model):
    for message in XapiApi(node.host).messages.values():
        cls, _, name = message.name.partition(".")
        if name in UNDOCUMENTED:
            continue
        published = {m["name"]: m for m in xenapi_model[cls]["messages"]}
        assert name in published, message.name
        wire_count = message.params + message.optional + (1 if message.needs_session else 0)
        assert wire_count == len(published[name]["params"]), message.name
        optional = sum(1 for p in published[name]["params"] if not p["required"])
        assert message.optional == optional, message.name  # what later releases added, a caller may leave out


def test_every_generated_accessor_of_a_modelled_class_is_implemented(node: HostNode, xenapi_model):
    implemented = set(XapiApi(node.host).messages)
    missing = [
        f"{cls}.{m['name']}"
        for cls in schema()
        for m in xenapi_model[cls]["messages"]
        if m["implicit"] and f"{cls}.{m['name']}" not in implemented
    ]
    assert missing == []


def _enum_values(xenapi_model) -> dict[str, set[str]]:
    return {e["name"]: {v["name"] for v in e["values"]} for c in xenapi_model.values() for e in c["enums"]}


def _check_wire_value(where: str, ftype: FieldType, value: object, enums: dict[str, set[str]]) -> None:
    match ftype.kind:
        case "int":
            assert isinstance(value, str), f"{where}: int64 must travel as a decimal string, got {value!r}"
            int(value)
        case "float":
            assert isinstance(value, float), where
        case "bool":
            assert isinstance(value, bool), where
        case "datetime":
            assert isinstance(value, xmlrpc.client.DateTime), where
        case "ref":
            assert isinstance(value, str), where
            assert value.startswith("OpaqueRef:"), where
        case "string":
            assert isinstance(value, str), where
        case "enum":
            assert value in enums[ftype.name], f"{where}: {value!r} is not a {ftype.name}"
        case "set":
            assert isinstance(value, list), where
            for item in value:
                _check_wire_value(where, ftype.item, item, enums)
        case "map":
            assert isinstance(value, dict), where
            for key, item in value.items():
                assert isinstance(key, str), where
                if ftype.key.kind == "enum":
                    assert key in enums[ftype.key.name], where
                _check_wire_value(where, ftype.item, item, enums)
        case _:
            pytest.fail(f"{where}: unexpected type {ftype}")


@pytest.mark.parametrize("pool_size", [1, 3], ids=["one-host", "pool-of-3"])
def test_records_on_the_wire_have_xapis_types_and_enum_values(make_lab, xenapi_model, pool_size):
    node = make_lab(foreign_vms=2, pool_size=pool_size).nodes[0]
    session = login(node)
    xapi = session.xenapi
    vm = new_vm(xapi, "typed", "tmpl-win16dc - PATCHED (1)", start=True)
    wait_for(lambda: guest_ip(xapi, vm))
    xapi.Async.VM.clone(xapi.VM.get_by_name_label("tmpl-oel8")[0], "with-task")
    enums = _enum_values(xenapi_model)
    seen = set()
    for name, cls in schema().items():
        if name == "session":
            records = [xapi.session.get_record(session.handle)]
        else:
            records = list(getattr(xapi, name).get_all_records().values())
        for record in records:
            assert set(record) == set(cls.fields), name
            for field in cls.fields.values():
                _check_wire_value(f"{name}.{field.name}", field.type, record[field.name], enums)
            seen.add(name)
    assert seen == set(schema()), "every modelled class must have been checked on at least one record"


XENSERVER_RELEASES = {"ely": (7, 1), "falcon": (7, 2), "inverness": (7, 3), "jura": (7, 4), "kolkata": (7, 5)}


def test_the_releases_of_messages_older_hosts_lack_match_xapis_datamodel(xenapi_model):
    from dynvm.sim.settings import INTRODUCED_IN

    for method, version in INTRODUCED_IN.items():
        cls, name = method.split(".")
        [message] = [m for m in xenapi_model[cls]["messages"] if m["name"] == name]
        published = [t["release"] for t in message["lifecycle"]["transitions"] if t["transition"] == "published"]
        assert XENSERVER_RELEASES[published[0]] == version, method


def test_an_older_host_does_not_know_the_newer_messages(make_lab):
    import XenAPI

    from .simtools import login, new_vm

    old = login(make_lab(xenserver_version=(7, 0)).nodes[0]).xenapi
    [host] = old.host.get_all()
    assert old.host.get_software_version(host)["product_version"] == "7.0.1"
    vm = new_vm(old, "legacy")
    with pytest.raises(XenAPI.Failure) as failure:
        old.VM.set_memory(vm, str(2 * 1024**3))
    assert failure.value.details == ["MESSAGE_METHOD_UNKNOWN", "VM.set_memory"]
    with pytest.raises(XenAPI.Failure) as failure:
        old.VIF.move(old.VM.get_VIFs(vm)[0], old.network.get_all()[0])
    assert failure.value.details == ["MESSAGE_METHOD_UNKNOWN", "VIF.move"]
    assert {"VIF.move", "VM.set_memory"}.isdisjoint(old.host.list_methods())


def test_which_xapi_messages_are_served_per_class(node: HostNode, xenapi_model, request):
    """The coverage of xapi's messages, per class the simulator models: printed at the end
    of the run (tests/conftest.py), so that a reader sees what is served and what is not."""
    served = set(XapiApi(node.host).messages)
    rows = []
    for cls in sorted({name.partition(".")[0] for name in served}):
        if cls not in xenapi_model:
            continue
        published = {m["name"] for m in xenapi_model[cls]["messages"]}
        explicit = {m["name"] for m in xenapi_model[cls]["messages"] if not m.get("implicit")}
        mine = {name.partition(".")[2] for name in served if name.startswith(f"{cls}.")} & published
        rows.append((cls, len(mine), len(published), len(mine & explicit), len(explicit)))
        assert mine, cls
    request.config.cache.set("dynvm/xapi-coverage", {"rows": rows, "run": request.config.stash[RUN_ID]})
    assert {row[0] for row in rows} >= {"VM", "VDI", "VBD", "VIF", "SR", "host", "task", "session", "event"}
