"""The queue under a wave of demand, through real ``dynvm serve`` and ``dynvm sim`` processes.

4 hosts of 16 CPUs (capacity 16 CentOS VMs of 4 vCPUs), clone 0.5 s + boot 2 s + IP 1 s.
Clients ask for 1-2 VMs with ``wait_minutes``, faster than the VMs are given back, hold
them 20-60 s and release them. For each request that had to wait, its ETA is read the
moment it is queued (once the scheduler has placed it) and compared with when it was
ready; the naive estimate it is compared with is ``position x mean create time``. Then a
fairness wave: one user queues 40 requests at once, another user one, and the figure is
how many of the flood's requests were served before the single one.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.table import Table

from bench.processes import percentile, serve_process, sim_process

CLONE, BOOT, IP = 0.5, 2.0, 1.0
CREATE = CLONE + BOOT + IP
FLAGS = ("--hosts", "4", "--host-cpus", "16", "--clone-seconds", str(CLONE), "--boot-seconds", str(BOOT))
FLAGS += ("--ip-seconds", str(IP))


@dataclass
class Outcome:
    state: str = ""
    submitted: float = 0.0
    ready: float | None = None
    position: int | None = None
    predicted: float | None = None  # the ETA at queueing, monotonic clock
    queued: bool = False


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _ask(client: httpx.Client, name: str, count: int, hold: float, run: Run) -> None:
    outcome = Outcome(submitted=time.monotonic())
    body = {"os": "centos", "name": name, "count": count, "wait_minutes": 10}
    answer = client.post("/api/v1/leases", json=body)
    if answer.status_code != 202:
        outcome.state = f"refused {answer.status_code}"
        with run.lock:
            run.outcomes.append(outcome)
        return
    location = answer.headers["location"]
    while True:
        status = client.get(location).json()
        if status["state"] == "queued" and status["position"] is not None and not outcome.queued:
            outcome.queued = True
            outcome.position = status["position"]
            if status["eta_seconds"] is not None:
                outcome.predicted = time.monotonic() + status["eta_seconds"]
        if status["state"] not in ("queued", "creating"):
            break
        time.sleep(0.1)
    outcome.state = status["state"]
    if outcome.state == "ready":
        outcome.ready = time.monotonic()
        time.sleep(hold)
        for vm in status["vms"]:
            client.delete(f"/api/v1/leases/{vm['name']}")
    with run.lock:
        run.outcomes.append(outcome)


def _wave(url: str, requests: int, seconds: float, seed: int) -> Run:
    rng = random.Random(seed)
    run = Run()
    threads = []
    # idle connections are dropped before the server does (uvicorn: 5 s), or a reuse can race its close
    limits = httpx.Limits(max_connections=400, keepalive_expiry=2.0)
    with httpx.Client(base_url=url, timeout=900, limits=limits) as client:
        for n in range(requests):
            count = rng.choice((1, 1, 1, 2))
            hold = rng.uniform(20, 60)
            thread = threading.Thread(target=_ask, args=(client, f"wave{n}x", count, hold, run))
            thread.start()
            threads.append(thread)
            time.sleep(seconds / requests)
        for thread in threads:
            thread.join()
    return run


def _token(db: Path, user: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dynvm", "token", "create", user, "--db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line.strip() for line in out.splitlines() if line.strip().startswith("dvm_"))


def _fairness(url: str, db: Path, flood_size: int = 40) -> tuple[int, float]:
    """One user queues ``flood_size`` requests, then another user one: how many of the
    flood are ahead of it in the queue, and how long it waited once room came back."""
    alice = {"Authorization": f"Bearer {_token(db, 'alice')}"}
    bob = {"Authorization": f"Bearer {_token(db, 'bob')}"}
    with httpx.Client(base_url=url, timeout=900, limits=httpx.Limits(keepalive_expiry=2.0)) as client:
        fill = client.post(
            "/api/v1/leases", params={"wait": "true"}, json={"os": "centos", "name": "fill", "count": 16}, headers=alice
        )
        assert fill.status_code == 200, fill.text
        flood = [
            client.post(
                "/api/v1/leases", json={"os": "centos", "name": f"flood{n}x", "wait_minutes": 10}, headers=alice
            ).headers["location"]
            for n in range(flood_size)
        ]
        single = client.post(
            "/api/v1/leases", json={"os": "centos", "name": "single", "wait_minutes": 10}, headers=bob
        ).headers["location"]
        time.sleep(1.0)  # a scheduler pass
        order = [q["user"] for q in client.get("/api/v1/queue", headers=alice).json()]
        freed = time.monotonic()
        for n in range(1, 17):
            client.delete(f"/api/v1/leases/fill{n}", headers=alice)
        deadline = freed + 120
        while client.get(single, headers=bob).json()["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        waited = time.monotonic() - freed  # 120 s: it was never served
        for location in flood:
            client.delete(location, headers=alice)
        for lease in client.get("/api/v1/leases", headers=alice).json():
            client.delete(f"/api/v1/leases/{lease['name']}", headers=alice)
    return (order.index("bob") if "bob" in order else -1), waited


def run(requests: int = 50, seconds: float = 30.0, seed: int = 1) -> Table:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lab.ini"
        db = Path(tmp) / "d.db"
        with sim_process(config, *FLAGS), serve_process(config, db) as url:
            warm = _wave(url, 16, 2.0, seed)  # the history the forecast learns from
            wave = _wave(url, requests, seconds, seed + 1)
            ahead, single_wait = _fairness(url, db)
            scrape = httpx.get(f"{url}/metrics").text
    passes = _metric(scrape, "dynvm_scheduler_pass_seconds_sum"), _metric(scrape, "dynvm_scheduler_pass_seconds_count")
    ready = [o for o in wave.outcomes if o.state == "ready"]
    waited = [o for o in ready if o.queued]
    waits = [o.ready - o.submitted for o in ready if o.ready is not None]
    errors = [abs(o.ready - o.predicted) for o in waited if o.predicted is not None and o.ready is not None]
    mean_create = statistics.mean(o.ready - o.submitted for o in warm.outcomes if o.ready) if warm.outcomes else CREATE
    naive = [abs(o.ready - (o.submitted + o.position * mean_create)) for o in waited if o.ready and o.position]
    table = Table(
        title=f"queue: {requests} requests in {seconds:.0f} s on 16 VMs of room, leases 20-60 s, "
        f"create {CREATE} s ({os.cpu_count()} CPUs)"
    )
    for column, justify in (("figure", "left"), ("measured", "right"), ("goal", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    count = {s: sum(1 for o in wave.outcomes if o.state == s) for s in sorted({o.state for o in wave.outcomes})}
    table.add_row("requests served / refused / timed out", _counts(count), "-")
    table.add_row("  of them queued first", str(len(waited)), "-")
    table.add_row("time to VMs p50 / p95 (s)", f"{percentile(waits, 0.5):.1f} / {percentile(waits, 0.95):.1f}", "-")
    if errors:
        table.add_row(
            "ETA error p50 / p90 (s)", f"{percentile(errors, 0.5):.1f} / {percentile(errors, 0.9):.1f}", "< naive"
        )
    if naive:
        table.add_row(
            "naive (position x mean create) error p50 / p90 (s)",
            f"{percentile(naive, 0.5):.1f} / {percentile(naive, 0.9):.1f}",
            "-",
        )
    if passes[1]:
        table.add_row("scheduler pass, mean (ms)", f"{1e3 * passes[0] / passes[1]:.1f}", "-")
    table.add_row("fairness: of one user's 40 queued requests, ahead of another user's one", str(ahead), "≤ 1")
    table.add_row(
        "fairness: that request's wait once room is back (s)", f"{single_wait:.1f}", f"≤ {2 * CREATE:.1f} (2 creates)"
    )
    return table


def _counts(count: dict[str, int]) -> str:
    served = count.get("ready", 0)
    refused = sum(n for s, n in count.items() if s.startswith("refused") or s == "failed")
    return f"{served} / {refused} / {count.get('timed out', 0)}"


def _metric(scrape: str, name: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
