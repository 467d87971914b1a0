"""The kinds of host dynvm can lease machines from, one per provider, and what every
configured host has whatever its kind.

A kind owns its section of ``.dynvmservice.ini`` (``[xenhostN]`` is the Xen kind's): its
keys, how they are checked, and the settings type they become (a subclass of
``HostSettings``). The engine sees only ``HostSettings``: a number (the host's ref in the
API), the OS keys it serves, and how to name it. Kinds are found by name, never imported
here: dynvm's own (``BUILTIN``), those installed as ``dynvm.providers`` entry points, and
those given to ``register`` (tests, embedders). The provider half of a kind is
``provider.ProviderPlugin``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, cast

ENTRY_POINTS = "dynvm.providers"
BUILTIN = {  # section prefix -> "module:attribute"
    "xenhost": "dynvm.xen.plugin:PLUGIN",
    "libvirthost": "dynvm.libvirt.plugin:PLUGIN",
    "static": "dynvm.static.plugin:PLUGIN",
}  # section prefix -> "module:attribute"
SECTION = re.compile(r"^([a-z][a-z-]*?)([1-9][0-9]*)$")
OS_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class HostSettings:
    """A configured host, as the engine sees it: ``number`` is the N of its section (its
    ref in the API, unique across kinds), ``templates`` maps each OS key it serves to what
    its provider makes that OS from (a template, an image)."""

    section_prefix: ClassVar[str] = "host"

    number: int
    templates: Mapping[str, str]

    @property
    def section(self) -> str:
        return f"{self.section_prefix}{self.number}"

    @functools.cached_property
    def ref(self) -> str:  # asked for on every placement, host by host: made once
        return str(self.number)

    @property
    def display(self) -> str:
        """How logs and errors name the host (never with credentials)."""
        return f"[{self.section}]"

    @property
    def address(self) -> str:
        """Where dynvm reaches the host (a xapi URL, a libvirt URI), as the API shows it."""
        return ""

    @property
    def origin(self) -> str:
        """Where a machine came from, as the history documents name it."""
        return self.section

    @property
    def details(self) -> str:
        """What else ``dynvm check-config`` shows of it (never a password)."""
        return ""


class SectionReader(Protocol):
    """What a kind is given to read its section with (``config.py``'s reader)."""

    path: Path

    def error(self, section: str, key: str | None, what: str) -> Exception: ...
    def warn(self, section: str, key: str | None, what: str) -> None: ...
    def boolean(self, section: str, values: Mapping[str, str], key: str, default: bool) -> bool: ...
    def number(
        self, section: str, values: Mapping[str, str], key: str, default: float, allow_zero: bool = False
    ) -> float: ...


class HostKind(Protocol):
    """A kind of host: its section prefix, its keys, and how its section is read."""

    section_prefix: str  # its sections are [<prefix>1], [<prefix>2], ...
    os_key_suffix: str  # "<os><suffix>=..." lines name what each OS is made from (".template")
    os_key_extras: tuple[str, ...]  # other per-OS suffixes it reads (".cpus", ".memory.mib")
    known_keys: frozenset[str]  # its other keys

    def parse(self, reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> HostSettings:
        """The host a section describes; ``reader.error(...)`` raised for a mistake."""
        ...


_registered: dict[str, HostKind] = {}
_loaded: dict[str, HostKind] = {}
_lock = threading.Lock()


def register(kind: HostKind) -> None:
    """Make a kind known by its section prefix (it replaces one of the same prefix)."""
    with _lock:
        _registered[kind.section_prefix] = kind


def unregister(prefix: str) -> None:
    with _lock:
        _registered.pop(prefix, None)


def _named() -> dict[str, str]:
    """Section prefix -> "module:attribute" of every kind installed, dynvm's first."""
    found = dict(BUILTIN)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        found.setdefault(entry.name, entry.value)
    return found


def kind(prefix: str) -> HostKind | None:
    """The kind whose sections start with ``prefix``, loaded on first use; None if none."""
    with _lock:
        if prefix in _registered:
            return _registered[prefix]
        if prefix in _loaded:
            return _loaded[prefix]
    target = _named().get(prefix)
    if target is None:
        return None
    module, _, attribute = target.partition(":")
    loaded = cast("HostKind", getattr(importlib.import_module(module), attribute))
    with _lock:
        _loaded[prefix] = loaded
    return loaded


def prefixes() -> list[str]:
    """Every section prefix a kind owns."""
    with _lock:
        registered = list(_registered)
    return sorted({*_named(), *registered})


def match(section: str) -> tuple[HostKind, int] | None:
    """The kind and number of a host section (``[xenhost3]``), or None for another section."""
    found = SECTION.match(section)
    if found is None:
        return None
    owner = kind(found.group(1))
    return (owner, int(found.group(2))) if owner is not None else None


def templates_of(reader: SectionReader, section: str, values: Mapping[str, str], suffix: str) -> dict[str, str]:
    """The ``<os><suffix>=<name>`` lines of a host section, checked: what every kind reads."""
    out = {}
    for key, value in values.items():
        if key.endswith(suffix):
            os_key = key.removesuffix(suffix)
            if not OS_KEY.match(os_key):
                raise reader.error(section, key, "an OS key is lower-case letters, digits, '-' or '_'")
            if not value.strip():
                raise reader.error(section, key, f"names no {suffix.strip('.')}")
            out[os_key] = value.strip()
    if not out:
        raise reader.error(section, None, f"has no <os>{suffix} line: which OSes does this host serve?")
    return out
