"""The engine's cost per request, before and after issue 27, side by side in one run:

- **statements per hot path** (``dynvm.replay.hot_paths``: a reservation, a warm and a
  cold getservers, a release, a scheduler pass, a pools pass), on this tree;
- **leases reserved and released per second**: callers that getservers one VM and release
  it, again and again, on model hosts (no xapi: the engine and its database alone), on
  SQLite with one replica and on PostgreSQL with two, for this tree and for the tree
  before the change (``BEFORE``, taken with ``git archive``), each in its own process
  (``engine_worker.py``), in ``ROUNDS`` rounds with the trees in turn: the median and the
  range of the rounds are printed (this machine's speed drifts by a fifth from minute to
  minute; one run each would compare the drift as much as the trees), and the ratio of
  each round's two runs, which met the same minute (a ratio of the medians can pair a
  fast minute of one tree with a slow one of the other);
- **a week at ten times the synthetic week's demand** (29,310 requests, 140 model hosts,
  learned pools) replayed in virtual time: the goal is <= 90 s. It is the longest part of
  this bench (minutes, until the goal is met).

PostgreSQL: ``DYNVM_BENCH_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``);
each run gets a database of its own, dropped after.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

from rich.table import Table
from sqlalchemy import create_engine, text

from bench.demand import WeekShape, generate
from dynvm.replay.hot_paths import hot_paths
from dynvm.replay.runner import Replay, ReplayOptions

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "7064336"  # main before issue 27
PG = os.environ.get("DYNVM_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
SQLITE, POSTGRES = "SQLite, 1 replica", "PostgreSQL, 2 replicas"
ROUNDS = 5  # each throughput measured this many times, the trees in turn (``_throughput``)
SECONDS = 8.0
THREADS = 4


def _tree_before(work: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    return work / "src"


def _worker(src: Path, db: str, replicas: int) -> dict[str, float]:
    """``replicas`` processes (one per replica, as they are deployed) on one database, begun
    together after the first has migrated it; their leases per second summed."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    base = [sys.executable, str(ROOT / "bench" / "engine_worker.py"), "--db", db, "--threads", str(THREADS)]
    subprocess.run([*base, "--seconds", "0"], check=True, capture_output=True, env=env, cwd=tempfile.gettempdir())
    start = time.time() + 3.0  # each process imports and starts its engine meanwhile
    command = [*base, "--seconds", str(SECONDS), "--no-migrate", "--start-at", str(start)]
    running = [
        subprocess.Popen(
            [*command, "--tag", f"p{n}"], stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir()
        )
        for n in range(replicas)
    ]
    results = []
    for process in running:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"an engine bench worker failed ({process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    leases = sum(r["leases"] for r in results)
    seconds = max(r["seconds"] for r in results)
    statements = sum(r["statements_per_lease"] * r["leases"] for r in results)
    return {
        "leases": leases,
        "per_second": round(sum(r["per_second"] for r in results), 1),
        "seconds": seconds,
        "statements_per_lease": round(statements / max(1, leases), 1),
    }


def _pg_database() -> tuple[str, str]:
    name = f"dynvm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{PG}/{name}", name


def _drop(name: str) -> None:
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _throughput(trees: dict[str, Path], work: Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Every tree on every backend, ``ROUNDS`` times, the trees in turn within each round:
    this machine's speed drifts by a fifth from one minute to the next, and runs of the
    two trees side by side in time see the same drift."""
    out: dict[tuple[str, str], list[dict[str, float]]] = {}
    for n in range(ROUNDS):
        for label, src in trees.items():
            db = work / f"{label}-{n}.db"
            out.setdefault((label, SQLITE), []).append(_worker(src, f"sqlite:///{db}", 1))
            url, name = _pg_database()
            try:
                out.setdefault((label, POSTGRES), []).append(_worker(src, url, 2))
            finally:
                _drop(name)
    return out


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _paired(before: list[dict[str, float]], after: list[dict[str, float]]) -> str:
    """The after / before ratio of each round (its two runs ran one after the other, so they
    met the same minute of this machine), as the median and the range of the rounds."""
    ratios = [a["per_second"] / b["per_second"] for b, a in zip(before, after, strict=True)]
    return f"{statistics.median(ratios):.2f} x ({min(ratios):.2f}-{max(ratios):.2f})"


def _spread(runs: list[dict[str, float]]) -> str:
    """The median rate and the range of the rounds."""
    rates = [r["per_second"] for r in runs]
    return f"{_median(runs, 'per_second'):g} ({min(rates):g}-{max(rates):g})"


def _week_at_scale_10() -> dict[str, float | int]:
    trace, past = generate(WeekShape(scale=10), seed=1), generate(WeekShape(days=14, scale=10), seed=2)
    return Replay(trace, ReplayOptions(hosts=140, policy="learned"), past).run().summary()


def run() -> Table:
    with tempfile.TemporaryDirectory(prefix="dynvm-engine-bench-") as tmp:
        work = Path(tmp)
        trees = {"before": _tree_before(work / "before"), "after": ROOT / "src"}
        rates = _throughput(trees, work)
    paths = hot_paths()
    started = time.perf_counter()
    week = _week_at_scale_10()
    week_wall = time.perf_counter() - started
    table = Table(title=f"the engine's cost per request: {BEFORE} (before) and this tree (after)")
    for column in ("measure", "before", "after", "after / before"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for backend in (SQLITE, POSTGRES):
        before, after = rates[("before", backend)], rates[("after", backend)]
        table.add_row(
            f"leases reserved + released / s, {backend}, {THREADS} callers each: median (range) of {ROUNDS}",
            _spread(before),
            _spread(after),
            f"{_median(after, 'per_second') / _median(before, 'per_second'):.2f} x",
        )
        table.add_row(f"  after / before, round by round: median (range) of {ROUNDS}", "", "", _paired(before, after))
        table.add_row(
            f"  statements per lease (getservers + release), {backend}",
            f"{_median(before, 'statements_per_lease'):g}",
            f"{_median(after, 'statements_per_lease'):g}",
            f"{_median(after, 'statements_per_lease') / _median(before, 'statements_per_lease'):.2f} x",
        )
    for cost in paths:
        table.add_row(
            f"statements / write transactions: {cost.path}", "", f"{cost.statements} / {cost.transactions}", ""
        )
    table.add_row(
        "a week at 10x demand, 140 hosts, learned pools: replay wall time",
        "",
        f"{week_wall:.0f} s ({week['requests']} requests)",
        "goal: <= 90 s",
    )
    return table
