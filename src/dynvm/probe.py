"""The readiness probe: a VM is ready when a TCP connection to its service port (sshd,
WinRM) succeeds, not when the hypervisor first reports an address — sshd may still be
starting then, and a job's first ssh would fail. Provider-neutral: it needs an address
and a port (``[probe]`` in the configuration, ``ProbeSettings.port_for``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Protocol

from tenacity import RetryError, Retrying, retry_if_exception_type, wait_fixed

ATTEMPT_TIMEOUT = 1.0  # seconds one connect may take: a guest that drops SYNs is retried, not waited on
PAUSE = 0.05  # between attempts: a refused connect returns at once (so this is cheap)


class _Cancel(Protocol):
    def is_set(self) -> bool: ...


class ServiceDown(Exception):
    """The port did not answer before the deadline."""


def answers(ip: str, port: int, timeout: float = ATTEMPT_TIMEOUT) -> bool:
    """One connection attempt: True when the handshake completes."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until_answering(
    ip: str,
    port: int,
    deadline: float,
    cancel: _Cancel | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Connect to ``ip:port`` until it answers; the seconds it took. ``ServiceDown`` at
    ``deadline`` (on ``clock``), or as soon as ``cancel`` is set (the caller checks why)."""
    started = clock()

    def connect() -> None:
        left = deadline - clock()
        with socket.create_connection((ip, port), timeout=max(0.05, min(ATTEMPT_TIMEOUT, left))):
            pass

    def out_of_time(_: object) -> bool:
        return clock() >= deadline or (cancel is not None and cancel.is_set())

    try:
        for attempt in Retrying(
            retry=retry_if_exception_type(OSError),
            stop=out_of_time,
            wait=wait_fixed(PAUSE),
        ):
            with attempt:
                connect()
    except RetryError:
        raise ServiceDown(f"{ip}:{port} did not answer") from None
    return clock() - started
