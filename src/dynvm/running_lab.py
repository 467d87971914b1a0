"""What a lab (simulated Xen hosts, or real guests under libvirt) gives ``dynvm lab``,
which serves it: how to name it, the OS to try, whether it still runs, extra lines to show."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunningLab:
    what: str
    os: str
    alive: Callable[[], bool]
    hints: tuple[str, ...] = ()
