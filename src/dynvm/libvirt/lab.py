"""A libvirt lab on this machine: libvirtd started where none runs, a private network for
the guests, a storage pool holding the guest image's base volume, and a ``[libvirthostN]``
section that names them. ``dynvm lab --provider libvirt`` and the libvirt tests use it;
``stop`` tears down what ``start`` made, and nothing else.

The network is libvirt's own: a bridge with STP off and no forwarding delay, and dnsmasq
told not to ping an address before it leases it (measured: a lease 0.2 s after link-up,
against 3-10 s on libvirt's ``default`` network). It forwards nothing off the machine.
Guests on it are reached only from the network namespace libvirtd runs in: run the lab (and
whatever talks to its guests) inside one, ``ip netns exec NAME ...``, where the machine
allows no other route.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .image import GuestImage
from .libvirt_api import libvirt, quiet_errors

URI = "qemu:///system"
DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
DAEMONS = ("virtlogd", "libvirtd")  # in this order: the QEMU driver logs through virtlogd


class LabError(Exception):
    """The lab could not start; the message says why and what to install."""


@dataclass
class Lab:
    """What ``start`` made (and ``stop`` removes): only these."""

    name: str
    directory: Path
    subnet: str  # "192.168.231": the guests get .10 to .250
    started_daemons: list[str] = field(default_factory=list)
    made_network: bool = False
    made_pool: bool = False
    pool_path: Path | None = None  # where its volumes live: in ``directory`` when QEMU's own user can reach it

    def section(self, number: int, image: GuestImage, direct_boot: bool = True, memory_mib: int = 128) -> str:
        """A ``[libvirthostN]`` section for this lab (software emulation: ``domain.type=qemu``)."""
        lines = [
            f"[libvirthost{number}]",
            f"uri={URI}",
            f"storage.pool={self.name}",
            f"network={self.name}",
            "domain.type=qemu",
            "host.reserve.mib=2048",
            f"tiny.image={image.disk.name}",
            "tiny.cpus=1",
            f"tiny.memory.mib={memory_mib}",
        ]
        if direct_boot:
            lines += [f"tiny.kernel={image.kernel}", f"tiny.initrd={image.initrd}", "tiny.cmdline=console=ttyS0 quiet"]
        return "\n".join(lines) + "\n"


def daemon_pid(daemon: str) -> int | None:
    """The pid of a running ``daemon`` (libvirtd, virtlogd) from its pid file, or None.
    A daemon that exited but that nobody reaped (no init here) is not running."""
    try:
        pid = int(Path(f"/run/{daemon}.pid").read_text().strip())
        os.kill(pid, 0)
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    return None if "\nState:\tZ" in status else pid


def start_daemons(timeout: float = 30.0) -> list[str]:
    """Start virtlogd and libvirtd where they do not run (no systemd here: ``-d``); the
    daemons this call started."""
    started = []
    for daemon in DAEMONS:
        if daemon_pid(daemon) is not None:
            continue
        binary = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        if not Path(binary).exists():
            raise LabError(
                f"{daemon} is not installed: apt-get install libvirt-daemon-system qemu-system-x86 qemu-utils "
                "dnsmasq-base"
            )
        done = subprocess.run([binary, "-d"], capture_output=True, text=True)
        if done.returncode != 0:
            raise LabError(f"{daemon} did not start: {(done.stderr or done.stdout).strip()}")
        started.append(daemon)
    deadline = time.monotonic() + timeout
    quiet_errors()
    while True:
        try:
            libvirt.open(URI).close()
            return started
        except libvirt.libvirtError as e:
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd does not answer at {URI}: {e.get_error_message()}") from None
            time.sleep(0.2)


def stop_daemons(daemons: list[str]) -> None:
    for daemon in reversed(daemons):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(Path(f"/run/{daemon}.pid").read_text().strip()), 15)


def network_xml(name: str, subnet: str) -> str:
    ET.register_namespace("dnsmasq", DNSMASQ_NS)
    network = ET.Element("network")
    ET.SubElement(network, "name").text = name
    bridge = name.replace("dynvm-", "dv")[:12]
    ET.SubElement(network, "bridge", name=f"{bridge}0", stp="off", delay="0")
    ip = ET.SubElement(network, "ip", address=f"{subnet}.1", netmask="255.255.255.0")
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=f"{subnet}.10", end=f"{subnet}.250")
    options = ET.SubElement(network, f"{{{DNSMASQ_NS}}}options")
    ET.SubElement(options, f"{{{DNSMASQ_NS}}}option", value="no-ping")
    return ET.tostring(network, encoding="unicode")


def pool_xml(name: str, path: Path) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = str(path)
    return ET.tostring(pool, encoding="unicode")


def reachable_by_others(path: Path) -> bool:
    """Whether a user other than this one may pass through every folder down to ``path``
    (QEMU runs as its own user: a pool in a home folder of mode 0700 cannot be opened)."""
    return all(folder.stat().st_mode & 0o001 for folder in [*path.parents, path] if folder.exists())


def pool_folder(name: str, directory: Path) -> Path:
    """``directory``/pool, or, when QEMU's user could not reach it, a folder of libvirt's own."""
    wanted = directory / "pool"
    return wanted if reachable_by_others(directory) else Path("/var/lib/libvirt/images") / name


def free_subnet(connection: Any) -> str:
    """A /24 in 192.168.200-254 that no libvirt network on this host uses."""
    used = set()
    for network in connection.listAllNetworks(0):
        with contextlib.suppress(libvirt.libvirtError):
            for ip in ET.fromstring(network.XMLDesc(0)).iterfind("ip"):
                used.add(ip.get("address", "").rsplit(".", 1)[0])
    for third in range(231, 255):
        if f"192.168.{third}" not in used:
            return f"192.168.{third}"
    raise LabError("every 192.168.231-254 subnet is taken by a libvirt network")


def start(name: str, directory: Path, image: GuestImage, subnet: str = "") -> Lab:
    """Daemons, network and pool for a lab called ``name`` (its network and pool keep that
    name; one left by an earlier lab of the same name is replaced). ``subnet``: the
    guests' /24 ("192.168.231"); by default one no other libvirt network uses."""
    lab = Lab(name, directory.resolve(), subnet)
    lab.pool_path = pool = pool_folder(name, lab.directory)
    lab.started_daemons = start_daemons()
    connection = libvirt.open(URI)
    try:
        _remove_network(connection, name)
        _remove_pool(connection, name)
        lab.subnet = subnet = subnet or free_subnet(connection)
        network = connection.networkDefineXML(network_xml(name, subnet))
        lab.made_network = True
        network.create()
        pool.mkdir(parents=True, exist_ok=True)  # the lab's own: nothing else lives there
        pool.chmod(0o755)
        shutil.copyfile(image.disk, pool / image.disk.name)
        defined = connection.storagePoolDefineXML(pool_xml(name, pool), 0)
        defined.create(0)
        lab.made_pool = True
    except libvirt.libvirtError as e:
        connection.close()
        stop(lab)
        raise LabError(f"the lab's network or storage pool could not be made: {e.get_error_message()}") from None
    connection.close()
    return lab


