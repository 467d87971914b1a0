"""Ready pools, through real processes: ``dynvm sim`` (4 hosts; clone 0.5 s + boot 2 s +
IP 1 s, then sshd 0.3 s) and ``dynvm serve``, over HTTP as a Jenkins job calls it.

- getservers count=1 from a warm pool: p50 and p99 of 50 requests (each asked once a VM is
  ready, then released), goal p50 <= 50 ms and p99 <= 200 ms (vmpooler answers in ~250 ms);
- count=8 from a pool of 8, and the same two cold (no [pools]), for the ratio;
- refill: from an empty pool to its target, VMs per second per host;
- the readiness probe's added time: a cold count=1 with the probe, less one without.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from rich.table import Table

from bench.processes import percentile, serve_process, sim_process

HOSTS = 4
SIM_FLAGS = (
    *("--hosts", str(HOSTS), "--clone-seconds", "0.5", "--boot-seconds", "2", "--ip-seconds", "1"),
    *("--service-seconds", "0.3"),
)
WARM_SAMPLES = 50
EIGHT_SAMPLES = 5
COLD_SAMPLES = 8


def _config_with(base: Path, path: Path, extra: str) -> Path:
    path.write_text(base.read_text() + "\n" + extra + "\n")
    path.chmod(0o600)
    return path


def _pool(client: httpx.Client) -> dict[str, int]:
    found = [p for p in client.get("/api/v1/pools").json() if p["os"] == "centos"]
    return found[0] if found else {"ready": 0, "refilling": 0, "target": 0}


def _wait_ready(client: httpx.Client, ready: int, timeout: float = 300) -> float:
    started = time.perf_counter()
    while _pool(client)["ready"] < ready:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the pool did not reach {ready} ready VMs")
        time.sleep(0.02)
    return time.perf_counter() - started


def _get(client: httpx.Client, user: str, count: int) -> float:
    started = time.perf_counter()
    answer = client.get(f"/getservers/{user}", params={"os": "centos", "count": count})
    took = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == count
    assert client.get(f"/releaseservers/{user}", params={"count": count}).status_code in (200, 202)
    return took


def _warm(base: Path, tmp: Path) -> dict[str, float]:
    config = _config_with(base, tmp / "warm.ini", "[pools]\ncentos.ready=8\nrefill.per.host=2")
    with serve_process(config, tmp / "warm.db", timeout=120) as url, httpx.Client(base_url=url, timeout=300) as client:
        fill = _wait_ready(client, 8)
        one = []
        for n in range(WARM_SAMPLES):
            _wait_ready(client, 1)
            one.append(_get(client, f"warm{n}", 1))
        eight = []
        for n in range(EIGHT_SAMPLES):
            _wait_ready(client, 8)
            eight.append(_get(client, f"eight{n}", 8))
    return {
        "one_p50": statistics.median(one),
        "one_p99": percentile(one, 0.99),
        "eight_p50": statistics.median(eight),
        "refill_rate": 8 / fill / HOSTS,
        "fill_seconds": fill,
    }


def _cold(base: Path, tmp: Path, probe: bool) -> dict[str, float]:
    text = base.read_text()
    if not probe:  # the lab's [probe] section names the guests' ports: turn the probe off there
        text = text.replace("[probe]\n", "[probe]\nenabled=false\n", 1)
    config = tmp / f"cold-{probe}.ini"
    config.write_text(text)
    config.chmod(0o600)
    with (
        serve_process(config, tmp / f"cold-{probe}.db", timeout=120) as url,
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        one = [_get(client, f"cold{n}", 1) for n in range(COLD_SAMPLES)]
        eight = [_get(client, f"coldeight{n}", 8) for n in range(EIGHT_SAMPLES if probe else 0)]
    return {"one_p50": statistics.median(one), "eight_p50": statistics.median(eight) if eight else 0.0}


def run() -> Table:
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        base = tmp / "lab.ini"
        stack.enter_context(sim_process(base, *SIM_FLAGS, timeout=120))
        warm = _warm(base, tmp)
        cold = _cold(base, tmp, probe=True)
        unprobed = _cold(base, tmp, probe=False)
    table = Table(title=f"ready pools: dynvm sim ({HOSTS} hosts, clone+boot+IP 3.5 s, sshd 0.3 s later) + dynvm serve")
    for column in ("figure", "measured", "goal", "met"):
        table.add_column(column, justify="left" if column == "figure" else "right")

    def row(name: str, value: str, goal: str = "-", met: bool | None = None) -> None:
        table.add_row(name, value, goal, "-" if met is None else ("yes" if met else "NO"))

    ms = 1000
    row(
        f"getservers count=1, warm: p50 of {WARM_SAMPLES}",
        f"{warm['one_p50'] * ms:.1f} ms",
        "<= 50 ms",
        warm["one_p50"] <= 0.050,
    )
    row(
        f"getservers count=1, warm: p99 of {WARM_SAMPLES}",
        f"{warm['one_p99'] * ms:.1f} ms",
        "<= 200 ms",
        warm["one_p99"] <= 0.200,
    )
    row(f"getservers count=1, cold: p50 of {COLD_SAMPLES}", f"{cold['one_p50']:.2f} s")
    row("  cold / warm", f"{cold['one_p50'] / warm['one_p50']:.0f}x")
    row(f"getservers count=8 from a pool of 8: p50 of {EIGHT_SAMPLES}", f"{warm['eight_p50'] * ms:.1f} ms")
    row(f"getservers count=8, cold: p50 of {EIGHT_SAMPLES}", f"{cold['eight_p50']:.2f} s")
    row("  cold / warm", f"{cold['eight_p50'] / warm['eight_p50']:.0f}x")
    row("refill, empty to 8 ready (refill.per.host=2)", f"{warm['fill_seconds']:.1f} s")
    row("  refill rate", f"{warm['refill_rate']:.2f} VMs/s per host")
    row(
        "readiness probe's added time (cold count=1)",
        f"{(cold['one_p50'] - unprobed['one_p50']) * ms:.0f} ms",
        "~ sshd's 300 ms",
    )
    return table
