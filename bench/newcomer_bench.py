"""A newcomer's first minute: from a fresh clone of this repository to ``make lab``
answering, as the README's quick start has it (issue 28: at most 60 s on this machine).
Prints the time to the first answer of ``/healthz`` and of a getservers, the size of the
``.venv`` it made, and how many lines ``make lab`` printed before it served.

``python -m bench newcomer``; the clone is of what is committed (HEAD), in a temporary
folder, with the machine's pip and npm caches as they are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from rich.table import Table

from bench.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
LIMIT_SECONDS = 60.0


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def run() -> Table:
    table = Table(title=f"a fresh clone to make lab serving (goal: <= {LIMIT_SECONDS:.0f} s)")
    for column in ("measure", "value"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    with tempfile.TemporaryDirectory(prefix="dynvm-newcomer-") as tmp:
        clone = Path(tmp) / "dynvm"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        port = free_port()
        started = time.monotonic()
        lab = subprocess.Popen(
            ["make", "lab", f"PORT={port}"],
            cwd=clone,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        healthy = served = None
        try:
            while time.monotonic() - started < 600 and lab.poll() is None:
                try:
                    if healthy is None and httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        healthy = time.monotonic() - started
                        answer = httpx.get(f"{url}/getservers/newcomer?os=centos", timeout=60)
                        served = time.monotonic() - started if answer.status_code == 200 else None
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        finally:
            os.killpg(lab.pid, signal.SIGINT)  # Ctrl-C, as the README says
            output, _ = lab.communicate(timeout=120)
        steps = [line for line in output.splitlines() if line.startswith("make: [")]
        table.add_row("first answer of /healthz", f"{healthy:.1f} s" if healthy else "never")
        table.add_row("first getservers answered", f"{served:.1f} s" if served else "never")
        table.add_row(".venv made", f"{_size(clone / '.venv') / 2**20:.0f} MiB")
        table.add_row("progress lines before serving", str(len(steps)))
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(clone)], capture_output=True, text=True).stdout.split()
        table.add_row("processes left 1 s after Ctrl-C", str(len(left)))
    return table
