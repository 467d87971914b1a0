"""Starting ``dynvm sim`` and ``dynvm serve`` as processes for a benchmark, and small
statistics helpers. Everything binds 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.contextmanager
def sim_process(config: Path, *flags: str, timeout: float = 120) -> Iterator[subprocess.Popen]:
    """``dynvm sim --write-config CONFIG FLAGS...``, ready once the config exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dynvm", "sim", "--write-config", str(config), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not config.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dynvm sim did not start")
            time.sleep(0.05)
        yield process
    finally:
        _stop(process)


@contextlib.contextmanager
def serve_process(config: Path, db: Path, timeout: float = 60) -> Iterator[str]:
    """``dynvm serve`` on a free port; yields its base URL once /healthz answers."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynvm",
            "serve",
            "--config",
            str(config),
            "--db",
            f"sqlite:///{db}",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dynvm serve did not start")
            time.sleep(0.1)
        yield url
    finally:
        _stop(process)
