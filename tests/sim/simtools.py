"""Helpers for tests that drive the simulator through the XenAPI SDK."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import XenAPI

from dynvm.sim.node import HostNode


def login(node: HostNode) -> XenAPI.Session:
    session = XenAPI.Session(node.url)
    session.xenapi.login_with_password("root", node.host.spec.password, "2.21", "dynvm-tests")
    return session


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> object:
    """Poll until ``predicate`` returns something truthy; fail the test on time-out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


def guest_ip(xapi, vm: str) -> str | None:
    metrics = xapi.VM.get_guest_metrics(vm)
    if metrics == "OpaqueRef:NULL":
        return None
    return xapi.VM_guest_metrics.get_networks(metrics).get("0/ip")


def new_vm(xapi, name: str, template: str = "tmpl-cnt7.7", start: bool = False) -> str:
    """Clone + provision (+ start) the way dynvm does it, disks on the local SR."""
    source = xapi.VM.get_by_name_label(template)[0]
    vm = xapi.VM.clone(source, name)
    sr = next(s for s in xapi.SR.get_all() if xapi.SR.get_content_type(s) != "iso")
    other = xapi.VM.get_other_config(vm)
    other["disks"] = other["disks"].replace('sr=""', f'sr="{xapi.SR.get_uuid(sr)}"')
    xapi.VM.set_other_config(vm, other)
    xapi.VM.provision(vm)
    if start:
        xapi.VM.start(vm, False, False)
    return vm
