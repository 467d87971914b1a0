"""A live, in-memory mirror of every configured host, kept by ``event.from``.

Per host, a watcher thread logs in with a session of its own, takes the current state of
the classes below in one ``event.from`` call (empty token: every object, atomically with
the token that follows it), then follows ``event.from`` and applies each add / mod / del.
A change on a host shows in the mirror as soon as xapi reports it. A host that stops
answering is marked down after at most ``event_timeout + 3`` seconds (the socket time-out
of the long poll) and retried with backoff; when it answers again it is resynchronised
from scratch.

Queries (``Inventory.view(ref)`` and friends) are answered from memory and never call
xapi. Records are trimmed to the fields dynvm reads, which keeps 10,000 VMs small.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import gc
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import XenAPI

from ..backoff import WATCHER, BackoffPolicy
from ..config import Settings
from ..model import HostAuthFailed, HostUnreachable
from .marker import MARKER_KEY, lease_of_clone_name
from .session import CONNECTION_ERRORS, SessionPool, describe, open_session
from .settings import XenHostSettings
from .templates import is_builtin

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"

# The classes mirrored, and the fields of each that dynvm reads.
KEPT_FIELDS: dict[str, tuple[str, ...]] = {
    "pool": ("uuid", "name_label", "master"),
    "host": (
        "uuid",
        "name_label",
        "address",
        "cpu_info",
        "metrics",
        "control_domain",
        "enabled",
        "PBDs",
        "memory_overhead",
    ),
    "host_metrics": ("uuid", "memory_total", "memory_free", "live"),
    "VM": (
        "uuid",
        "name_label",
        "name_description",
        "power_state",
        "is_a_template",
        "is_control_domain",
        "is_a_snapshot",
        "is_default_template",
        "VCPUs_max",
        "VCPUs_at_startup",
        "memory_static_max",
        "memory_overhead",
        "HVM_shadow_multiplier",
        "platform",
        "other_config",
        "resident_on",
        "guest_metrics",
        "VBDs",
        "VIFs",
    ),
    "VM_guest_metrics": ("uuid", "os_version", "networks"),
    "SR": ("uuid", "name_label", "type", "content_type", "shared", "physical_size", "physical_utilisation", "PBDs"),
    "PBD": ("uuid", "host", "SR", "currently_attached"),
    "PIF": ("uuid", "device", "network", "host", "management", "IP"),
    "network": ("uuid", "name_label", "bridge"),
    "VBD": ("uuid", "VM", "VDI", "type", "userdevice"),
    "VDI": ("uuid", "SR", "virtual_size", "type", "name_label", "other_config", "VBDs"),
}
CLASS_BY_LOWER = {name.lower(): name for name in KEPT_FIELDS}
FULL_LOADS_AT_ONCE = 4
ALIAS_RECHECK_SECONDS = 60.0  # how often a section of a pool counted elsewhere checks it still is


class HostState(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    SAME_POOL = "same pool"  # another, earlier section names the same pool: counted there


def is_real_ip(address: str | None) -> bool:
    """An address a CI job can use: not empty, not APIPA (169.254.x.y)."""
    return bool(address) and not str(address).startswith("169.254.")


def guest_addresses(networks: Mapping[str, str]) -> list[str]:
    """Every address a guest's ``VM_guest_metrics.networks`` reports, interface order
    ("0/ip" first), without duplicates: the one reading of that map, for the mirror and
    for a create waiting for its guest."""
    ordered = sorted(networks.items(), key=lambda kv: (kv[0] != "0/ip", kv[0]))
    seen: list[str] = []
    for key, value in ordered:
        if (key.endswith("/ip") or "/ipv4/" in key) and value and value not in seen:
            seen.append(value)
    return seen


@dataclass(frozen=True)
class VmView:
    ref: str
    uuid: str
    name: str
    description: str
    power_state: str
    vcpus: str  # as xapi gives it: a decimal string
    memory: str  # memory_static_max, a decimal string of bytes
    other_config: dict[str, str]
    networks: dict[str, str]
    os_version: dict[str, str]
    memory_overhead: int = 0  # bytes xapi holds for it beside memory_static_max
    resident_on: str = NULL_REF  # the pool member it runs on

    @property
    def running(self) -> bool:
        return self.power_state == "Running"

    @property
    def addresses(self) -> list[str]:
        """Every address the guest reports, interface order ("0/ip" first)."""
        return guest_addresses(self.networks)

    @property
    def networkinfo(self) -> str:
        """Every value of the guest's ``networks`` map joined by ',', in the order xapi
        sent them, duplicates and IPv6 included: what the seed's /showall answered."""
        return ",".join(self.networks.values())

    @property
    def ip(self) -> str | None:
        """The first usable address, if any."""
        return next((a for a in self.addresses if is_real_ip(a)), None)