def stop(lab: Lab) -> None:
    """Remove what ``start`` made: the lab's guests, its pool and its network, then stop
    the daemons it started."""
    quiet_errors()
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError:
        connection = None
    if connection is not None:
        _remove_guests(connection, lab)
        if lab.made_pool:
            _remove_pool(connection, lab.name)
        if lab.made_network:
            _remove_network(connection, lab.name)
        connection.close()
    if lab.pool_path is not None and lab.pool_path.name in ("pool", lab.name):  # only the folder start made
        shutil.rmtree(lab.pool_path, ignore_errors=True)
    stop_daemons(lab.started_daemons)


def clear(lab: Lab, keep: str) -> None:
    """Remove the lab's guests and every volume of its pool but ``keep`` (the base): the
    lab as ``start`` left it."""
    connection = libvirt.open(URI)
    try:
        _remove_guests(connection, lab)
        for volume in connection.storagePoolLookupByName(lab.name).listAllVolumes(0):
            if volume.name() != keep:
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
    finally:
        connection.close()


def _remove_guests(connection: Any, lab: Lab) -> None:
    """Stop and undefine every domain whose disk is in the lab's pool."""
    for dom in connection.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            disks = ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk/source")
            if any(disk.get("pool") == lab.name for disk in disks):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def _remove_network(connection: Any, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        network = connection.networkLookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            network.destroy()
        network.undefine()


def _remove_pool(connection: Any, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        pool = connection.storagePoolLookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()
        pool.undefine()
