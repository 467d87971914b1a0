"""The guest agent of a running VM, played by timers.

After ``VM.start`` the guest "boots" for ``boot_seconds``, then its agent reports
``os_version`` in a fresh ``VM_guest_metrics``; after ``ip_seconds`` more it reports its
address in ``networks["0/ip"]``: from the host's DHCP pool, or a 169.254.x.y (APIPA)
address when a fault says so or the pool is empty, as a Windows guest does when DHCP fails.

Timer callbacks run on the scheduler thread: they take the store lock briefly and never
sleep. A VM that was shut down or restarted meanwhile has a new boot epoch, and the stale
timer does nothing. A guest on a member that does not answer (``sim.member_down``) cannot
report to the master: its next report waits until the member is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from .catalogue import OsTemplate
from .host import SimHost
from .schema import NULL_REF

GENERIC_LINUX = {"name": "Linux", "distro": "linux", "major": "0", "minor": "0", "uname": "unknown"}


def boot(host: SimHost, vm: str, instant: bool = False) -> None:
    """Begin the guest's boot; called by ``VM.start`` once the domain runs."""
    epoch = host.boot_epochs.get(vm, 0) + 1
    host.boot_epochs[vm] = epoch
    if instant:
        _agent_up(host, vm, epoch, instant=True)
    else:
        delay = host.timing.scaled(host.timing.boot_seconds)
        host.scheduler.call_later(delay, lambda: _agent_up(host, vm, epoch))


def stop(host: SimHost, vm: str) -> None:
    """The domain is gone: forget pending timers, close its service, give the address back."""
    host.boot_epochs[vm] = host.boot_epochs.get(vm, 0) + 1
    host.services.close(vm)
    host.dhcp.release(vm)


def _current(host: SimHost, vm: str, epoch: int) -> bool:
    return host.boot_epochs.get(vm) == epoch and host.store.exists("VM", vm)


MEMBER_RETRY_SECONDS = 0.2  # how often a guest on a member that is down tries to report again


def _cut_off(host: SimHost, vm: str, retry: Callable[[], None]) -> bool:
    """Whether the VM's member is down; if so, ``retry`` runs again a moment later. Call
    with the store's lock held."""
    resident = str(host.store.get("VM", vm)["resident_on"])
    members = host.refs.members
    if resident in members and members.index(resident) in host.members_down:
        host.scheduler.call_later(MEMBER_RETRY_SECONDS, retry)
        return True
    return False


def _agent_up(host: SimHost, vm: str, epoch: int, instant: bool = False) -> None:
    store = host.store
    with store.lock:
        if not _current(host, vm, epoch) or _cut_off(host, vm, lambda: _agent_up(host, vm, epoch)):
            return
        profile: OsTemplate | None = host.guest_os.get(vm)
        os_version = dict(profile.os_version) if profile else dict(GENERIC_LINUX)
        metrics = store.create(
            "VM_guest_metrics",
            {
                "os_version": os_version,
                "PV_drivers_version": {"major": "7", "minor": "2", "micro": "0", "build": "148"},
                "PV_drivers_up_to_date": True,
                "PV_drivers_detected": True,
                "other": {
                    "feature-balloon": "1",
                    "feature-shutdown": "1",
                    "feature-suspend": "1",
                    "feature-vcpu-hotplug": "1",
                    "has-vendor-device": "0",
                    "platform-feature-multiprocessor-suspend": "1",
                },
                "networks": {},
                "live": True,
                "last_updated": host.now(),
            },
        )
        store.update("VM", vm, guest_metrics=metrics)
    if instant:
        _network_up(host, vm, epoch)
    else:
        host.scheduler.call_later(host.timing.scaled(host.timing.ip_seconds), lambda: _network_up(host, vm, epoch))


def _network_up(host: SimHost, vm: str, epoch: int) -> None:
    """The guest agent reports its addresses, NIC by NIC (one per VIF, keyed by the VIF's
    device): ``N/ip`` and ``N/ipv4/0``, then the IPv6 link-local ``N/ipv6/0`` (xen-api
    xapi_guest_agent.ml, ``networks``; the XenServer 7.2 record shows 0/ip and 0/ipv6/0)."""
    store = host.store
    with store.lock:
        if not _current(host, vm, epoch) or _cut_off(host, vm, lambda: _network_up(host, vm, epoch)):
            return
        metrics = str(store.get("VM", vm)["guest_metrics"])
        if metrics == NULL_REF or not store.exists("VM_guest_metrics", metrics):
            return
        networks: dict[str, str] = {}
        vifs = sorted(
            (store.get("VIF", v) for v in cast("list[str]", store.get("VM", vm)["VIFs"])),
            key=lambda r: int(str(r["device"])),
        )
        for vif in vifs or [{"device": "0", "MAC": ""}]:
            nic = str(vif["device"])
            ip = _choose_address(host, vm) if nic == "0" else _other_nic_address(host, f"{vm}#{nic}")
            networks[f"{nic}/ip"] = ip
            networks[f"{nic}/ipv4/0"] = ip
            if vif["MAC"]:
                networks[f"{nic}/ipv6/0"] = _link_local(str(vif["MAC"]))
        store.update("VM_guest_metrics", metrics, networks=networks, last_updated=host.now())
        first = networks.get("0/ip", "")
        if not (host.spec.service_port or host.spec.winrm_port) or not first or first.startswith("169.254."):
            return  # no usable address: nothing could reach its service
        faults = host.faults
        if faults.service_never_next > 0:
            faults.service_never_next -= 1
            return
        if faults.service_never:
            return
    delay = host.timing.scaled(host.timing.service_seconds)
    host.scheduler.call_later(delay, lambda: _service_up(host, vm, epoch, first))


def _service_up(host: SimHost, vm: str, epoch: int, ip: str) -> None:
    """The guest's sshd (WinRM on Windows) starts listening on its address."""
    with host.store.lock:
        if not _current(host, vm, epoch) or _cut_off(host, vm, lambda: _service_up(host, vm, epoch, ip)):
            return
        profile = host.guest_os.get(vm)
    port = host.spec.winrm_port if profile is not None and profile.windows else host.spec.service_port
    if host.services.open(vm, ip, port):
        with host.store.lock:
            if not _current(host, vm, epoch):  # stopped while it opened
                host.services.close(vm)


def _other_nic_address(host: SimHost, key: str) -> str:
    """A second NIC asks the same DHCP pool; without an answer it shows APIPA, as Windows does."""
    ip = None if host.faults.dhcp_exhausted else host.dhcp.lease(key)
    return ip or f"169.254.{host.random.randint(1, 254)}.{host.random.randint(1, 254)}"


def _link_local(mac: str) -> str:
    """fe80::/64 with the MAC's EUI-64, written out whole as xapi's guest agent reports it."""
    octets = [int(o, 16) for o in mac.split(":")]
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:6]]
    groups = ["fe80", "0000", "0000", "0000"] + [f"{eui[i]:02x}{eui[i + 1]:02x}" for i in range(0, 8, 2)]
    return ":".join(groups)


def _choose_address(host: SimHost, vm: str) -> str:
    faults = host.faults
    apipa = False
    if faults.apipa_next > 0:
        faults.apipa_next -= 1
        apipa = True
    elif faults.apipa_rate > 0 and host.random.random() < faults.apipa_rate:
        apipa = True
    if not apipa and not faults.dhcp_exhausted:
        ip = host.dhcp.lease(vm)
        if ip is not None:
            return ip
    return f"169.254.{host.random.randint(1, 254)}.{host.random.randint(1, 254)}"