@dataclass(frozen=True)
class DiskView:
    """A disk carrying dynvm's marker (the only disks the mirror lists)."""

    ref: str
    uuid: str
    name: str
    other_config: dict[str, str]
    attached: bool  # some VBD (of some VM) still refers to it


@dataclass(frozen=True)
class TemplateView:
    ref: str
    name: str
    vcpus: int
    memory: int
    disk: int  # bytes its VMs' disks will take
    memory_overhead: int = 0  # what xapi adds to memory_static_max to admit one of its VMs
    shadow_multiplier: float = 1.0
    cores_per_socket: int | None = None  # platform:cores-per-socket
    builtin: bool = False  # one of the host's built-in templates (picked only by exact name)


@dataclass(frozen=True)
class MemberView:
    """One host of a pool (a one-host pool's only one). CPU and memory are per member:
    a VM uses those of the member it runs on."""

    ref: str
    name: str
    cpus: int
    memory_total: int
    memory_free: int
    dom0_memory: int  # its control domain's memory_static_max plus memory_overhead
    master: bool
    enabled: bool = True  # False: xapi starts no VM there (host.disable, maintenance)
    live: bool = True  # host_metrics.live: False when the master lost touch with it
    memory_overhead: int = 0  # host.memory_overhead: what Xen keeps for itself
    address: str = ""  # where the member answers (host.address)


@dataclass(frozen=True)
class HostView:
    """A consistent snapshot of one configured host — a pool: its master and members — as
    of its mirror's last applied change. ``cpus``, ``memory_*`` sum the members'."""

    ref: str
    state: HostState
    error: str = ""
    name: str = ""
    cpus: int = 0
    memory_total: int = 0
    memory_free: int = 0
    dom0_memory: int = 0
    vms: tuple[VmView, ...] = ()  # not templates, not dom0, not snapshots
    templates: tuple[TemplateView, ...] = ()
    storage: dict[str, tuple[int, int]] = field(default_factory=dict)  # SR name -> (size, used)
    disks: tuple[DiskView, ...] = ()  # disks with dynvm's marker
    members: tuple[MemberView, ...] = ()  # the master first
    pool_uuid: str = ""
    same_pool_as: str = ""  # SAME_POOL: the ref of the section that counts this pool
    # SR name -> member ref -> (size, used): SRs of that name that a member reaches alone
    # (local storage, one per member, named alike); shared SRs are in ``storage``
    local_storage: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @property
    def running_vms(self) -> list[VmView]:
        return [vm for vm in self.vms if vm.running]

    @property
    def is_pool(self) -> bool:
        return len(self.members) > 1

    def member(self, ref: str) -> MemberView | None:
        return next((m for m in self.members if m.ref == ref), None)

    def storage_free(self, name: str) -> int | None:
        if name not in self.storage:
            return None
        size, used = self.storage[name]
        return size - used


def is_dynvm_clone(vm: dict[str, Any]) -> bool:
    """A clone dynvm is making, still a template: it keeps its clone name until provisioned
    (a template that merely carries dynvm's marker — made from a dynvm VM — is an admin's)."""
    return lease_of_clone_name(vm.get("name_label", "")) is not None


