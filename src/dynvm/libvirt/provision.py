"""Making and destroying dynvm's VMs on one libvirt host.

A VM is a domain and a qcow2 volume on its OS's base volume (a copy-on-write clone: the
base is never written). One create attempt, in order:

1. **define** the domain, marked (``marker.py``), its disk naming the clone volume that
   does not exist yet: from here on nothing of the attempt is unmarked;
2. **clone** the base volume (``dynvm-<installation>-<lease>.qcow2``, backing file: the base);
3. **start** the domain;
4. **wait for an address** from the network's DHCP leases (``vm.network.timeout.secs``);
   only a link-local address, or none, is ``FailureKind.NO_ADDRESS``;
5. **probe** the guest's service port (``[probe]``): ready when it answers.

A failed attempt removes what it made (domain stopped and undefined, volume deleted) and
raises ``ProvisionError`` with its kind; the engine decides whether to try again. A destroy
stops the domain, deletes its volume, and undefines it last: a volume whose delete fails
keeps its name, and leak collection (``leaks.py``) deletes it later.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from .. import probe
from ..model import CreatedVm, DestroyFailed, FailureKind, HeldElsewhere, NotDynvmVm, ProvisionError, VmSpec
from ..provider import Cancel, DestroyResult, Progress
from . import marker
from .inventory import Inventory, domain_view, guest_addresses
from .libvirt_api import libvirt
from .settings import LibvirtHostSettings, OsImage

log = logging.getLogger(__name__)

ADDRESS_POLL = 0.05  # seconds between reads of the network's leases while a guest boots
QEMU_OVERHEAD_MIB = 64  # what QEMU itself takes beside the guest's memory (measured: 60-70 MiB)


def describe(name: str, image: str) -> str:
    """A VM's description, as on Xen: ``<name> from <image> on <utc time>``."""
    return f"{name} from {image} on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"


def overhead_mib(host: LibvirtHostSettings) -> int:
    """What one domain takes beyond its guest memory: QEMU itself, and under TCG its
    translation cache."""
    return QEMU_OVERHEAD_MIB + (host.tcg_cache_mib if host.domain_type == "qemu" else 0)


def domain_xml(
    host: LibvirtHostSettings, spec: VmSpec, image: OsImage, mark: marker.Mark, cpus: int, memory: int, volume: str
) -> str:
    """The domain of one VM: ``memory`` in bytes; its disk is ``volume`` in the host's pool."""
    domain = ET.Element("domain", type=host.domain_type)
    ET.SubElement(domain, "name").text = marker.domain_name(spec.lease_id)
    ET.SubElement(domain, "title").text = spec.name
    ET.SubElement(domain, "description").text = describe(spec.name, image.volume)
    metadata = ET.SubElement(domain, "metadata")
    metadata.append(ET.fromstring(mark.xml()))
    ET.SubElement(domain, "memory", unit="KiB").text = str(memory // 1024)
    ET.SubElement(domain, "vcpu").text = str(cpus)
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    if image.kernel is not None:
        ET.SubElement(os_element, "kernel").text = str(image.kernel)
        if image.initrd is not None:
            ET.SubElement(os_element, "initrd").text = str(image.initrd)
        ET.SubElement(os_element, "cmdline").text = image.cmdline or "console=ttyS0"
    ET.SubElement(os_element, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if host.domain_type == "qemu":
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(host.tcg_cache_mib)
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(domain, event).text = action
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="volume", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", pool=host.storage_pool, volume=volume)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network=host.network)
    ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "serial", type="pty")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def clone_xml(name: str, base: Any) -> str:
    """A qcow2 volume on ``base`` (its backing file): as large as the base, nothing copied."""
    base_root = ET.fromstring(base.XMLDesc(0))
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(base.info()[1])
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    backing = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing, "path").text = base.path()
    ET.SubElement(backing, "format", type=base_root.find("target/format").get("type", "qcow2"))  # type: ignore[union-attr]  # a volume's XML always has its format
    return ET.tostring(volume, encoding="unicode")


class AttemptFailed(Exception):
    def __init__(self, message: str, kind: FailureKind = FailureKind.AGAIN) -> None:
        super().__init__(message)
        self.kind = kind


