"""xapi's wire protocol: envelopes, sessions and protocol-level errors, seen by the SDK and
by a bare XML-RPC client."""

from __future__ import annotations

import xmlrpc.client

import pytest
import XenAPI

from dynvm.sim.node import HostNode

from .simtools import login


def raw(node: HostNode) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(node.url, allow_none=True)


def test_login_with_the_right_password_gives_an_opaque_session_ref(node: HostNode):
    session = login(node)
    assert session.handle.startswith("OpaqueRef:")
    record = session.xenapi.session.get_record(session.handle)
    assert record["this_host"] == session.xenapi.host.get_all()[0]
    assert record["originator"] == "dynvm-tests"


def test_login_with_a_wrong_password_is_refused_with_xapis_error(node: HostNode):
    session = XenAPI.Session(node.url)
    with pytest.raises(XenAPI.Failure) as failure:
        session.xenapi.login_with_password("root", "not-the-password", "2.21", "test")
    assert failure.value.details == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]


def test_login_accepts_the_two_argument_form_old_clients_send(node: HostNode):
    answer = raw(node).session.login_with_password("root", node.host.spec.password)
    assert answer["Status"] == "Success"


def test_answers_on_any_path_with_status_and_value(node: HostNode):
    proxy = xmlrpc.client.ServerProxy(node.url + "/some/where/RPC2", allow_none=True)
    answer = proxy.session.login_with_password("root", node.host.spec.password, "1.0", "x")
    assert set(answer) == {"Status", "Value"}


def test_a_call_with_a_dead_session_fails_with_session_invalid(node: HostNode):
    answer = raw(node).VM.get_all("OpaqueRef:00000000-0000-0000-0000-000000000000")
    assert answer == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:00000000-0000-0000-0000-000000000000"],
    }


def test_logout_ends_the_session(node: HostNode):
    proxy = raw(node)
    ref = proxy.session.login_with_password("root", node.host.spec.password, "1.0", "x")["Value"]
    assert proxy.session.logout(ref)["Status"] == "Success"
    assert proxy.VM.get_all(ref)["ErrorDescription"] == ["SESSION_INVALID", ref]


def test_unknown_method_and_wrong_parameter_count_use_xapis_codes(xapi):
    with pytest.raises(XenAPI.Failure) as unknown:
        xapi.VM.teleport("OpaqueRef:NULL")
    assert unknown.value.details == ["MESSAGE_METHOD_UNKNOWN", "VM.teleport"]
    with pytest.raises(XenAPI.Failure) as count:
        xapi.VM.get_name_label()
    # counted as xapi's generated server counts: the session in neither figure
    assert count.value.details == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_name_label", "1", "0"]
    with pytest.raises(XenAPI.Failure) as count:
        xapi.VM.start("OpaqueRef:NULL")
    assert count.value.details == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]


def test_unknown_refs_and_uuids_name_their_class(xapi):
    with pytest.raises(XenAPI.Failure) as handle:
        xapi.VM.get_record("OpaqueRef:nope")
    assert handle.value.details == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]
    with pytest.raises(XenAPI.Failure) as uuid:
        xapi.SR.get_by_uuid("00000000-0000-0000-0000-000000000000")
    assert uuid.value.details == ["UUID_INVALID", "SR", "00000000-0000-0000-0000-000000000000"]


def test_int64_fields_travel_as_decimal_strings(node: HostNode, xapi):
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    body = xmlrpc.client.dumps((login(node).handle, template), "VM.get_memory_static_max", allow_none=True).encode()
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(node.url, body, {"Content-Type": "text/xml"})) as reply:
        text = reply.read().decode()
    assert "<string>4294967296</string>" in text or "<value>4294967296</value>" in text
    assert "<int>" not in text
    assert "<i4>" not in text


def test_integer_arguments_are_accepted_as_strings_or_ints(xapi):
    from .simtools import new_vm

    vm = new_vm(xapi, "ints")
    xapi.VM.set_VCPUs_max(vm, "6")
    xapi.VM.set_VCPUs_at_startup(vm, 6)
    assert xapi.VM.get_VCPUs_at_startup(vm) == "6"


def test_session_expiry_is_invisible_to_sdk_callers_who_log_in_again(node: HostNode, ctl):
    session = login(node)
    first = session.handle
    assert ctl.invalidate_sessions() >= 1
    # The SDK sees SESSION_INVALID, logs in with the remembered credentials and retries.
    assert len(session.xenapi.host.get_all()) == 1
    assert session.handle != first


def test_get_servertime_and_list_methods_are_answered(xapi):
    host = xapi.host.get_all()[0]
    assert isinstance(xapi.host.get_servertime(host), xmlrpc.client.DateTime)
    methods = xapi.host.list_methods()
    assert "VM.clone" in methods
    assert "event.from" in methods