def _trim(cls: str, record: dict[str, Any]) -> dict[str, Any]:
    return {f: record[f] for f in KEPT_FIELDS[cls] if f in record}


def provision_disk_bytes(other_config: dict[str, str]) -> int:
    """The disks a template's ``other_config['disks']`` will create, in bytes."""
    spec = other_config.get("disks", "")
    if not spec:
        return 0
    try:
        return sum(int(d.get("size", "0")) for d in ET.fromstring(spec).findall("disk"))
    except (ET.ParseError, ValueError):
        return 0


class HostMirror:
    """The records of one host. Written only by its watcher; read by anyone."""

    def __init__(self, settings: XenHostSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, dict[str, Any]]] = {cls: {} for cls in KEPT_FIELDS}
        self._state = HostState.CONNECTING
        self._error = ""
        self._version = 0
        self._view: HostView | None = None
        self.synced = threading.Event()
        # what the pool is, remembered while the host is down: its uuid, and where its members
        # answer (to reach a new master when the configured address does not answer)
        self.pool_uuid = ""
        self.member_addresses: tuple[str, ...] = ()

    # -- written by the watcher -------------------------------------------------------

    def replace_all(self, events: Iterable[dict[str, Any]]) -> None:
        records: dict[str, dict[str, dict[str, Any]]] = {cls: {} for cls in KEPT_FIELDS}
        for event in events:
            cls = CLASS_BY_LOWER.get(event["class"])
            if cls is not None and event["operation"] != "del" and "snapshot" in event:
                records[cls][event["ref"]] = _trim(cls, event["snapshot"])
        with self._lock:
            self._records = records
            self._state = HostState.UP
            self._error = ""
            self._remember_pool()
            self._changed()
        self.synced.set()

    def apply(self, events: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for event in events:
                cls = CLASS_BY_LOWER.get(event["class"])
                if cls is None:
                    continue
                if event["operation"] == "del":
                    self._records[cls].pop(event["ref"], None)
                elif "snapshot" in event:
                    self._records[cls][event["ref"]] = _trim(cls, event["snapshot"])
            self._remember_pool()
            self._changed()

    def _remember_pool(self) -> None:
        pool = next(iter(self._records["pool"].values()), {})
        self.pool_uuid = pool.get("uuid", self.pool_uuid)
        master = pool.get("master", NULL_REF)
        hosts = self._records["host"]
        ordered = sorted(hosts, key=lambda ref: (ref != master, hosts[ref].get("name_label", "")))
        addresses = tuple(hosts[ref].get("address", "") for ref in ordered)
        if any(addresses):
            self.member_addresses = tuple(a for a in addresses if a)

    def park(self) -> None:
        """Another section counts this pool: drop its records (the other mirror has them)
        and keep only what identifies the pool and reaches it."""
        with self._lock:
            self._records = {cls: {} for cls in KEPT_FIELDS}
            self._changed()

    def mark_down(self, error: str) -> None:
        with self._lock:
            if self._state is not HostState.DOWN or self._error != error:
                self._state = HostState.DOWN
                self._error = error
                self._changed()
        self.synced.set()

    def _changed(self) -> None:
        self._version += 1
        self._view = None

    # -- read by anyone ---------------------------------------------------------------

    @property
    def state(self) -> HostState:
        with self._lock:
            return self._state

    def view(self) -> HostView:
        with self._lock:
            if self._view is None:
                self._view = self._build_view()
            return self._view

    def _build_view(self) -> HostView:
        ref = self.settings.ref
        if self._state is not HostState.UP:
            return HostView(ref, self._state, self._error, name=self.settings.section, pool_uuid=self.pool_uuid)
        guest = self._records["VM_guest_metrics"]
        vms, templates = [], []
        dom0_memory: dict[str, int] = {}  # member ref -> what its control domain holds
        for vm_ref, vm in self._records["VM"].items():
            if vm.get("is_control_domain"):
                member = vm.get("resident_on", NULL_REF)
                held = int(vm.get("memory_static_max", "0")) + int(vm.get("memory_overhead", "0"))
                dom0_memory[member] = dom0_memory.get(member, 0) + held
                continue
            if vm.get("is_a_snapshot"):
                continue
            if vm.get("is_a_template") and not is_dynvm_clone(vm):
                templates.append(self._template(vm_ref, vm))
                continue  # (dynvm's clone, not provisioned yet, is a VM to account for, not a template)
            metrics_of_vm = guest.get(vm.get("guest_metrics", NULL_REF), {})
            vms.append(
                VmView(
                    ref=vm_ref,
                    uuid=vm["uuid"],
                    name=vm.get("name_label", ""),
                    description=vm.get("name_description", ""),
                    power_state=vm.get("power_state", "Halted"),
                    vcpus=vm.get("VCPUs_at_startup", "0"),
                    memory=vm.get("memory_static_max", "0"),
                    other_config=vm.get("other_config", {}),
                    networks=metrics_of_vm.get("networks", {}),
                    os_version=metrics_of_vm.get("os_version", {}),
                    memory_overhead=int(vm.get("memory_overhead", "0")),
                    resident_on=vm.get("resident_on", NULL_REF),
                )
            )
        members = self._members(dom0_memory)
        storage: dict[str, tuple[int, int]] = {}
        local_storage: dict[str, dict[str, tuple[int, int]]] = {}
        pbds = self._records["PBD"]
        for sr in self._records["SR"].values():
            if sr.get("content_type") == "iso":
                continue
            figures = (int(sr.get("physical_size", "0")), int(sr.get("physical_utilisation", "0")))
            reached_by = {pbds[p].get("host") for p in sr.get("PBDs", ()) if p in pbds}
            if len(members) > 1 and len(reached_by) == 1 and not sr.get("shared", False):
                local_storage.setdefault(sr["name_label"], {})[cast(str, next(iter(reached_by)))] = figures
            else:
                storage[sr["name_label"]] = figures
        disks = tuple(
            DiskView(
                ref=vdi_ref,
                uuid=vdi["uuid"],
                name=vdi.get("name_label", ""),
                other_config=vdi.get("other_config", {}),
                attached=bool(vdi.get("VBDs")),
            )
            for vdi_ref, vdi in self._records["VDI"].items()
            if MARKER_KEY in vdi.get("other_config", {})
        )
        return HostView(
            ref=ref,
            state=HostState.UP,
            name=members[0].name if members else self.settings.section,
            cpus=sum(m.cpus for m in members),
            memory_total=sum(m.memory_total for m in members),
            memory_free=sum(m.memory_free for m in members),
            dom0_memory=sum(m.dom0_memory for m in members),
            vms=tuple(sorted(vms, key=lambda v: v.name)),
            templates=tuple(sorted(templates, key=lambda t: (t.name, t.ref))),
            storage=storage,
            disks=disks,
            members=members,
            pool_uuid=self.pool_uuid,
            local_storage=local_storage,
        )

    def _members(self, dom0_memory: dict[str, int]) -> tuple[MemberView, ...]:
        """Every host record of the pool, the master first, then by name."""
        pool = next(iter(self._records["pool"].values()), {})
        master = pool.get("master", NULL_REF)
        members = []
        for host_ref, host in self._records["host"].items():
            metrics = self._records["host_metrics"].get(host.get("metrics", NULL_REF), {})
            members.append(
                MemberView(
                    ref=host_ref,
                    name=host.get("name_label", ""),
                    cpus=int(host.get("cpu_info", {}).get("cpu_count", "0")),
                    memory_total=int(metrics.get("memory_total", "0")),
                    memory_free=int(metrics.get("memory_free", "0")),
                    dom0_memory=dom0_memory.get(host_ref, 0),
                    master=host_ref == master or len(self._records["host"]) == 1,
                    enabled=bool(host.get("enabled", True)),
                    live=bool(metrics.get("live", True)),
                    memory_overhead=int(host.get("memory_overhead", "0")),
                    address=host.get("address", ""),
                )
            )
        return tuple(sorted(members, key=lambda m: (not m.master, m.name)))

    def _template(self, ref: str, vm: dict[str, Any]) -> TemplateView:
        disk = provision_disk_bytes(vm.get("other_config", {}))
        for vbd_ref in vm.get("VBDs", []):
            vbd = self._records["VBD"].get(vbd_ref, {})
            vdi = self._records["VDI"].get(vbd.get("VDI", NULL_REF))
            if vbd.get("type") == "Disk" and vdi:
                disk += int(vdi.get("virtual_size", "0"))
        cores = vm.get("platform", {}).get("cores-per-socket", "")
        return TemplateView(
            ref=ref,
            name=vm.get("name_label", ""),
            vcpus=int(vm.get("VCPUs_at_startup", "0")),
            memory=int(vm.get("memory_static_max", "0")),
            disk=disk,
            memory_overhead=int(vm.get("memory_overhead", "0")),
            shadow_multiplier=float(vm.get("HVM_shadow_multiplier", 1.0)),
            cores_per_socket=int(cores) if cores.isdigit() and int(cores) > 0 else None,
            builtin=is_builtin(vm),
        )


def release_free_memory() -> None:
    """Hand memory freed by a full load back to the system (glibc keeps it otherwise)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _counted_in(ref: str, mirrors: dict[str, HostMirror]) -> str:
    """``mirrors`` in the configuration's order."""
    mirror = mirrors.get(ref)
    if mirror is None or not mirror.pool_uuid:
        return ref
    return _first_by_pool(tuple((r, m.pool_uuid) for r, m in mirrors.items())).get(mirror.pool_uuid, ref)


@functools.lru_cache(maxsize=8)
def _first_by_pool(identities: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Pool uuid -> the first section (in the configuration's order) that reached it."""
    first: dict[str, str] = {}
    for ref, uuid in identities:
        if uuid:
            first.setdefault(uuid, ref)
    return first


class HostWatcher:
    """Keeps one ``HostMirror`` in step with its host, on a thread of its own."""

    def __init__(
        self,
        mirror: HostMirror,
        event_timeout: float = 5.0,
        max_backoff: float = 10.0,
        on_change: Callable[[str], None] | None = None,
        full_loads: threading.BoundedSemaphore | None = None,
        on_up: Callable[[], None] | None = None,
        counted_elsewhere: Callable[[], bool] = lambda: False,
        alias_recheck: float = ALIAS_RECHECK_SECONDS,
    ) -> None:
        """``counted_elsewhere``: whether an earlier section counts this one's pool; such a
        watcher stops following events (the other one does) and only checks every
        ``alias_recheck`` seconds that its address still belongs to that pool."""
        self.mirror = mirror
        self._counted_elsewhere = counted_elsewhere
        self.alias_recheck = alias_recheck
        self._on_up = on_up or (lambda: None)
        self._full_loads = full_loads or threading.BoundedSemaphore(1)
        self.event_timeout = event_timeout
        self.max_backoff = max_backoff
        self._on_change = on_change or (lambda ref: None)
        self._stop = threading.Event()
        self._transport: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{mirror.settings.section}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        transport = self._transport
        if transport is not None:
            transport.abort()  # break a long poll in progress
        if wait:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        host = self.mirror.settings
        failures = 0
        while not self._stop.is_set():
            try:
                self._follow()
            except HostAuthFailed as e:
                self._down(str(e))
            except (HostUnreachable, *CONNECTION_ERRORS) as e:
                message = (
                    str(e) if isinstance(e, HostUnreachable) else f"{host.display} stopped answering: {describe(e)}"
                )
                self._down(message)
            except XenAPI.Failure as e:
                self._down(f"{host.display}: xapi error {' '.join(map(str, e.details))}")
            except Exception as e:  # never let the watcher die: the host would look frozen
                if self._stop.is_set():
                    return  # stop() cut its long poll short: what the cut left is no failure
                log.exception("%s: watcher failed", host.display)
                self._down(f"{host.display}: {e!r}")
            else:
                continue
            failures += 1
            self._stop.wait(BackoffPolicy(WATCHER.first, self.max_backoff).delay(failures))

    def _down(self, message: str) -> None:
        if self._stop.is_set():
            return
        was = self.mirror.state
        self.mirror.mark_down(message)
        if was is not HostState.DOWN:
            log.warning("host down: %s", message)
            self._on_change(self.mirror.settings.ref)

    def _follow(self) -> None:
        host = self.mirror.settings
        session, self._transport = open_session(
            host, self.event_timeout + 3.0, self.mirror.member_addresses, self.mirror.pool_uuid
        )
        try:
            xapi = session.xenapi
            classes = list(KEPT_FIELDS)
            # A full load parses every record of the host (XML parsing is CPU-bound, so
            # loading a hundred hosts at once is no faster): a few at a time keep the peak,
            # and with it the process's resident memory, low.
            with self._full_loads:
                batch = xapi.event_from(classes, "", 0.0)
                was = self.mirror.state
                if was is not HostState.UP:
                    self._on_up()  # before the mirror says "up": callers then find the host's calls open
                loaded = len(batch["events"])
                self.mirror.replace_all(batch.pop("events"))
                release_free_memory()  # the full load's parse is garbage now
            if was is not HostState.UP:
                log.info("host up: %s (%d objects)", host.display, loaded)
            self._on_change(host.ref)
            token = batch["token"]
            while not self._stop.is_set():
                if self._counted_elsewhere():
                    self.mirror.park()
                    self._on_change(host.ref)
                    self._wait_while_counted_elsewhere(xapi)
                    return  # its pool changed, or it counts now: load it whole again
                batch = xapi.event_from(classes, token, self.event_timeout)
                token = batch["token"]
                if batch["events"]:
                    self.mirror.apply(batch["events"])
                    self._on_change(host.ref)
        finally:
            if self._stop.is_set():
                self._transport.abort()

    def _wait_while_counted_elsewhere(self, xapi: Any) -> None:
        """A section of a pool another section counts: follow nothing (the pool's events
        would be parsed twice), and every ``alias_recheck`` seconds make sure the address
        still reaches that pool (a host can leave a pool and be installed anew)."""
        while not self._stop.wait(self.alias_recheck):
            pools: dict[str, dict[str, Any]] = xapi.pool.get_all_records()
            uuid = next(iter(pools.values()), {}).get("uuid", "")
            if uuid != self.mirror.pool_uuid or not self._counted_elsewhere():
                log.info("%s: no longer the same pool as another section; following it", self.mirror.settings.display)
                return


class Inventory:
    """Every configured host's mirror, watcher and session pool; follows config reloads."""

    def __init__(
        self,
        event_timeout: float = 5.0,
        call_timeout: float = 30.0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.event_timeout = event_timeout
        self.call_timeout = call_timeout
        self._on_change = on_change
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[HostMirror, HostWatcher, SessionPool]] = {}
        self._full_loads = threading.BoundedSemaphore(FULL_LOADS_AT_ONCE)
        self._announced: set[tuple[str, str]] = set()  # (section ref, the ref counting its pool) logged
        self._mirrors: dict[str, HostMirror] = {}  # by ref, in the configuration's order; replaced whole
        self._alias_views: dict[str, tuple[object, HostView]] = {}  # ref -> (what it was built from, view)

    def apply(self, settings: Settings) -> None:
        """Start watchers for new hosts, stop them for removed ones, restart changed ones.

        Called at start-up and by the config watcher on every reload."""
        wanted = {h.ref: h for h in settings.hosts if isinstance(h, XenHostSettings)}
        stale = []
        with self._lock:
            for ref, (mirror, watcher, pool) in list(self._hosts.items()):
                if wanted.get(ref) != mirror.settings:
                    stale.append((watcher, pool))
                    del self._hosts[ref]
            for ref, host in wanted.items():
                if ref not in self._hosts:
                    mirror = HostMirror(host)
                    pool = SessionPool(
                        host,
                        timeout=self.call_timeout,
                        members=cast("Callable[[], tuple[str, ...]]", lambda m=mirror: m.member_addresses),
                        pool_uuid=cast("Callable[[], str]", lambda m=mirror: m.pool_uuid),
                    )
                    watcher = HostWatcher(
                        mirror,
                        self.event_timeout,
                        on_change=self._on_change,
                        full_loads=self._full_loads,
                        on_up=pool.reconnected,  # the host answers again: so may the calls that back off
                        counted_elsewhere=cast("Callable[[], bool]", lambda r=ref: self.counted_in(r) != r),
                    )
                    self._hosts[ref] = (mirror, watcher, pool)
                    watcher.start()
                    log.info("watching %s", host.display)
            self._mirrors = {ref: self._hosts[ref][0] for ref in sorted(self._hosts, key=int)}
        for watcher, pool in stale:
            watcher.stop(wait=False)
            pool.close()
            log.info("stopped watching %s", watcher.mirror.settings.display)

    def refs(self) -> list[str]:
        with self._lock:
            return sorted(self._hosts, key=int)

    def mirror(self, ref: str) -> HostMirror | None:
        with self._lock:
            entry = self._hosts.get(ref)
        return entry[0] if entry else None

    def pool(self, ref: str) -> SessionPool | None:
        with self._lock:
            entry = self._hosts.get(ref)
        return entry[2] if entry else None

    def view(self, ref: str) -> HostView | None:
        mirrors = self._mirrors  # a snapshot, replaced whole when the configuration changes
        mirror = mirrors.get(ref)
        return None if mirror is None else self._as_counted(mirror, mirrors)

    def views(self) -> list[HostView]:
        mirrors = self._mirrors
        return [self._as_counted(mirror, mirrors) for mirror in mirrors.values()]

    def counted_in(self, ref: str) -> str:
        """The section that counts ``ref``'s pool: the first, in the configuration's order,
        that reached a pool with the same uuid (``ref`` itself for a pool no earlier section
        names, or one not reached yet). It never moves to a later section while the earlier
        one is down, so leases keep their host."""
        return _counted_in(ref, self._mirrors)

    def _as_counted(self, mirror: HostMirror, mirrors: dict[str, HostMirror]) -> HostView:
        view = mirror.view()
        ref = mirror.settings.ref
        same = _counted_in(ref, mirrors)
        if same == ref:
            return view
        counting = mirrors[same]
        name = counting.view().name
        key = (same, view, name)
        cached = self._alias_views.get(ref)
        if cached is not None and cached[0] == key:
            return cached[1]
        first = counting.settings
        if (ref, same) not in self._announced:
            self._announced.add((ref, same))
            log.warning(
                "%s names the same pool as %s: counted once, as [%s]",
                mirror.settings.display,
                first.display,
                first.section,
            )
        own = "" if view.state is HostState.UP else f"; its own address does not answer ({view.error})"
        alias = HostView(
            ref,
            HostState.SAME_POOL,
            f"the same pool as {first.display}: counted once, there{own}",
            name=name or first.section,
            pool_uuid=mirror.pool_uuid,
            same_pool_as=same,
        )
        self._alias_views[ref] = (key, alias)
        return alias

    def wait_synced(self, timeout: float = 30.0) -> bool:
        """Block until every host has been loaded once or found down (start-up)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            mirrors = [entry[0] for entry in self._hosts.values()]
        return all(m.synced.wait(max(0.0, deadline - time.monotonic())) for m in mirrors)

    def stop(self) -> None:
        with self._lock:
            entries = list(self._hosts.values())
            self._hosts.clear()
            self._mirrors = {}
        for _, watcher, pool in entries:
            watcher.stop(wait=False)
            pool.close()
        for _, watcher, _ in entries:
            watcher.stop(wait=True)
