"""getservers wall time for count 1, 8 and 32, through real ``dynvm serve`` and ``dynvm sim``
processes (``--boot-seconds 2 --ip-seconds 1``, clone 0.5 s): a VM cannot be ready in less
than 3.5 s, and VMs of one request are made in parallel. Goal: count=8 <= 1.5 x count=1.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.table import Table

from bench.processes import serve_process, sim_process

CLONE, BOOT, IP = 0.5, 2.0, 1.0
FLOOR = CLONE + BOOT + IP


def run(runs: int = 3) -> Table:
    results: dict[int, list[float]] = {1: [], 8: [], 32: []}
    flags = (
        "--hosts",
        "4",
        "--host-cpus",
        "64",
        "--clone-seconds",
        str(CLONE),
        "--boot-seconds",
        str(BOOT),
        "--ip-seconds",
        str(IP),
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lab.ini"
        with (
            sim_process(config, *flags),
            serve_process(config, Path(tmp) / "d.db") as url,
            httpx.Client(base_url=url, timeout=300) as client,
        ):
            for n in range(runs):
                for count in results:
                    started = time.perf_counter()
                    answer = client.get(f"/getservers/bench{count}x{n}", params={"os": "centos", "count": count})
                    results[count].append(time.perf_counter() - started)
                    assert answer.status_code == 200, answer.text
                    assert len(answer.json()) == count
                    client.get(f"/releaseservers/bench{count}x{n}", params={"count": count})
    one, eight, many = (statistics.median(results[c]) for c in (1, 8, 32))
    table = Table(
        title=f"getservers wall time, sim clone {CLONE} s + boot {BOOT} s + IP {IP} s = {FLOOR} s "
        f"({os.cpu_count()} CPUs, median of {runs})"
    )
    for column, justify in (("figure", "left"), ("measured", "right"), ("goal", "right"), ("met", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_row("count=1", f"{one:.2f} s", "-", "-")
    table.add_row(
        "count=8", f"{eight:.2f} s", f"≤ {1.5 * one:.2f} s (1.5 × count=1)", "yes" if eight <= 1.5 * one else "NO"
    )
    table.add_row("count=32", f"{many:.2f} s", f"≤ {2 * one:.2f} s (2 × count=1)", "yes" if many <= 2 * one else "NO")
    overhead = one - FLOOR
    table.add_row(
        "dynvm's own time per request, count=1 (wall − 3.5 s)",
        f"{overhead * 1e3:.0f} ms",
        "≤ 50 ms",
        "yes" if overhead <= 0.05 else "NO",
    )
    return table
