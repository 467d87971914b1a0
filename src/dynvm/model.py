"""Domain types shared across dynvm, and its error tree.

Every error dynvm raises on purpose is a ``DynvmError`` whose message is a sentence a
user can act on; it never contains a password.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DynvmError(Exception):
    """Base of every error dynvm raises on purpose."""


class XenError(DynvmError):
    """Something went wrong talking to a Xen host."""

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class HostUnreachable(XenError):
    """The host does not answer (refused, timed out, or backing off after failures)."""


class HostAuthFailed(XenError):
    """The host refused dynvm's credentials."""


class ProvisionError(XenError):
    """A VM could not be created; nothing it made is left behind unless ``leftovers`` says so."""

    def __init__(self, message: str, host: str = "", leftovers: tuple[str, ...] = ()) -> None:
        super().__init__(message, host)
        self.leftovers = leftovers


class NotDynvmVm(XenError):
    """dynvm refuses to touch a VM it did not create (no dynvm marker)."""


@dataclass(frozen=True)
class VmSpec:
    """What to create: from which template, under which name, with which resources."""

    name: str
    os: str
    template: str  # name (or name prefix) of the template on the host
    lease_id: str  # written into other_config as dynvm's marker
    cpus: int | None = None  # None: the template's own
    memory: int | None = None  # bytes; None: the template's own
    windows: bool = False


@dataclass(frozen=True)
class CreatedVm:
    uuid: str
    ref: str
    name: str
    ip: str
    os_version: dict[str, str] = field(default_factory=dict)
    cpus: int = 0
    memory: int = 0
    disk: int = 0  # bytes of its disks (not CD images)
    host: str = ""  # the host's ref ("1", "2", ...)
    template: str = ""
    create_seconds: float = 0.0
    attempts: int = 1
