"""``SimHost``: the state of one simulated Xen host, shared by its API handlers.

It owns the object store, the timing and fault settings, the DHCP pool and the refs of
the objects every host has (the host itself, its pool, dom0, the local SR, the management
network). A ``SimHost`` is really one *pool*: one database, as xapi keeps one per pool on
its master, holding a ``host`` record per member (``members``; the master first). Memory
is per member: a VM holds memory on the member it is ``resident_on``. Behaviour lives
elsewhere: ``population`` fills a new host, ``lifecycle`` changes VMs and disks, ``guest``
plays the guest agent, ``api`` answers the wire.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from .catalogue import OsTemplate
from .scheduler import Scheduler
from .services import GuestServices
from .settings import Faults, HostSpec, Timing
from .store import ObjectStore

MiB = 1024**2


def member_address(position: int) -> str:
    """Where a pool's member ``position`` (0 first) answers: a loopback address of its own,
    as a real pool's hosts each have an address (its port is the pool's)."""
    return f"127.0.0.{position + 1}"


def host_memory_overhead(memory_total: int) -> int:
    """What Xen keeps of a host's memory for itself (``host.memory_overhead``): it grows
    with the host's memory. About 3.6 %, whole MiB: 4.57 GiB of 128 GiB, as the XenServer
    7.2 hosts in real-records report 4.61 and 4.87 GB."""
    return memory_total * 10 // 280 // MiB * MiB


def xapi_datetime(epoch: float) -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(epoch)))


@dataclass(slots=True)
class HostRefs:
    host: str = ""
    pool: str = ""
    metrics: str = ""
    dom0: str = ""
    sr: str = ""
    iso_sr: str = ""
    tools_iso: str = ""
    network: str = ""
    pif: str = ""
    templates: dict[str, str] = field(default_factory=dict)  # name_label -> ref
    members: list[str] = field(default_factory=list)  # host refs, the first master (``host``) first
    local_srs: dict[str, str] = field(default_factory=dict)  # host ref -> its own SR (local storage)
    member_metrics: dict[str, str] = field(default_factory=dict)  # host ref -> host_metrics ref


class DhcpPool:
    """Leases of the host's loopback range, one per running VM. A freed address goes to
    the back of the queue, as a DHCP server reuses the least recently used one first: a
    guest that died without a release (its host crashed) does not see its address given
    to the next boot at once."""

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self._free = [str(ip) for ip in list(network.hosts())[1:]]  # .1 is the gateway
        self._free.reverse()
        self._leases: dict[str, str] = {}  # vm ref -> ip
        self._lock = threading.Lock()

    def lease(self, vm: str) -> str | None:
        with self._lock:
            if vm in self._leases:
                return self._leases[vm]
            if not self._free:
                return None
            ip = self._free.pop()
            self._leases[vm] = ip
            return ip

    def release(self, vm: str) -> None:
        """Give back the VM's addresses: its first NIC's (keyed by the VM) and any other's
        (keyed ``<vm>#<device>``)."""
        with self._lock:
            for key in [k for k in self._leases if k == vm or k.startswith(f"{vm}#")]:
                self._free.insert(0, self._leases.pop(key))  # _free is taken from its end

    @property
    def available(self) -> int:
        with self._lock:
            return len(self._free)


class SimHost:
    """Built empty; ``population.build_host`` creates one with its standard inventory."""

    def __init__(
        self,
        spec: HostSpec,
        timing: Timing | None = None,
        scheduler: Scheduler | None = None,
        wallclock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.spec = spec
        self.timing = timing or Timing()
        self.faults = Faults()
        self.store = ObjectStore()
        self.wallclock = wallclock
        self.random = random.Random(seed)
        self._own_scheduler = scheduler is None
        self.scheduler = scheduler or Scheduler()
        assert spec.dhcp_network is not None
        self.dhcp = DhcpPool(spec.dhcp_network)
        self.refs = HostRefs()
        self.boot_epochs: dict[str, int] = {}  # vm ref -> boot number; stale timers check it
        self.guest_os: dict[str, OsTemplate] = {}  # vm ref -> what its guest reports
        self._domids = iter(range(1, 1 << 30))
        self.up = threading.Event()
        self.up.set()
        self.services = GuestServices()  # the guests' sshd / WinRM ports
        self.member_slow: dict[int, float] = {}  # member position -> extra seconds per call
        self.members_down: set[int] = set()  # members whose address does not answer (sim.member_down)
        self.crashed: set[int] = set()  # of those, the ones switched off (their guests stopped)
        # member position -> the position of the master it believes in (its pool.conf): an
        # emergency transition changes only the member it ran on, until pool.recover_slaves
        self.believed_master: dict[int, int] = {}

    def master_position(self) -> int:
        """Which member is the pool's master now (it moves with a new master)."""
        with self.store.lock:
            master = str(self.store.get("pool", self.refs.pool)["master"])
        return self.refs.members.index(master) if master in self.refs.members else 0

    def master_of(self, position: int) -> int:
        """The master member ``position`` names in ``HOST_IS_SLAVE``."""
        return self.believed_master.get(position, 0)

    def member_latency(self, position: int) -> float:
        return self.timing.scaled(self.member_slow.get(position, 0.0))

    def now(self) -> xmlrpc.client.DateTime:
        return xapi_datetime(self.wallclock())

    def next_domid(self) -> str:
        return str(next(self._domids))

    def sleep(self, seconds: float) -> None:
        """Sleep a scaled delay in the calling (request) thread; holds no lock."""
        if seconds > 0:
            time.sleep(self.timing.scaled(seconds))

    def close(self) -> None:
        self.services.stop()
        if self._own_scheduler:
            self.scheduler.stop()

    # -- memory accounting -------------------------------------------------------------

    def memory_in_use(self, member: str | None = None) -> int:
        """Bytes held on a member (the first master when not given) as xapi's admission
        counts them (memory_check.ml, ``compute_free_memory``): Xen's own
        ``host.memory_overhead``, then each resident domain, dom0 included, at
        ``memory_static_max`` plus its ``memory_overhead``."""
        with self.store.lock:
            host = self.store.get("host", member or self.refs.host)
            total = int(host["memory_overhead"])  # type: ignore[call-overload]  # a record's fields are object-typed; these are integers
            for vm in cast("list[str]", host["resident_VMs"]):
                record = self.store.get("VM", vm)
                total += int(record["memory_static_max"]) + int(record["memory_overhead"])  # type: ignore[call-overload]  # a record's fields are object-typed; these are integers
            return total

    def memory_free(self, member: str | None = None) -> int:
        return self.spec.memory - self.memory_in_use(member)

    def refresh_memory_free(self) -> None:
        """Write every member's free memory into its ``host_metrics``, only where it changed
        (an unchanged record must not make an event)."""
        with self.store.lock:
            now = self.now()
            for member, metrics in self.refs.member_metrics.items():
                free = str(self.memory_free(member))
                if self.store.get("host_metrics", metrics)["memory_free"] != free:
                    self.store.update("host_metrics", metrics, memory_free=free, last_updated=now)

    # -- storage accounting ------------------------------------------------------------

    def refresh_sr_usage(self, sr: str) -> None:
        with self.store.lock:
            used = 0
            allocated = 0
            for vdi in cast("list[str]", self.store.get("SR", sr)["VDIs"]):
                record = self.store.get("VDI", vdi)
                used += int(record["physical_utilisation"])  # type: ignore[call-overload]  # a record's fields are object-typed; these are integers
                allocated += int(record["virtual_size"])  # type: ignore[call-overload]  # a record's fields are object-typed; these are integers
            if sr == self.refs.sr:
                used += self.faults.sr_reserved
            self.store.update("SR", sr, physical_utilisation=str(used), virtual_allocation=str(allocated))

    def sr_free(self, sr: str) -> int:
        with self.store.lock:
            record = self.store.get("SR", sr)
            return int(record["physical_size"]) - int(record["physical_utilisation"])  # type: ignore[call-overload]  # a record's fields are object-typed; these are integers
