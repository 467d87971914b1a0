"""Faults switched on through the ``sim.*`` control interface while the lab runs."""

from __future__ import annotations

import socket
import time
import xmlrpc.client

import pytest
import XenAPI

from dynvm.sim.control import SimControlClient
from dynvm.sim.errors import XapiError

from .simtools import guest_ip, login, new_vm, wait_for


def test_control_calls_need_the_host_password(node):
    wrong = SimControlClient(node.url + "/", "guess")
    with pytest.raises(XapiError) as failure:
        wrong.status()
    assert failure.value.code == "SESSION_AUTHENTICATION_FAILED"


def test_status_reports_the_host(ctl, node):
    status = ctl.status()
    assert status["name"] == "sim-xen-01"
    assert status["down"] == ""
    assert status["dhcp_free"] == 253  # 127.77.0.2 - 127.77.0.254


def test_next_boots_get_apipa_only(xapi, ctl):
    ctl.apipa_next(2)
    apipa = [new_vm(xapi, f"apipa{n}", start=True) for n in range(2)]
    normal = new_vm(xapi, "normal", start=True)
    for vm in apipa:
        assert wait_for(lambda vm=vm: guest_ip(xapi, vm)).startswith("169.254.")
    assert wait_for(lambda: guest_ip(xapi, normal)).startswith("127.77.")
    assert ctl.status()["faults"]["apipa_next"] == 0


def test_an_apipa_rate_of_one_means_every_boot(make_lab):
    node = make_lab(apipa_rate=1.0).nodes[0]
    xapi = login(node).xenapi
    vm = new_vm(xapi, "unlucky", start=True)
    assert wait_for(lambda: guest_ip(xapi, vm)).startswith("169.254.")


def test_an_exhausted_dhcp_pool_gives_apipa(xapi, ctl):
    ctl.dhcp_exhausted(True)
    vm = new_vm(xapi, "nolease", start=True)
    assert wait_for(lambda: guest_ip(xapi, vm)).startswith("169.254.")
    ctl.dhcp_exhausted(False)
    xapi.VM.hard_shutdown(vm)
    xapi.VM.start(vm, False, False)
    assert wait_for(lambda: guest_ip(xapi, vm)).startswith("127.77.")


def test_addresses_are_leased_and_returned(xapi, ctl):
    before = ctl.status()["dhcp_free"]
    vm = new_vm(xapi, "leased", start=True)
    ip = wait_for(lambda: guest_ip(xapi, vm))
    assert ctl.status()["dhcp_free"] == before - 1
    xapi.VM.hard_shutdown(vm)
    assert ctl.status()["dhcp_free"] == before
    assert ip.startswith("127.77.0.")


def test_clone_and_start_fail_on_request_with_the_given_code(xapi, ctl):
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    ctl.fail_next("clone", "SR_BACKEND_FAILURE_44", 1)
    with pytest.raises(XenAPI.Failure) as clone_failure:
        xapi.VM.clone(template, "x")
    assert clone_failure.value.details == ["SR_BACKEND_FAILURE_44", template]
    vm = new_vm(xapi, "y")  # the fault was for one call only
    ctl.fail_next("start", "BOOTLOADER_FAILED", 2)
    for _ in range(2):
        with pytest.raises(XenAPI.Failure) as start_failure:
            xapi.VM.start(vm, False, False)
        assert start_failure.value.details[0] == "BOOTLOADER_FAILED"
    xapi.VM.start(vm, False, False)


def test_a_full_sr_refuses_new_disks(xapi, ctl):
    assert ctl.set_sr_free("1073741824") == "1073741824"
    template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
    vm = xapi.VM.clone(template, "nospace")
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.provision(vm)
    assert failure.value.details == ["SR_FULL", str(35 * 1024**3), "1073741824"]
    ctl.set_sr_free("-1")
    xapi.VM.provision(vm)


def test_a_hung_host_accepts_but_never_answers(node, ctl, lab):
    ctl.host_down("hang")
    proxy = xmlrpc.client.ServerProxy(node.url, transport=ImpatientTransport())
    with pytest.raises(TimeoutError):
        proxy.session.login_with_password("root", node.host.spec.password)
    assert ctl.status()["down"] == "hang"  # the control interface still answers
    ctl.host_up()
    assert login(node).handle.startswith("OpaqueRef:")


class ImpatientTransport(xmlrpc.client.Transport):
    """Gives up after half a second, as a client with a socket time-out does."""

    def make_connection(self, host):  # type: ignore[override]
        connection = super().make_connection(host)
        connection.timeout = 0.5
        return connection


def test_a_refusing_host_closes_its_port_until_brought_back(node, ctl, lab):
    ctl.host_down("refuse")
    wait_for(lambda: _refused(node.endpoint.port), timeout=5)
    control = SimControlClient(lab.control_endpoint.url + "/", node.host.spec.password)
    assert control.status()["down"] == "refuse"
    control.host_up()
    assert login(node).handle.startswith("OpaqueRef:")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # caught in the backlog as the port closed: look again
        return False
    return False


def test_timing_changes_take_effect_at_once(xapi, ctl):
    ctl.set_timing({"latency_ms": 200})
    started = time.monotonic()
    xapi.VM.get_all()
    assert time.monotonic() - started >= 0.2
    ctl.set_timing({"latency_ms": 0})


def test_foreign_vms_run_with_addresses_and_no_marker(make_lab, ctl):
    node = make_lab(foreign_vms=3).nodes[0]
    xapi = login(node).xenapi
    foreign = xapi.VM.get_all_records_where('field "power_state" = "Running" and field "is_control_domain" = "false"')
    assert len(foreign) == 3
    for ref, record in foreign.items():
        assert guest_ip(xapi, ref).startswith("127.77.")
        assert not any(key.startswith("dynvm") for key in record["other_config"])
    added = SimControlClient(node.url + "/", node.host.spec.password).add_foreign_vm("job7", "windows", False)
    assert xapi.VM.get_name_label(added) == "job7"
    assert xapi.VM.get_power_state(added) == "Halted"


def test_reset_clears_faults(ctl):
    ctl.apipa_next(5)
    ctl.fail_next("start", "INTERNAL_ERROR", 3)
    ctl.reset()
    faults = ctl.status()["faults"]
    assert faults["apipa_next"] == 0
    assert faults["fail_next"] == {}


def test_bad_control_arguments_say_what_is_wrong(ctl):
    with pytest.raises(XapiError) as failure:
        ctl.fail_next("teleport", "INTERNAL_ERROR", 1)
    assert failure.value.code == "SIM_BAD_ARGUMENT"
    assert "clone" in failure.value.params[0]


def test_a_built_in_templates_disks_name_no_sr_and_xapi_takes_none(xapi):
    """xe fills sr="" in on the client side; xapi itself answers UUID_INVALID (and
    Ansible's xenserver_guest drops a built-in template's 'disks' for that reason)."""
    vm = xapi.VM.clone(xapi.VM.get_by_name_label("CentOS 7")[0], "from-builtin")
    assert 'sr=""' in xapi.VM.get_other_config(vm)["disks"]
    with pytest.raises(XenAPI.Failure) as failure:
        xapi.VM.provision(vm)
    assert failure.value.details == ["UUID_INVALID", "sr", ""]
