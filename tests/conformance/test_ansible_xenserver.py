"""A conformance suite of code nobody here wrote: Ansible's community.general XenServer
modules (installed from PyPI with the ``ansible`` package), run unmodified against
``dynvm sim`` over a real socket, each as Ansible runs a module — a process of its own
that reads its arguments from a JSON file. A test fails when the simulator answers
differently from what the modules expect of a real host (they fail, or report other
facts than the simulator holds, checked through the XenAPI SDK)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynvm.sim.settings import Timing

pytest.importorskip("ansible_collections.community.general", reason="the ansible package is not installed")

MODULES = "ansible_collections.community.general.plugins.modules"
QUICK = Timing(clone_seconds=0.01, boot_seconds=0.2, ip_seconds=0.1)


class Ansible:
    def __init__(self, lab, work: Path) -> None:  # type: ignore[no-untyped-def]
        self.node = lab.nodes[0]
        self.work = work
        self.calls = 0

    def run(self, module: str, **args: object) -> dict:  # type: ignore[type-arg]
        """Run one module as Ansible does and return its JSON result."""
        self.calls += 1
        args = {"hostname": self.node.url.removeprefix("http://")} | args  # the modules add http:// themselves
        args |= {
            "username": "root",
            "password": self.node.host.spec.password,
            "validate_certs": False,
        }
        path = self.work / f"args{self.calls}.json"
        path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
        done = subprocess.run(
            [sys.executable, "-m", f"{MODULES}.{module}", str(path)], capture_output=True, text=True, timeout=180
        )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"{module} did not answer JSON:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def ok(self, module: str, **args: object) -> dict:  # type: ignore[type-arg]
        result = self.run(module, **args)
        assert not result.get("failed"), f"{module} failed: {result.get('msg')}"
        return result


@pytest.fixture
def ansible(make_lab, tmp_path):  # type: ignore[no-untyped-def]
    lab = make_lab(timing=QUICK, foreign_vms=1)
    return Ansible(lab, tmp_path)


@pytest.fixture
def xapi(ansible):  # type: ignore[no-untyped-def]
    from ..sim.simtools import login

    return login(ansible.node).xenapi


def create(ansible, name: str = "ans1", **extra: object) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return ansible.ok(
        "xenserver_guest",
        name=name,
        template="tmpl-cnt7.7",
        linked_clone=True,
        state="present",
        name_desc="made by ansible",
        hardware={"num_cpus": 2, "num_cpu_cores_per_socket": 1, "memory_mb": 2048},
        **extra,
    )


def test_gather_facts_of_a_running_vm(ansible, xapi):
    [vm] = xapi.VM.get_by_name_label("jenkins-agent-01-001")
    facts = ansible.ok("xenserver_guest_info", name="jenkins-agent-01-001")["instance"]
    assert facts["state"] == "poweredon"
    assert facts["uuid"] == xapi.VM.get_uuid(vm)
    assert facts["hardware"] == {"num_cpus": 4, "num_cpu_cores_per_socket": 2, "memory_mb": 4096}
    [disk] = facts["disks"]
    assert (disk["os_device"], disk["vbd_userdevice"], disk["sr"]) == ("xvda", "0", "Local Storage 01")
    [nic] = facts["networks"]
    networks = xapi.VM_guest_metrics.get_networks(xapi.VM.get_guest_metrics(vm))
    assert nic["ip"] == networks["0/ip"]
    assert nic["ip6"] == [networks["0/ipv6/0"]]
    assert nic["mac"] == xapi.VIF.get_MAC(xapi.VM.get_VIFs(vm)[0])


def test_create_from_a_template_with_a_linked_clone_and_set_name_description_cpus_and_memory(ansible, xapi):
    result = create(ansible)
    assert result["changed"] is True
    facts = result["instance"]
    assert (facts["state"], facts["name_desc"]) == ("poweredoff", "made by ansible")
    assert facts["hardware"] == {"num_cpus": 2, "num_cpu_cores_per_socket": 1, "memory_mb": 2048}
    [vm] = xapi.VM.get_by_name_label("ans1")
    record = xapi.VM.get_record(vm)
    assert (record["VCPUs_max"], record["memory_static_max"]) == ("2", str(2048 * 1024**2))
    assert record["memory_overhead"] == str(20 * 1024**2)  # recomputed for 2 GiB and 2 vCPUs, as xapi does
    assert create(ansible)["changed"] is False  # the same again changes nothing


def test_power_on_waiting_for_an_ip_then_the_power_states(ansible, xapi):
    create(ansible)
    on = ansible.ok("xenserver_guest_powerstate", name="ans1", state="powered-on", wait_for_ip_address=True)
    assert on["instance"]["state"] == "poweredon"
    assert on["instance"]["networks"][0]["ip"].startswith("127.77.0.")
    for state, power_state in (
        ("restarted", "Running"),
        ("reboot-guest", "Running"),
        ("suspended", "Suspended"),
        ("powered-on", "Running"),
        ("shutdown-guest", "Halted"),
        ("powered-on", "Running"),
        ("powered-off", "Halted"),
    ):
        result = ansible.ok("xenserver_guest_powerstate", name="ans1", state=state, state_change_timeout=30)
        assert result["changed"] is True, state
        assert xapi.VM.get_power_state(xapi.VM.get_by_name_label("ans1")[0]) == power_state, state


def test_remove(ansible, xapi):
    create(ansible)
    ansible.ok("xenserver_guest_powerstate", name="ans1", state="powered-on")
    [vm] = xapi.VM.get_by_name_label("ans1")
    disks = [xapi.VBD.get_VDI(b) for b in xapi.VM.get_VBDs(vm) if xapi.VBD.get_type(b) == "Disk"]
    refused = ansible.run("xenserver_guest", name="ans1", state="absent")
    assert refused["failed"] is True  # a running VM is removed only with force, as on a real host
    assert ansible.ok("xenserver_guest", name="ans1", state="absent", force=True)["changed"] is True
    assert xapi.VM.get_by_name_label("ans1") == []
    assert set(disks).isdisjoint(xapi.VDI.get_all())  # and its disks with it


# -- a pool, as the modules meet one --------------------------------------------------------


@pytest.fixture
def pool_ansible(make_lab, tmp_path):  # type: ignore[no-untyped-def]
    return Ansible(make_lab(timing=QUICK, pool_size=3), tmp_path)


def test_create_on_the_master_with_a_home_server_runs_on_that_member(pool_ansible):
    from ..sim.simtools import login

    xapi = login(pool_ansible.node).xenapi
    created = create(pool_ansible, name="homed", home_server="sim-xen-01-h3")
    assert created["instance"]["home_server"] == "sim-xen-01-h3"
    on = pool_ansible.ok("xenserver_guest_powerstate", name="homed", state="powered-on", wait_for_ip_address=True)
    assert on["instance"]["state"] == "poweredon"
    [vm] = xapi.VM.get_by_name_label("homed")
    assert xapi.host.get_name_label(xapi.VM.get_resident_on(vm)) == "sim-xen-01-h3"


def test_a_member_address_fails_as_the_modules_fail_on_a_real_pool_member(pool_ansible):
    # the module pointed at a member (127.0.0.2, the pool's port) instead of the master
    address = pool_ansible.node.url.removeprefix("http://").replace("127.0.0.1", "127.0.0.2")
    result = pool_ansible.run("xenserver_guest_info", name="anything", hostname=address)
    assert result["failed"] is True
    assert "HOST_IS_SLAVE" in result["msg"]
    assert "127.0.0.1" in result["msg"]  # the master's address, as xapi names it


def test_a_vm_from_a_built_in_template_boots(pool_ansible):
    from ..sim.simtools import login

    xapi = login(pool_ansible.node).xenapi
    sr = xapi.pool.get_default_SR(xapi.pool.get_all()[0])
    pool_ansible.ok(
        "xenserver_guest",
        name="stock",
        template="CentOS 7",
        state="present",
        disks=[{"size_gb": 10, "sr_uuid": xapi.SR.get_uuid(sr)}],
        hardware={"num_cpus": 1, "memory_mb": 2048},
    )
    on = pool_ansible.ok("xenserver_guest_powerstate", name="stock", state="powered-on")
    assert on["instance"]["state"] == "poweredon"
