"""What a simulated host is made of (``HostSpec``), how slow it is (``Timing``) and what is
going wrong with it right now (``Faults``). Timing and faults can change while it runs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .catalogue import GiB

TiB = 1024 * GiB


@dataclass(slots=True)
class HostSpec:
    index: int  # 1-based, the N of [xenhostN]
    password: str
    user: str = "root"
    cpus: int = 32
    memory: int = 128 * GiB
    dom0_memory: int = 4 * GiB
    dom0_vcpus: int = 8
    sr_size: int = 2 * TiB
    foreign_vms: int = 0
    storage_name: str = ""
    dhcp_network: ipaddress.IPv4Network | None = None
    xenserver_version: tuple[int, int] = (8, 2)  # an older host lacks the messages released after it
    pool_size: int = 1  # hosts in this pool: the master, then members sharing its network
    storage: str = ""  # "shared": one SR every member reaches; "local": an SR per member; "": by pool size
    service_port: int = 0  # where a booted Linux guest's sshd listens (0: guests open no service)
    winrm_port: int = 0  # and a Windows guest's WinRM

    def __post_init__(self) -> None:
        if not self.storage_name:
            self.storage_name = f"Local Storage {self.index:02d}"
        if self.dhcp_network is None:
            self.dhcp_network = default_dhcp_network(self.index)

    @property
    def name_label(self) -> str:
        """The master's name (a one-host pool's only host)."""
        return f"sim-xen-{self.index:02d}"

    def member_name(self, position: int) -> str:
        """The name of the pool's ``position``-th host (0: the master)."""
        return self.name_label if position == 0 else f"{self.name_label}-h{position + 1}"

    @property
    def shared_storage(self) -> bool:
        """Whether the VMs' disks go on one SR every member reaches (a pool's default), or
        on each member's own local SR, all named alike (a lone host's, and the usual
        XCP-ng pool built from hosts with local disks)."""
        if self.storage not in ("", "shared", "local"):
            raise ValueError(f"storage is 'shared' or 'local', not {self.storage!r}")
        return self.storage == "shared" if self.storage else self.pool_size > 1


# Messages dynvm or its peers may call that a host has only from some XenServer release on
# (xenapi.json, each message's lifecycle "published" release: "ely" is XenServer 7.1; the
# tests check this table against it). An older host answers MESSAGE_METHOD_UNKNOWN.
INTRODUCED_IN: dict[str, tuple[int, int]] = {"VIF.move": (7, 1), "VM.set_memory": (7, 1)}


def default_dhcp_network(index: int) -> ipaddress.IPv4Network:
    """Host N (from 1) hands out addresses from 127.77.(N-1).0/24, .2 to .254 (then 127.78.x
    from host 257 on): loopback
    only, never a private or public range, so nothing can ever be sent off this machine."""
    block = index - 1
    return ipaddress.IPv4Network(f"127.{77 + block // 256}.{block % 256}.0/24")


@dataclass(slots=True)
class Timing:
    """Delays in seconds (latency in milliseconds), each multiplied by ``time_scale``."""

    latency_ms: float = 0.0
    clone_seconds: float = 0.0
    start_seconds: float = 0.0
    shutdown_seconds: float = 0.0  # VM.hard_shutdown: a real host takes a few seconds
    boot_seconds: float = 0.0
    ip_seconds: float = 0.0
    service_seconds: float = 0.0  # from the guest's address to its service port answering
    heartbeat_seconds: float = 0.0  # from a member going down to its master marking it not live
    time_scale: float = 1.0

    def scaled(self, seconds: float) -> float:
        return max(0.0, seconds * self.time_scale)

    @property
    def latency(self) -> float:
        return self.scaled(self.latency_ms / 1000.0)


@dataclass(slots=True)
class Faults:
    """Failures a test (or a user rehearsing an outage) switches on through ``sim.*``."""

    down: str = ""  # "", "hang" (accepts, never answers) or "refuse" (port closed)
    apipa_next: int = 0  # the next N boots report only a 169.254.x.y address
    apipa_rate: float = 0.0  # that fraction of all boots do
    dhcp_exhausted: bool = False  # no boot gets an address from the pool
    # operation ("clone", "start", "provision", "destroy", ...) -> [error code, times left]
    fail_next: dict[str, tuple[str, int]] = field(default_factory=dict)
    sr_reserved: int = 0  # bytes of the SR taken by something outside xapi's view
    service_never: bool = False  # booted guests never open their service port
    service_never_next: int = 0  # the next N boots never do

    def take_failure(self, operation: str) -> str | None:
        """The error code the next call of ``operation`` must fail with, if any."""
        entry = self.fail_next.get(operation)
        if not entry:
            return None
        code, left = entry
        if left <= 1:
            del self.fail_next[operation]
        else:
            self.fail_next[operation] = (code, left - 1)
        return code