class Provisioner:
    """Creates and destroys dynvm's VMs on one host, through the inventory's connection."""

    def __init__(
        self,
        host: LibvirtHostSettings,
        inventory: Inventory,
        network_timeout: float,
        installation: str,
        hold_locks: Sequence[threading.Lock],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``hold_locks``: the provider's, striped by VM (``hand_out`` reads a mark, then
        writes it: one step within this process)."""
        self.host = host
        self.inventory = inventory
        self.network_timeout = network_timeout
        self.installation = installation
        self.hold_locks = hold_locks
        self.clock = clock

    def _connection(self) -> Any:
        connection = self.inventory.connection(self.host.ref)
        if connection is None:
            view = self.inventory.view(self.host.ref)
            why = view.error if view is not None and view.error else "not connected"
            raise ProvisionError(
                f"{self.host.display} is down: {why}", self.host.ref, kind=FailureKind.HOST_UNREACHABLE
            )
        return connection

    # -- create ------------------------------------------------------------------------

    def create(self, spec: VmSpec, progress: Progress, cancel: Cancel | threading.Event, attempt: int) -> CreatedVm:
        image = self.host.images.get(spec.os)
        if image is None:
            raise ProvisionError(f"{self.host.display} has no {spec.os}.image", self.host.ref)
        connection = self._connection()
        started = self.clock()
        volume_name = marker.volume_name(self.installation, spec.lease_id)
        cpus = spec.cpus or image.cpus
        memory = spec.memory or image.memory_mib * 1024 * 1024
        dom = None
        try:
            pool = connection.storagePoolLookupByName(self.host.storage_pool)
            try:
                base = pool.storageVolLookupByName(image.volume)
            except libvirt.libvirtError as e:
                raise ProvisionError(
                    f"{self.host.display}: no base volume {image.volume!r} in storage pool "
                    f"{self.host.storage_pool!r} ({spec.os}.image): {e.get_error_message()}",
                    self.host.ref,
                ) from None
            mark = marker.Mark(spec.lease_id, self.installation, spec.os)
            progress("defining")
            log.info("%s: attempt %d: defining on %s", spec.name, attempt, self.host.display)
            dom = connection.defineXML(domain_xml(self.host, spec, image, mark, cpus, memory, volume_name))
            _check_cancel(cancel, self.host)
            progress("cloning")
            volume = pool.createXML(clone_xml(volume_name, base), 0)
            _check_cancel(cancel, self.host)
            progress("booting")
            dom.create()
            progress("waiting for IP")
            waiting_since = self.clock()
            ip = self._wait_for_address(dom, cancel)
            if spec.probe_port:
                progress("waiting for service")
                self._wait_for_service(ip, spec.probe_port, waiting_since + self.network_timeout, cancel)
            uuid = dom.UUIDString()
            self.inventory.reread(self.host.ref, uuid)
            seconds = self.clock() - started
            log.info("%s: ready at %s after %.1f s", spec.name, ip, seconds)
            progress("ready")
            return CreatedVm(
                uuid=uuid,
                ref=uuid,
                name=spec.name,
                ip=ip,
                os_version={"name": spec.os, "image": image.volume},
                cpus=cpus,
                memory=memory,
                disk=int(volume.info()[1]),
                host=self.host.ref,
                template=image.volume,
                create_seconds=seconds,
                attempts=attempt,
            )
        except AttemptFailed as e:
            failure = ProvisionError(f"{spec.name}: {e}", self.host.ref, kind=e.kind)
        except libvirt.libvirtError as e:
            alive = _alive(connection)
            failure = ProvisionError(
                f"{spec.name}: libvirt: {e.get_error_message()}",
                self.host.ref,
                kind=FailureKind.AGAIN if alive else FailureKind.HOST_UNREACHABLE,
            )
        except ProvisionError as e:
            failure = e
        log.warning("%s: attempt %d failed: %s", spec.name, attempt, failure)
        progress("cleaning up")
        self._remove(connection, dom, volume_name, spec.name)
        raise failure

    def _wait_for_address(self, dom: Any, cancel: Cancel | threading.Event) -> str:
        deadline = self.clock() + self.network_timeout
        link_local = ""
        while True:
            _check_cancel(cancel, self.host)
            if not dom.isActive():
                raise AttemptFailed("the guest stopped while booting")
            addresses = guest_addresses(dom)
            real = next((a for a in addresses if not a.startswith("169.254.")), None)
            if real is not None:
                return real
            link_local = next(iter(addresses), link_local)
            if self.clock() >= deadline:
                what = f"only the link-local address {link_local}" if link_local else "no address"
                raise AttemptFailed(
                    f"{what} after {self.network_timeout:g} s (vm.network.timeout.secs)", FailureKind.NO_ADDRESS
                )
            time.sleep(ADDRESS_POLL)

    def _wait_for_service(self, ip: str, port: int, deadline: float, cancel: Cancel | threading.Event) -> None:
        try:
            took = probe.wait_until_answering(ip, port, deadline, cancel, clock=self.clock)
        except probe.ServiceDown:
            _check_cancel(cancel, self.host)
            raise AttemptFailed(
                f"{ip} has an address but port {port} never answered within {self.network_timeout:g} s "
                "(vm.network.timeout.secs; [probe] port)",
                FailureKind.NO_ADDRESS,
            ) from None
        log.info("port %d of %s answers after %.2f s", port, ip, took)

    def _remove(self, connection: Any, dom: Any, volume_name: str, label: str) -> list[str]:
        """Stop and undefine ``dom`` (if any) and delete its volume; what would not go."""
        problems = []
        stopped = True
        uuid = dom.UUIDString() if dom is not None else None
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    problems.append(f"stop {label}: {e.get_error_message()}")
                    stopped = False
        if stopped:
            try:
                pool = connection.storagePoolLookupByName(self.host.storage_pool)
                pool.storageVolLookupByName(volume_name).delete(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    problems.append(f"{volume_name}: {e.get_error_message()}")
        if dom is not None and stopped:  # a volume that would not go is found by its name later
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    problems.append(f"undefine {label}: {e.get_error_message()}")
        if uuid is not None:
            self.inventory.reread(self.host.ref, uuid)  # the answer waits until the mirror shows it gone
        self.inventory.changed(self.host.ref)  # and its volume, on the next read
        return problems

    # -- hand-out ----------------------------------------------------------------------

    def hand_out(self, uuid: str, spec: VmSpec) -> None:
        """A ready VM becomes ``spec.holder``'s: the holder is written on its mark unless
        the mark names another (``HeldElsewhere``), then a ready-pool VM takes its lease's
        name. libvirt has no compare-and-set on metadata: within this process a lock per
        VM makes read-and-write one step."""
        connection = self._connection()
        try:
            dom = connection.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            raise ProvisionError(f"{spec.name}: its ready VM is gone: {e.get_error_message()}", self.host.ref) from None
        with self.hold_locks[hash(uuid) % len(self.hold_locks)]:
            try:
                view = domain_view(dom, addresses=False)
                if marker.ownership(view.mark, self.installation) is not marker.Ownership.OURS or (
                    view.mark is None or view.mark.lease != spec.lease_id
                ):
                    raise NotDynvmVm(f"refusing to hand out {view.label!r}: not lease {spec.lease_id}'s")
                if not view.active:
                    raise ProvisionError(f"{spec.name}: its ready VM is {view.state}", self.host.ref)
                held = view.mark.holder
                if held is not None and spec.holder is not None and held != spec.holder:
                    raise HeldElsewhere(
                        f"refusing to hand out {view.label!r}: the host says request {held} holds it, "
                        f"not {spec.holder} (is this database restored from a backup, or a copy?)",
                        self.host.ref,
                    )
                if spec.holder is not None and held is None:
                    self._set_mark(dom, dataclasses.replace(view.mark, holder=spec.holder))
                if view.title != spec.name:
                    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
                    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, spec.name, None, None, flags)
                    dom.setMetadata(
                        libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, describe(spec.name, spec.template), None, None, flags
                    )
            except libvirt.libvirtError as e:
                raise ProvisionError(
                    f"{spec.name}: its ready VM cannot be handed out: {e.get_error_message()}", self.host.ref
                ) from None
        self.inventory.reread(self.host.ref, uuid)

    @staticmethod
    def _set_mark(dom: Any, mark: marker.Mark) -> None:
        """Write the mark on the running domain and its definition alike."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, mark.xml(bare=True), marker.PREFIX, marker.NAMESPACE, flags
        )

    # -- destroy, quarantine -----------------------------------------------------------

    def destroy(self, uuid: str, lease_id: str | None, holder: str | None = None) -> DestroyResult:
        """Destroy a VM of this installation and its volume. A VM already gone is fine
        (its volume, if left, still goes); one without this installation's mark, or with
        another lease's, raises ``NotDynvmVm``; one the host says another request holds,
        ``HeldElsewhere``; a domain that will not stop, ``DestroyFailed``. A volume that
        will not go is in the result, and leak collection deletes it later."""
        connection = self._connection()
        try:
            dom = connection.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise DestroyFailed(f"cannot read VM {uuid} on {self.host.display}: {e}", self.host.ref) from None
            if lease_id is None:
                return DestroyResult()
            left = self._remove(connection, None, marker.volume_name(self.installation, lease_id), uuid)
            return DestroyResult(disks_left=tuple(left))
        view = domain_view(dom, addresses=False)
        owner = marker.ownership(view.mark, self.installation)
        reason = ""
        if owner is marker.Ownership.NOT_DYNVM:
            reason = "dynvm did not create it"
        elif owner is marker.Ownership.OTHER_INSTALLATION and view.mark is not None:
            reason = f"another dynvm installation made it ({view.mark.installation})"
        elif lease_id is not None and view.mark is not None and view.mark.lease != lease_id:
            reason = f"it belongs to lease {view.mark.lease}, not {lease_id}"
        if reason:
            raise NotDynvmVm(
                f"refusing to destroy VM {view.label!r} ({uuid}) on {self.host.display}: {reason}", self.host.ref
            )
        assert view.mark is not None
        if view.mark.holder is not None and view.mark.holder != holder:
            raise HeldElsewhere(
                f"refusing to destroy {view.label!r} ({uuid}) on {self.host.display}: "
                f"the host says request {view.mark.holder} holds it",
                self.host.ref,
            )
        problems = self._remove(connection, dom, marker.volume_name(self.installation, view.mark.lease), view.label)
        stuck = [p for p in problems if not p.startswith(marker.VOLUME_PREFIX)]
        if stuck:
            raise DestroyFailed(f"{view.label} on {self.host.display}: {'; '.join(stuck)}", self.host.ref)
        if problems:
            log.warning("%s: its volume stays for now (reconcile deletes it): %s", view.label, problems[0])
        return DestroyResult(disks_left=tuple(problems))

    def delete_volume(self, name: str) -> None:
        """A clone volume no domain uses (leak collection)."""
        connection = self._connection()
        pool = connection.storagePoolLookupByName(self.host.storage_pool)
        try:
            pool.storageVolLookupByName(name).delete(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise DestroyFailed(f"volume {name} on {self.host.display}: {e.get_error_message()}") from None
        self.inventory.changed(self.host.ref)

    def quarantine(self, uuid: str, now: float) -> bool:
        """Stop a VM of this installation that its database does not know, and stamp it:
        kept, not destroyed, until the quarantine ends. False when it was not ours."""
        connection = self._connection()
        dom = connection.lookupByUUIDString(uuid)
        view = domain_view(dom, addresses=False)
        if marker.ownership(view.mark, self.installation) is not marker.Ownership.OURS or view.mark is None:
            return False
        if dom.isActive():
            dom.destroy()
        self._set_mark(dom, dataclasses.replace(view.mark, quarantined_at=now))
        self.inventory.changed(self.host.ref, uuid)
        return True


def _alive(connection: Any) -> bool:
    try:
        return bool(connection.isAlive())
    except libvirt.libvirtError:
        return False


def _check_cancel(cancel: Cancel | threading.Event, host: LibvirtHostSettings) -> None:
    if cancel.is_set():
        raise ProvisionError("cancelled: dynvm is stopping", host.ref)
