"""The libvirt Python binding, where dynvm meets it: imported only when a ``[libvirthostN]``
is configured (the binding is an optional extra, ``libvirt``), its
error printing silenced, and its event loop run once per process on a thread of its own."""

from __future__ import annotations

import threading
from typing import Any

from ..model import DynvmError


class LibvirtMissing(DynvmError):
    """The configuration names a libvirt host, but the binding is not installed."""


def _load() -> Any:
    try:
        import libvirt as binding
    except ImportError:
        raise LibvirtMissing(
            "a [libvirthostN] section needs the libvirt binding: install dynvm's libvirt extra "
            "(pip install '<the dynvm wheel>[libvirt]'; it builds against Debian's libvirt-dev, "
            "pkg-config, gcc and python3-dev)"
        ) from None
    return binding


class _Lazy:
    """``libvirt.X`` resolves on first use, so importing this package never needs libvirt."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load(), name)


libvirt: Any = _Lazy()
_loop_started = False
_loop_lock = threading.Lock()


def quiet_errors() -> None:
    """libvirt prints every error to stderr unless a handler takes them: dynvm reads them
    from the exceptions instead."""
    _load().registerErrorHandler(lambda *_: None, None)


def start_event_loop() -> None:
    """Run libvirt's default event loop on a daemon thread (once per process): domain
    events and connection keepalives need it, and it must be registered before the first
    connection is opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        binding = _load()
        quiet_errors()
        binding.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                binding.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True
