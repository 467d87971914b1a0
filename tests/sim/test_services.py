"""A booted guest's service (sshd, WinRM) is a real listening socket on its own address:
what dynvm's readiness probe connects to."""

from __future__ import annotations

import socket

from dynvm.sim.control import SimControlClient
from dynvm.sim.settings import Timing

from .simtools import guest_ip, login, new_vm, wait_for

SLOW_SERVICE = Timing(clone_seconds=0.01, boot_seconds=0.05, ip_seconds=0.05, service_seconds=0.6)


def answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_booted_guest_answers_on_its_service_port_a_while_after_its_address(make_lab):
    lab = make_lab(timing=SLOW_SERVICE)
    assert 1024 < lab.service_port < 65536  # a port any user can bind: no root needed
    xapi = login(lab.nodes[0]).xenapi
    vm = new_vm(xapi, "sshd", start=True)
    ip = wait_for(lambda: guest_ip(xapi, vm))
    assert ip.startswith("127.77.")
    assert not answers(ip, lab.service_port)  # the address comes first; sshd is still starting
    assert wait_for(lambda: answers(ip, lab.service_port), timeout=5)
    assert not answers(ip, lab.winrm_port)  # a Linux guest has no WinRM
    xapi.VM.hard_shutdown(vm)
    assert not answers(ip, lab.service_port)  # gone with its domain


def test_a_windows_guest_answers_on_the_winrm_port(make_lab):
    lab = make_lab()
    xapi = login(lab.nodes[0]).xenapi
    vm = new_vm(xapi, "winrm", template="tmpl-win16dc - PATCHED (1)", start=True)
    ip = wait_for(lambda: guest_ip(xapi, vm))
    assert wait_for(lambda: answers(ip, lab.winrm_port), timeout=5)
    assert not answers(ip, lab.service_port)


def test_a_service_fault_keeps_the_port_closed_though_the_address_is_there(make_lab):
    lab = make_lab()
    node = lab.nodes[0]
    xapi = login(node).xenapi

    ctl = SimControlClient(lab.control_endpoint.url + "/", node.host.spec.password)
    ctl.service_never_next(1)
    broken = new_vm(xapi, "broken", start=True)
    fine = new_vm(xapi, "fine", start=True)
    broken_ip = wait_for(lambda: guest_ip(xapi, broken))
    fine_ip = wait_for(lambda: guest_ip(xapi, fine))
    assert wait_for(lambda: answers(fine_ip, lab.service_port), timeout=5)
    assert not answers(broken_ip, lab.service_port)
    ctl.service_never(True)
    later = new_vm(xapi, "later", start=True)
    later_ip = wait_for(lambda: guest_ip(xapi, later))
    assert wait_for(lambda: answers(fine_ip, lab.service_port))
    assert not answers(later_ip, lab.service_port)
    assert ctl.status()["faults"]["service_never"] is True


def test_labs_side_by_side_pick_different_ports(make_lab):
    first, second = make_lab(), make_lab()
    assert first.service_port != second.service_port  # their guests share 127.77.x.y addresses
