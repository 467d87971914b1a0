"""A lab of 10 pools of 4 members named twice: by a ``[xenhostN]`` section per member (40
sections, the layout issue 23 found over-committing), and by their masters only (10
sections). Through real ``dynvm sim`` and ``dynvm serve`` processes: the room
``getavailablecount`` answers, its time, a fill to that room (every request at once, ten
VMs each), and what the pools hold afterwards (vCPUs per member against its CPUs).

Goal: equal rooms, equal times within noise, no member over-committed in either layout.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import XenAPI
from rich.table import Table

from bench.processes import percentile, serve_process, sim_process
from dynvm.config import load_settings

POOLS, MEMBERS, CPUS = 10, 4, 8
FLAGS = (
    "--hosts",
    str(POOLS),
    "--pool-size",
    str(MEMBERS),
    "--host-cpus",
    str(CPUS),
    "--host-memory-gib",
    "24",
    "--clone-seconds",
    "0.05",
    "--boot-seconds",
    "0.2",
    "--ip-seconds",
    "0.1",
    "--service-seconds",
    "0",
)
BATCH = 10


def _held(config: Path) -> tuple[int, int]:
    """(most vCPUs running on one member, members over their CPUs), read from each pool."""
    most, over = 0, 0
    seen: set[str] = set()
    for host in load_settings(config).hosts:
        session = XenAPI.Session(host.url)
        try:
            session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "bench")
        except XenAPI.Failure:
            continue  # a member: its pool is read through its master's section
        xapi = session.xenapi
        pool = xapi.pool.get_all_records()
        uuid = next(iter(pool.values()))["uuid"]
        if uuid in seen:
            continue
        seen.add(uuid)
        used: Counter[str] = Counter()
        for record in xapi.VM.get_all_records().values():
            if record["power_state"] == "Running" and not record["is_control_domain"]:
                used[record["resident_on"]] += int(record["VCPUs_at_startup"])
        most = max([most, *used.values()])
        over += sum(1 for n in used.values() if n > CPUS)
        session.xenapi.session.logout()
    return most, over


def _measure(layout: str, extra: tuple[str, ...]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lab.ini"
        with sim_process(config, *FLAGS, *extra), serve_process(config, Path(tmp) / "dynvm.db") as base:
            sections = len(load_settings(config).hosts)
            with httpx.Client(base_url=base, timeout=300) as client:
                room = int(client.get("/getavailablecount/centos").text)
                samples = []
                for _ in range(50):
                    started = time.perf_counter()
                    client.get("/getavailablecount/centos").raise_for_status()
                    samples.append(time.perf_counter() - started)

                def get(n: int) -> int:
                    answer = client.get(f"/getservers/fill{n}-", params={"os": "centos", "count": BATCH})
                    return BATCH if answer.status_code == 200 else 0

                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=room // BATCH or 1) as pool:
                    made = sum(pool.map(get, range(room // BATCH)))
                fill = time.perf_counter() - started
                refused = client.get("/getservers/onemore", params={"os": "centos"}).status_code
            most, over = _held(config)
    return {
        "layout": layout,
        "sections": sections,
        "room": room,
        "p50": statistics.median(samples) * 1000,
        "p95": percentile(samples, 0.95) * 1000,
        "made": made,
        "fill": fill,
        "refused": refused,
        "most": most,
        "over": over,
    }


def run() -> Table:
    rows = [_measure("masters only", ()), _measure("every member", ("--members-in-config",))]
    table = Table(
        title=f"{POOLS} pools of {MEMBERS} members ({CPUS} CPUs, 24 GiB each): a pool counts once, whatever names it"
    )
    for column in (
        "config names",
        "sections",
        "centos room",
        "getavailablecount p50 ms",
        "p95 ms",
        "fill: VMs made",
        "fill s",
        "one more",
        "most vCPUs on a member",
        "members over their CPUs",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["layout"]),
            str(r["sections"]),
            str(r["room"]),
            f"{r['p50']:.1f}",
            f"{r['p95']:.1f}",
            str(r["made"]),
            f"{r['fill']:.1f}",
            str(r["refused"]),
            f"{r['most']} / {CPUS}",
            str(r["over"]),
        )
    return table
