"""A ``[staticN]`` section: machines that already exist, of one OS, handed out whole. ::

    [static7]
    centos.machines=build-a@10.0.5.11, build-b@10.0.5.12   ; name@address, one OS a section
    reset.command=/usr/local/bin/reimage "$DYNVM_MACHINE"  ; after each release; exit 0: clean
    reset.timeout.secs=900
    probe.port=22                                          ; else [probe]'s port for the OS

A lease is exclusive use of one machine. After its release the reset command runs (in a
shell, with ``DYNVM_MACHINE``, ``DYNVM_ADDRESS``, ``DYNVM_OS`` and ``DYNVM_LEASE`` set); a
machine whose reset fails is taken out of service, shown as such, and tried again later.
A rack of several OSes is a section per OS: room is counted per section."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from ..hosts import HostSettings, SectionReader, templates_of

MACHINES_SUFFIX = ".machines"
KNOWN_KEYS = frozenset({"reset.command", "reset.timeout.secs", "probe.port"})
DEFAULT_RESET_TIMEOUT = 900.0
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class StaticMachine:
    name: str
    address: str


@dataclass(frozen=True)
class StaticHostSettings(HostSettings):
    """``templates``: its one OS -> "machines"."""

    section_prefix: ClassVar[str] = "static"

    os: str = ""
    machines: tuple[StaticMachine, ...] = ()
    reset_command: str = ""
    reset_timeout: float = DEFAULT_RESET_TIMEOUT
    probe_port: int | None = None

    def machine(self, name: str) -> StaticMachine | None:
        return next((m for m in self.machines if m.name == name), None)

    @property
    def details(self) -> str:
        reset = "reset by its command" if self.reset_command else "no reset command"
        return f"{len(self.machines)} {self.os} machine(s), {reset}"


def parse_static_host(
    reader: SectionReader, section: str, number: int, values: Mapping[str, str]
) -> StaticHostSettings:
    listed = templates_of(reader, section, values, MACHINES_SUFFIX)
    if len(listed) > 1:
        raise reader.error(
            section, None, f"lists machines of {len(listed)} OSes ({', '.join(sorted(listed))}): one OS a section"
        )
    [(os, entries)] = listed.items()
    machines: list[StaticMachine] = []
    for entry in (e.strip() for e in entries.split(",")):
        name, _, address = entry.partition("@")
        name, address = name.strip(), address.strip()
        if not entry:
            continue
        if not name or not address or not NAME.match(name):
            raise reader.error(section, f"{os}{MACHINES_SUFFIX}", f"{entry!r} is not name@address")
        if any(m.name == name for m in machines):
            raise reader.error(section, f"{os}{MACHINES_SUFFIX}", f"lists {name} twice")
        machines.append(StaticMachine(name, address))
    port = values.get("probe.port", "").strip()
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise reader.error(section, "probe.port", f"must be a TCP port, not {port!r}")
    return StaticHostSettings(
        number=number,
        templates={os: "machines"},
        os=os,
        machines=tuple(machines),
        reset_command=values.get("reset.command", "").strip(),
        reset_timeout=reader.number(section, values, "reset.timeout.secs", DEFAULT_RESET_TIMEOUT),
        probe_port=int(port) if port else None,
    )
