"""The dashboard at 10,000 VMs: a ``dynvm sim`` of 40 large hosts, a ``dynvm serve``, and
10,000 leased VMs made through the API; then each JSON route the page calls, 30 times in a
row, with the server time its ``Server-Timing`` header reports and the wall time seen by
the client (HTTP on 127.0.0.1 included).

Goal (issue 17): the JSON for the first screen (``overview`` and the first ``leases`` page,
which the page asks for together) under 100 ms of server time at that size.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.table import Table

from bench.processes import percentile, serve_process, sim_process

VMS = 10_000
BATCH = 500
HOSTS = 40  # the simulator gives each host a /24 of loopback addresses: 253 VMs
SAMPLES = 30
GOAL_MS = 100.0
ROUTES = {
    "overview": "/api/v1/dashboard/overview",
    "leases (first page of 50)": "/api/v1/dashboard/leases?limit=50",
    "leases (filtered, page 100)": "/api/v1/dashboard/leases?limit=50&offset=4950&user=load1",
    "queue": "/api/v1/dashboard/queue",
    "usage 24 h": "/api/v1/dashboard/usage?span=24h",
    "usage 7 d": "/api/v1/dashboard/usage?span=7d",
    "timings": "/api/v1/dashboard/timings",
    "top users": "/api/v1/dashboard/users",
}
FIRST_SCREEN = ("overview", "leases (first page of 50)")


def _fill(url: str) -> float:
    """Lease ``VMS`` VMs, ``BATCH`` per request, two requests at a time; the wall seconds."""
    started = time.perf_counter()

    def one(n: int) -> None:
        body = {"os": "centos", "name": f"load{n:02d}-", "count": BATCH}
        answer = httpx.post(f"{url}/api/v1/leases", params={"wait": "true"}, json=body, timeout=1800)
        if answer.status_code != 200:
            raise RuntimeError(f"filling the lab: {answer.status_code} {answer.text}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(VMS // BATCH)))
    return time.perf_counter() - started


def _measure(client: httpx.Client, path: str) -> tuple[list[float], list[float]]:
    server, wall = [], []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        answer = client.get(path)
        wall.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        timing = answer.headers.get("server-timing", "")
        server.append(float(timing.split("dur=")[1]) if "dur=" in timing else float("nan"))
    return server, wall


def run() -> Table:
    with tempfile.TemporaryDirectory(prefix="dynvm-bench-dashboard-") as work:
        config = Path(work) / "lab.ini"
        flags = ["--hosts", str(HOSTS), "--host-cpus", "1024", "--host-memory-gib", "2048", "--sr-tib", "200"]
        flags += ["--clone-seconds", "0", "--boot-seconds", "0", "--ip-seconds", "0", "--service-seconds", "0"]
        with sim_process(config, *flags):
            config.write_text(config.read_text() + "\n[quota]\nmax.count.per.request=1000\n")
            with serve_process(config, Path(work) / "dynvm.db", timeout=120) as url:
                fill_seconds = _fill(url)
                with httpx.Client(base_url=url, timeout=60) as client:
                    total = client.get("/api/v1/dashboard/leases?limit=1").json()["total"]
                    results = {label: _measure(client, path) for label, path in ROUTES.items()}
    table = Table(
        title=f"dashboard JSON at {total:,} leased VMs: {HOSTS} simulated hosts, dynvm serve, "
        f"{SAMPLES} requests per route (filled in {fill_seconds:.0f} s)"
    )
    for column in ("route", "server p50", "server p95", "wall p50", "wall p95"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for label, (server, wall) in results.items():
        table.add_row(
            label,
            f"{percentile(server, 0.5):.1f} ms",
            f"{percentile(server, 0.95):.1f} ms",
            f"{percentile(wall, 0.5):.1f} ms",
            f"{percentile(wall, 0.95):.1f} ms",
        )
    first = sum(percentile(results[label][0], 0.95) for label in FIRST_SCREEN)
    table.caption = (
        f"first screen (overview + first leases page), server p95 together: {first:.1f} ms; "
        f"goal < {GOAL_MS:.0f} ms: {'met' if first < GOAL_MS else 'NOT met'}"
    )
    return table
