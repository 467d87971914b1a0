"""The service a booted guest offers — sshd, or WinRM on Windows — played by a real
listening TCP socket on the guest's own loopback address, so that dynvm's readiness probe
is tested over real sockets.

A guest opens its port ``Timing.service_seconds`` after it reports its address (``guest.py``)
and closes it when its domain stops. A fault (``Faults.service_never``, or
``service_never_next`` boots) keeps it closed: the guest has an address and never answers.
The ports are the lab's (``HostSpec.service_port``, ``winrm_port``): ports any user can
bind, since developers and CI may not run as root; 0 turns the services off.

One thread per host accepts connections and closes them at once: a probe only needs the
handshake. Opening and closing may be called from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 uses now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GuestServices:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, socket.socket] = {}  # vm ref -> its listening socket
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stop = threading.Event()

    def open(self, vm: str, ip: str, port: int) -> bool:
        """Listen on ``ip:port`` for ``vm``; False when the address cannot be bound (then
        the guest is one whose service never answers, as a real one with a broken sshd)."""
        if port <= 0:
            return False
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((ip, port))
            listener.listen(16)
            listener.setblocking(False)
        except OSError as e:
            listener.close()
            log.warning("guest %s: cannot open its service on %s:%d (%s)", vm, ip, port, e)
            return False
        with self._lock:
            if self._stopped:
                listener.close()
                return False
            self.close_locked(vm)
            self._open[vm] = listener
            self._started().register(listener, selectors.EVENT_READ)
        return True

    def close(self, vm: str) -> None:
        with self._lock:
            self.close_locked(vm)

    def close_locked(self, vm: str) -> None:
        listener = self._open.pop(vm, None)
        if listener is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener)
        listener.close()

    def listening(self, vm: str) -> tuple[str, int] | None:
        with self._lock:
            listener = self._open.get(vm)
            return listener.getsockname() if listener is not None else None

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._stop.set()
            for vm in list(self._open):
                self.close_locked(vm)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _started(self) -> selectors.BaseSelector:
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._thread = threading.Thread(target=self._accept_loop, name="sim-guest-services", daemon=True)
            self._thread.start()
        return self._selector

    def _accept_loop(self) -> None:
        selector = self._selector
        assert selector is not None
        while True:
            with self._lock:
                if self._stopped:
                    selector.close()
                    return
                idle = not self._open
            if idle:
                self._stop.wait(0.1)
                continue
            try:
                ready = selector.select(timeout=0.2)
            except (OSError, ValueError):
                continue  # a socket closed meanwhile
            for key, _ in ready:
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]  # a selector key's fileobj is the listening socket registered just above
                    conn.close()
                except OSError:
                    pass
