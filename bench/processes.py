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
from typing import Any

import httpx

from dynvm.api.server import serves_database


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


def serve_argv(config: Path, db: Path | str, port: int, *extra: str) -> list[str]:
    """``dynvm serve`` on 127.0.0.1:``port``; ``db`` is a SQLite file or a database URL."""
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return [
        *(sys.executable, "-m", "dynvm", "serve", "--config", str(config), "--db", url),
        *("--port", str(port), "--log-level", "warning", *extra),
    ]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, db: Path | str | None = None) -> None:
    """Return once ``url``/healthz answers (with ``db``: answers for that database, not
    another process that took the port first); ``RuntimeError`` if the process exits first
    or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    db_url = None if db is None else db if isinstance(db, str) else f"sqlite:///{db}"
    while True:
        try:
            if db_url is not None:
                if serves_database(url, db_url):
                    return
            elif httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("dynvm serve exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"dynvm serve did not answer /healthz within {timeout:.0f} s")
        time.sleep(0.1)


def start_serve(
    config: Path, db: Path | str, *extra: str, port: int | None = None, timeout: float = 60, **popen: Any
) -> tuple[subprocess.Popen, int]:
    """``dynvm serve`` on ``port``, or on a free one (picked again should another process
    bind it first), once it answers for ``db``: the process and its port."""
    for _ in range(1 if port else 3):
        chosen = port or free_port()
        process = subprocess.Popen(serve_argv(config, db, chosen, *extra), **popen)
        try:
            wait_healthy(f"http://127.0.0.1:{chosen}", process, timeout, db)
            return process, chosen
        except RuntimeError:
            if process.poll() is None:
                process.kill()
                process.wait()
                raise
            if port:
                raise
    raise RuntimeError("dynvm serve exited at start, on three ports in a row")


@contextlib.contextmanager
def serve_process(config: Path, db: Path, timeout: float = 60) -> Iterator[str]:
    """``dynvm serve`` on a free port; yields its base URL once /healthz answers."""
    process, port = start_serve(config, db, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
