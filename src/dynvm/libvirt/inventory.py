"""A live mirror of each configured libvirt host: its size, its domains (every one, not only
dynvm's), the volumes of its storage pool and the pool's free space. The engine asks it,
never the host, what a host holds (``provider.py``).

One watcher thread per host keeps a connection open, reads everything when it connects and
every ``REFRESH_SECONDS`` after, and re-reads one domain whenever libvirt's event loop
reports a lifecycle event for it (started, stopped, defined, undefined): a domain destroyed
by hand leaves the mirror within a second. When the connection closes (the host or its
libvirtd went away), the host is shown down with the reason and the watcher reconnects,
backing off (``backoff.WATCHER``).

libvirt connections are thread-safe: provisioning calls (``provision.py``) use the
watcher's connection from their own threads (``Inventory.connection``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import queue
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .. import backoff
from ..config import Settings
from . import marker
from .libvirt_api import libvirt, quiet_errors, start_event_loop
from .settings import LibvirtHostSettings

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # a full read, beside the events: addresses and free memory change without one
KEEPALIVE = (5, 3)  # interval (s), count: a remote host that stops answering is noticed in ~20 s


class HostState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class DomainView:
    uuid: str
    name: str  # the domain's name (unique on the host)
    title: str  # dynvm's VMs carry their lease's name here
    description: str
    active: bool
    state: str  # "Running", "Halted", "Paused": the words the API shows for every provider
    vcpus: int
    memory: int  # bytes
    mark: marker.Mark | None
    disks: tuple[str, ...] = ()  # source paths
    addresses: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.title or self.name


@dataclass(frozen=True)
class VolumeView:
    name: str
    path: str
    capacity: int
    allocation: int


@dataclass(frozen=True)
class HostView:
    ref: str
    state: HostState
    error: str = ""
    name: str = ""
    host_uuid: str = ""
    cpus: int = 0
    memory_total: int = 0
    memory_free: int = 0
    domains: tuple[DomainView, ...] = ()
    volumes: tuple[VolumeView, ...] = ()
    pool_available: int | None = None  # the storage pool's free bytes; None: no such pool
    pool_path: str = ""  # the directory of a dir pool (where clones go)
    network_active: bool = False
    same_as: str = ""  # the ref of an earlier section that reaches the same host

    def volume(self, name: str) -> VolumeView | None:
        return next((v for v in self.volumes if v.name == name), None)

    def domain(self, uuid: str) -> DomainView | None:
        return next((d for d in self.domains if d.uuid == uuid), None)


STATE_WORDS = {  # libvirt's VIR_DOMAIN_* states, in the words the API uses for Xen's too
    1: "Running",
    2: "Running",  # blocked: running, waiting for something
    3: "Paused",
    4: "Running",  # being shut down
    5: "Halted",
    6: "Halted",  # crashed
    7: "Suspended",
}


def domain_view(dom: Any, addresses: bool = True) -> DomainView:
    """Everything the mirror keeps of one domain (a few calls to its host)."""
    state, _max_kib, memory_kib, vcpus, _cpu_time = dom.info()
    root = ET.fromstring(dom.XMLDesc(0))
    active = state in (1, 2, 3, 4)
    found: tuple[str, ...] = ()
    if addresses and active:
        found = guest_addresses(dom)
    metadata = root.find(f"metadata/{{{marker.NAMESPACE}}}{marker.ELEMENT}")
    return DomainView(
        uuid=dom.UUIDString(),
        name=dom.name(),
        title=root.findtext("title") or "",
        description=root.findtext("description") or "",
        active=active,
        state=STATE_WORDS.get(state, "Halted"),
        vcpus=int(vcpus),
        memory=int(root.findtext("memory") or memory_kib) * 1024,
        mark=marker.from_element(metadata) if metadata is not None else None,
        disks=tuple(s.get("file", "") for s in root.iterfind("devices/disk/source") if s.get("file")),
        addresses=found,
    )


def guest_addresses(dom: Any) -> tuple[str, ...]:
    """The guest's IPv4 addresses from its network's DHCP leases (no guest agent needed)."""
    try:
        interfaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
    except libvirt.libvirtError:
        return ()
    return tuple(
        a["addr"]
        for nic in (interfaces or {}).values()
        for a in nic.get("addrs") or ()
        if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4
    )


@dataclass
class _Watched:
    settings: LibvirtHostSettings
    view: HostView
    synced: threading.Event = field(default_factory=threading.Event)
    connection: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    changed: queue.SimpleQueue[str | None] = field(default_factory=queue.SimpleQueue)  # uuids; None: all
    thread: threading.Thread | None = None
    updating: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0  # counts the single-domain reads
    touched: dict[str, int] = field(default_factory=dict)  # uuid -> the generation of its last single read


class Inventory:
    """The mirrors of every ``[libvirthostN]``. ``apply`` is called with each configuration."""

    def __init__(self, refresh_seconds: float | None = None) -> None:
        self.refresh_seconds = REFRESH_SECONDS if refresh_seconds is None else refresh_seconds
        self._hosts: dict[str, _Watched] = {}
        self._lock = threading.Lock()

    # -- life --------------------------------------------------------------------------

    def apply(self, settings: Settings) -> None:
        wanted = {h.ref: h for h in settings.hosts if isinstance(h, LibvirtHostSettings)}
        start_event_loop()
        stale = []
        with self._lock:
            for ref, watched in list(self._hosts.items()):
                if wanted.get(ref) != watched.settings:
                    stale.append(watched)
                    del self._hosts[ref]
            for ref, host in wanted.items():
                if ref not in self._hosts:
                    watched = _Watched(host, HostView(ref, HostState.CONNECTING, name=host.section))
                    watched.thread = threading.Thread(
                        target=self._watch, args=(watched,), name=f"libvirt-{host.section}", daemon=True
                    )
                    self._hosts[ref] = watched
                    watched.thread.start()
        for watched in stale:
            self._stop(watched)

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            hosts = list(self._hosts.values())
        return all(h.synced.wait(max(0.0, deadline - time.monotonic())) for h in hosts)

    def stop(self) -> None:
        with self._lock:
            hosts = list(self._hosts.values())
            self._hosts.clear()
        for watched in hosts:
            self._stop(watched)

    @staticmethod
    def _stop(watched: _Watched) -> None:
        watched.stop.set()
        watched.changed.put(None)
        if watched.thread is not None:
            watched.thread.join(timeout=10)

    # -- reading -----------------------------------------------------------------------

    def view(self, ref: str) -> HostView | None:
        with self._lock:
            watched = self._hosts.get(ref)
            others = list(self._hosts.values())
        if watched is None:
            return None
        view = watched.view
        if view.state is HostState.UP and view.host_uuid:
            earlier = [w for w in others if w.view.host_uuid == view.host_uuid and int(w.settings.ref) < int(ref)]
            if earlier:
                first = min(earlier, key=lambda w: int(w.settings.ref))
                return HostView(
                    ref,
                    HostState.DOWN,
                    f"the same host as [{first.settings.section}], which counts it",
                    name=view.name,
                    host_uuid=view.host_uuid,
                    same_as=first.settings.ref,
                )
        return view

    def connection(self, ref: str) -> Any:
        """The host's open connection (thread-safe), or None while it is not connected."""
        with self._lock:
            watched = self._hosts.get(ref)
        return None if watched is None or watched.view.state is not HostState.UP else watched.connection

    def changed(self, ref: str, uuid: str | None = None) -> None:
        """Read ``uuid`` (None: everything) again soon: a provisioning call changed it."""
        with self._lock:
            watched = self._hosts.get(ref)
        if watched is not None:
            watched.changed.put(uuid)

    def reread(self, ref: str, uuid: str) -> None:
        """Read one domain again now, on the caller's thread: a create or a hand-out that
        changed it answers only once the mirror shows the change."""
        with self._lock:
            watched = self._hosts.get(ref)
        if watched is not None and watched.connection is not None:
            try:
                self._read_domain(watched, uuid)
            except libvirt.libvirtError as e:
                log.info("%s: reading a domain again failed: %s", watched.settings.display, e)

    def refresh(self, ref: str) -> None:
        """Read the host again now, on the caller's thread (after a create or destroy, so
        that the mirror shows it before the caller answers)."""
        with self._lock:
            watched = self._hosts.get(ref)
        if watched is not None and watched.connection is not None:
            try:
                self._read_all(watched)
            except libvirt.libvirtError as e:
                log.info("%s: reading it again failed: %s", watched.settings.display, e)

    # -- the watcher -------------------------------------------------------------------

    def _watch(self, watched: _Watched) -> None:
        retry = backoff.Backoff(backoff.WATCHER)
        host = watched.settings
        while not watched.stop.is_set():
            try:
                self._connect(watched)
                self._read_all(watched)
                retry.succeeded()
                watched.synced.set()
                self._follow(watched)
            except libvirt.libvirtError as e:
                error = e.get_error_message() or str(e)
                if watched.view.state is not HostState.DOWN or watched.view.error != error:
                    log.warning("%s is down: %s", host.display, error)
                watched.view = HostView(host.ref, HostState.DOWN, error, name=host.section)
                watched.synced.set()
                self._disconnect(watched)
                watched.stop.wait(retry.failed())
        self._disconnect(watched)

    def _connect(self, watched: _Watched) -> None:
        quiet_errors()
        connection = libvirt.open(watched.settings.uri)
        if connection is None:
            raise libvirt.libvirtError(f"cannot connect to {watched.settings.display}")
        watched.connection = connection
        if "+" in watched.settings.uri.split("://")[0]:  # a remote transport (qemu+ssh, qemu+tls)
            connection.setKeepAlive(*KEEPALIVE)

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            watched.changed.put(None)

        def lifecycle(_conn: Any, dom: Any, _event: int, _detail: int, _opaque: Any) -> None:
            watched.changed.put(dom.UUIDString())

        connection.registerCloseCallback(closed, None)
        connection.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)

    def _disconnect(self, watched: _Watched) -> None:
        connection, watched.connection = watched.connection, None
        if connection is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            connection.close()

    def _follow(self, watched: _Watched) -> None:
        """Until the connection closes: a domain read again on each of its events, the
        whole host every ``refresh_seconds``."""
        next_full = time.monotonic() + self.refresh_seconds
        while not watched.stop.is_set():
            try:
                uuid = watched.changed.get(timeout=max(0.05, next_full - time.monotonic()))
            except queue.Empty:
                uuid = None
            if watched.stop.is_set():
                return
            if not watched.connection.isAlive():
                raise libvirt.libvirtError("the connection to libvirtd closed")
            if uuid is None:
                self._read_all(watched)
                next_full = time.monotonic() + self.refresh_seconds
            else:
                self._read_domain(watched, uuid)

    def _read_all(self, watched: _Watched) -> None:
        """Everything, afresh. A domain read on its own meanwhile (a create, a hand-out)
        keeps that newer reading: a full read that began before it must not undo it."""
        connection = watched.connection
        host = watched.settings
        with watched.updating:
            began = watched.generation
        _model, memory_mib, cpus, *_ = connection.getInfo()
        capabilities = ET.fromstring(connection.getCapabilities())
        domains = []
        for dom in connection.listAllDomains(0):
            try:
                domains.append(domain_view(dom))
            except libvirt.libvirtError:
                continue  # gone while listed
        volumes: list[VolumeView] = []
        available: int | None = None
        path = ""
        try:
            pool = connection.storagePoolLookupByName(host.storage_pool)
            if pool.isActive():
                available = int(pool.info()[3])
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
                for volume in pool.listAllVolumes(0):
                    try:
                        _type, capacity, allocation = volume.info()
                        volumes.append(VolumeView(volume.name(), volume.path(), int(capacity), int(allocation)))
                    except libvirt.libvirtError:
                        continue
        except libvirt.libvirtError:
            available = None
        try:
            network_active = bool(connection.networkLookupByName(host.network).isActive())
        except libvirt.libvirtError:
            network_active = False
        name, free = connection.getHostname(), int(connection.getFreeMemory())
        with watched.updating:
            newer = {uuid for uuid, generation in watched.touched.items() if generation > began}
            kept = [d for d in watched.view.domains if d.uuid in newer]
            watched.touched = {u: g for u, g in watched.touched.items() if g > watched.generation - 10_000}
            watched.view = HostView(
                ref=host.ref,
                state=HostState.UP,
                name=name,
                host_uuid=capabilities.findtext("host/uuid") or "",
                cpus=int(cpus),
                memory_total=int(memory_mib) * 1024 * 1024,
                memory_free=free,
                domains=(*(d for d in domains if d.uuid not in newer), *kept),
                volumes=tuple(volumes),
                pool_available=available,
                pool_path=path,
                network_active=network_active,
            )

    def _read_domain(self, watched: _Watched, uuid: str) -> None:
        try:
            fresh: DomainView | None = domain_view(watched.connection.lookupByUUIDString(uuid))
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            fresh = None
        free = int(watched.connection.getFreeMemory())
        with watched.updating:  # the watcher and a provisioning thread may both read one host
            watched.generation += 1
            watched.touched[uuid] = watched.generation
            view = watched.view
            others = tuple(d for d in view.domains if d.uuid != uuid)
            domains = others if fresh is None else (*others, fresh)
            watched.view = dataclasses.replace(view, domains=domains, memory_free=free)
