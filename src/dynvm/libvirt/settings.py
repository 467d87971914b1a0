"""A ``[libvirthostN]`` section: one KVM (or QEMU) host that libvirt manages, reached by its
URI, and the settings it becomes. ::

    [libvirthost3]
    uri=qemu+ssh://root@kvm3.example.com/system
    storage.pool=default          ; where base volumes live and clones are made
    network=default               ; the libvirt network the guests join (DHCP gives addresses)
    domain.type=kvm               ; qemu: software emulation (CI machines without KVM)
    host.reserve.mib=1024         ; memory left to the host itself
    centos.image=centos7.qcow2    ; the OS's base volume in storage.pool
    centos.cpus=2
    centos.memory.mib=2048
    tiny.image=tiny.qcow2
    tiny.kernel=/var/lib/dynvm/images/vmlinux   ; direct kernel boot (optional)
    tiny.initrd=/var/lib/dynvm/images/initrd.img
    tiny.cmdline=console=ttyS0 quiet

An OS key means the same here as on a ``[xenhostN]``: ``centos`` is asked for by
``os=centos`` on either kind."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..hosts import HostSettings, SectionReader, templates_of

IMAGE_SUFFIX = ".image"
OS_SUFFIXES = (".cpus", ".memory.mib", ".kernel", ".initrd", ".cmdline")  # beside <os>.image
KNOWN_KEYS = frozenset({"uri", "storage.pool", "network", "domain.type", "host.reserve.mib", "tcg.cache.mib"})
DOMAIN_TYPES = ("kvm", "qemu")
DEFAULT_CPUS = 1
DEFAULT_MEMORY_MIB = 1024
DEFAULT_RESERVE_MIB = 1024
DEFAULT_TCG_CACHE_MIB = 32
URI = re.compile(r"^[a-z][a-z0-9+]*://")


@dataclass(frozen=True)
class OsImage:
    """What a VM of one OS is made from on this host, and what it is given."""

    volume: str  # the base volume's name in the storage pool
    cpus: int = DEFAULT_CPUS
    memory_mib: int = DEFAULT_MEMORY_MIB
    kernel: Path | None = None  # direct kernel boot: the kernel on the host
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class LibvirtHostSettings(HostSettings):
    """``templates``: OS key -> base volume name; ``images``: the rest of each OS's lines."""

    section_prefix: ClassVar[str] = "libvirthost"

    uri: str = "qemu:///system"
    storage_pool: str = "default"
    network: str = "default"
    domain_type: str = "kvm"
    reserve_mib: int = DEFAULT_RESERVE_MIB
    tcg_cache_mib: int = DEFAULT_TCG_CACHE_MIB
    images: Mapping[str, OsImage] = field(default_factory=dict)

    @property
    def display(self) -> str:
        return f"{self.section} ({without_credentials(self.uri)})"

    @property
    def address(self) -> str:
        return without_credentials(self.uri)

    @property
    def origin(self) -> str:
        """The host a VM came from, as the history names it: the URI's host (or the local
        machine's ``localhost``)."""
        return urllib.parse.urlsplit(self.uri).hostname or "localhost"

    @property
    def details(self) -> str:
        return f"storage pool {self.storage_pool}, network {self.network}, domain type {self.domain_type}"


def without_credentials(uri: str) -> str:
    """``qemu+ssh://user:secret@host/system`` -> ``qemu+ssh://user@host/system``; query
    parameters (a keyfile's path) are kept, a password never."""
    return re.sub(r"(?<=://)([^/@:]*):[^/@]*@", r"\1@", uri)


def parse_libvirt_host(
    reader: SectionReader, section: str, number: int, values: Mapping[str, str]
) -> LibvirtHostSettings:
    uri = values.get("uri", "").strip()
    if not uri:
        raise reader.error(section, "uri", "is missing: qemu:///system, or qemu+ssh://user@host/system")
    if not URI.match(uri):
        raise reader.error(section, "uri", f"must be a libvirt URI (qemu:///system), not {without_credentials(uri)!r}")
    if urllib.parse.urlsplit(uri).password:
        raise reader.error(section, "uri", "must not hold a password: use an SSH key (?keyfile=...)")
    domain_type = values.get("domain.type", "kvm").strip().lower() or "kvm"
    if domain_type not in DOMAIN_TYPES:
        raise reader.error(section, "domain.type", f"must be kvm or qemu, not {domain_type!r}")
    volumes = templates_of(reader, section, values, IMAGE_SUFFIX)

    def whole(key: str, default: int, minimum: int = 1) -> int:
        raw = values.get(key, "").strip()
        if not raw:
            return default
        if not raw.isdigit() or int(raw) < minimum:
            raise reader.error(section, key, f"must be a whole number of at least {minimum}, not {raw!r}")
        return int(raw)

    def path(key: str) -> Path | None:
        raw = values.get(key, "").strip()
        if not raw:
            return None
        found = Path(raw).expanduser()
        return found if found.is_absolute() else (reader.path.parent / found).resolve()

    for key in values:
        if key.endswith(OS_SUFFIXES) and key not in KNOWN_KEYS:
            os = next(key.removesuffix(s) for s in OS_SUFFIXES if key.endswith(s))
            if os not in volumes:
                raise reader.error(section, key, f"names OS {os!r}, which has no {os}{IMAGE_SUFFIX} line")
    images = {}
    for os, volume in volumes.items():
        kernel, initrd = path(f"{os}.kernel"), path(f"{os}.initrd")
        if initrd is not None and kernel is None:
            raise reader.error(section, f"{os}.initrd", f"needs {os}.kernel too (direct kernel boot)")
        images[os] = OsImage(
            volume=volume,
            cpus=whole(f"{os}.cpus", DEFAULT_CPUS),
            memory_mib=whole(f"{os}.memory.mib", DEFAULT_MEMORY_MIB, minimum=32),
            kernel=kernel,
            initrd=initrd,
            cmdline=values.get(f"{os}.cmdline", "").strip(),
        )
    return LibvirtHostSettings(
        number=number,
        templates=volumes,
        uri=uri,
        storage_pool=values.get("storage.pool", "").strip() or "default",
        network=values.get("network", "").strip() or "default",
        domain_type=domain_type,
        reserve_mib=whole("host.reserve.mib", DEFAULT_RESERVE_MIB, minimum=0),
        tcg_cache_mib=whole("tcg.cache.mib", DEFAULT_TCG_CACHE_MIB),
        images=images,
    )
