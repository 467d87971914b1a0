"""dynvm serve at scale, through real processes (SPEC.md §1 routes over HTTP):

- /showall and /getavailablecount p50 and p99 with 20 hosts x 50 VMs and 100 hosts x 100
  VMs (simulator --latency-ms 2), beside the seed's per-VM listing on the same simulator;
- a storm of 3 x capacity concurrent getservers: granted = capacity, no 5xx, and
  /getavailablecount p99 meanwhile;
- the service's RSS with 10,000 VMs in its inventory.
Goals: ratio >= 100x; /getavailablecount p50 <= 50 ms; storm p99 <= 100 ms; RSS <= 300 MB.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from configparser import ConfigParser
from pathlib import Path

import httpx
import psutil
import XenAPI
from rich.table import Table

from bench.processes import percentile, serve_process, sim_process
from bench.xen_bench import _seed_listing

SAMPLES = 60
STORM_ROUNDS = 3


def _wait_all_up(client: httpx.Client, hosts: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [h["state"] for h in client.get("/api/v1/hosts").json()]
        if len(states) == hosts and all(s == "up" for s in states):
            return
        time.sleep(0.5)
    raise RuntimeError("the hosts did not all come up")


def _timed(client: httpx.Client, path: str, n: int = SAMPLES) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        answer = client.get(path)
        samples.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
    return samples


def _serve_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            return connection.pid
    raise RuntimeError("no process listens on the service's port")


def scale(hosts: int, vms: int) -> dict[str, float]:
    flags = (
        "--hosts",
        str(hosts),
        "--foreign-vms",
        str(vms),
        "--host-memory-gib",
        "4096",
        "--host-cpus",
        "2048",
        "--sr-tib",
        "8",
        "--latency-ms",
        "2",
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lab.ini"
        with sim_process(config, *flags, timeout=600), serve_process(config, Path(tmp) / "d.db", timeout=600) as url:
            with httpx.Client(base_url=url, timeout=120) as client:
                _wait_all_up(client, hosts)
                showall = _timed(client, "/showall")
                count = _timed(client, "/getavailablecount")
                listed = sum(len(v) for v in client.get("/showall").json().values())
                assert listed == hosts * vms, listed
                rss = psutil.Process(_serve_pid(url)).memory_info().rss / 1e6
            parser = ConfigParser(interpolation=None)
            parser.read(config)
            sessions = []
            for section in parser.sections():
                if section.startswith("xenhost"):
                    session = XenAPI.Session(parser[section]["host.name"])
                    session.xenapi.login_with_password("root", parser[section]["host.password"], "2.21", "seed")
                    sessions.append(session.xenapi)
            started = time.perf_counter()
            assert len(_seed_listing(sessions)) == hosts * vms
            seed = time.perf_counter() - started
    return {
        "showall_p50": statistics.median(showall),
        "showall_p99": percentile(showall, 0.99),
        "count_p50": statistics.median(count),
        "count_p99": percentile(count, 0.99),
        "seed": seed,
        "rss_mb": rss,
    }


def _observe(url: str, stop, out) -> None:  # type: ignore[no-untyped-def]
    """Count every 20 ms until told to stop; runs in a process of its own, as another job
    asking would, so that the storm's client threads do not slow the observer itself."""
    samples = []
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.get("/getavailablecount").status_code == 200
            samples.append(time.perf_counter() - started)
            time.sleep(0.02)
    out.put(samples)


def storm_round() -> dict[str, object]:
    """4 hosts of 16 CPUs: room for 16 CentOS VMs; 48 getservers at once."""
    flags = ("--hosts", "4", "--host-cpus", "16", "--boot-seconds", "1", "--ip-seconds", "0.5")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lab.ini"
        with (
            sim_process(config, *flags),
            serve_process(config, Path(tmp) / "d.db") as url,
            httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=200)) as client,
        ):
            _wait_all_up(client, 4)
            capacity = int(client.get("/getavailablecount").text)
            spawn = multiprocessing.get_context("spawn")
            stop, out = spawn.Event(), spawn.Queue()
            observer = spawn.Process(target=_observe, args=(url, stop, out))
            observer.start()
            time.sleep(1.0)  # the observer is up and counting before the storm starts
            with ThreadPoolExecutor(3 * capacity) as pool:
                answers = list(pool.map(lambda n: client.get(f"/getservers/storm{n}"), range(3 * capacity)))
            stop.set()
            samples = out.get(timeout=60)
            observer.join()
    return {"capacity": capacity, "answers": [a.status_code for a in answers], "samples": samples}


def storm(rounds: int = STORM_ROUNDS) -> dict[str, float]:
    """Several storms, each on a fresh simulator and service; the counts are pooled, so that
    the p99 rests on a few hundred samples rather than on the slowest two of one storm."""
    results = [storm_round() for _ in range(rounds)]
    counting = [sample for result in results for sample in result["samples"]]  # type: ignore[attr-defined]
    statuses = [status for result in results for status in result["answers"]]  # type: ignore[attr-defined]
    capacities = {result["capacity"] for result in results}
    granted = [sum(1 for status in result["answers"] if status == 200) for result in results]  # type: ignore[attr-defined]
    return {
        "rounds": rounds,
        "capacity": capacities.pop() if len(capacities) == 1 else -1,
        "asked": len(statuses) // rounds,
        "granted_min": min(granted),
        "granted_max": max(granted),
        "server_errors": sum(1 for status in statuses if status >= 500),
        "refused": sum(1 for status in statuses if status == 429),
        "count_p99": percentile(counting, 0.99),
        "count_p50": statistics.median(counting),
        "samples": len(counting),
    }


def run() -> Table:
    small, big, gale = scale(20, 50), scale(100, 100), storm()
    table = Table(title=f"dynvm serve at scale (sim --latency-ms 2; {os.cpu_count()} CPUs, {SAMPLES} samples)")
    for column, justify in (("figure", "left"), ("measured", "right"), ("goal", "right"), ("met", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ms"

    for label, figures in (("20 hosts × 50 VMs", small), ("100 hosts × 100 VMs", big)):
        ratio = figures["seed"] / figures["showall_p50"]
        table.add_row(
            f"{label}: /showall p50 / p99", f"{ms(figures['showall_p50'])} / {ms(figures['showall_p99'])}", "-", "-"
        )
        table.add_row(f"{label}: the seed's per-VM listing", f"{figures['seed']:.1f} s", "-", "-")
        table.add_row(
            f"{label}: ratio seed / /showall p50", f"{ratio:,.0f}×", "≥ 100×", "yes" if ratio >= 100 else "NO"
        )
        table.add_row(
            f"{label}: /getavailablecount p50 / p99",
            f"{ms(figures['count_p50'])} / {ms(figures['count_p99'])}",
            "p50 ≤ 50 ms",
            "yes" if figures["count_p50"] <= 0.05 else "NO",
        )
    table.add_row(
        "service RSS with 10,000 VMs in the inventory",
        f"{big['rss_mb']:.0f} MB",
        "≤ 300 MB",
        "yes" if big["rss_mb"] <= 300 else "NO",
    )
    exact = gale["granted_min"] == gale["granted_max"] == gale["capacity"]
    table.add_row(
        f"storm ×{gale['rounds']}: {gale['asked']} getservers at once for {gale['capacity']} slots: granted",
        f"{gale['granted_min']}" if exact else f"{gale['granted_min']}–{gale['granted_max']}",
        f"= {gale['capacity']}",
        "yes" if exact else "NO",
    )
    table.add_row(
        f"storm ×{gale['rounds']}: refused (429, not enough capacity) / 5xx, in all",
        f"{gale['refused']} / {gale['server_errors']}",
        "… / 0",
        "yes" if gale["server_errors"] == 0 else "NO",
    )
    table.add_row(
        f"storm: /getavailablecount p50 / p99 meanwhile ({gale['samples']} samples, another process)",
        f"{ms(gale['count_p50'])} / {ms(gale['count_p99'])}",
        "p99 ≤ 100 ms",
        "yes" if gale["count_p99"] <= 0.1 else "NO",
    )
    return table
