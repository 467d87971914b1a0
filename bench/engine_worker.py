"""One run of the engine bench (``engine_bench.py``), in its own process, on whichever dynvm
is first on ``PYTHONPATH`` (this tree's, or the tree before the change): leases reserved
and released per second by ``--replicas`` engines sharing one database and one set of
model hosts, ``--threads`` callers each, for ``--seconds``. Prints one JSON line. The
bench runs one such process per replica (``--replicas 1``, all but the first with
``--no-migrate``, all beginning at ``--start-at``), as replicas are deployed.

Uses only what both trees have: ``LeaseService``, the replay's ``ModelHosts`` and its
``_config``; statements are counted with SQLAlchemy's own events.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import event

from dynvm.config import load_settings
from dynvm.engine.service import LeaseService
from dynvm.model import LeaseRequest
from dynvm.replay.model import ModelHosts, VirtualClock
from dynvm.replay.runner import ReplayOptions, _config
from dynvm.store.db import Database
from dynvm.store.history import HistoryStore
from dynvm.store.leases import LeaseStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-migrate", action="store_true", help="the schema is there already (another replica)")
    parser.add_argument("--tag", default="", help="begins this process's VM names (replicas never share one)")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() at which to begin (replicas together)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dynvm-engine-bench-"))
    settings = load_settings(_config(work / "bench.ini", {"centos"}, ReplayOptions(hosts=4, policy="none")))
    clock = VirtualClock(1_000_000.0)
    hosts = ModelHosts(clock, 65.0)
    hosts.apply(settings)
    databases, services = [], []
    for n in range(args.replicas):
        db = Database(args.db)
        if n == 0 and not args.no_migrate:
            db.migrate()
        databases.append(db)
        service = LeaseService(lambda: settings, hosts, LeaseStore(db), HistoryStore(db, None, clock), clock=clock)
        services.append(service)
    statements = [0]

    def seen(conn: object, cursor: object, statement: str, *_: object) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE is a statement of its own
            statements[0] += 1

    for db in databases:
        event.listen(db.engine, "before_cursor_execute", seen)
    done = [0]
    lock = threading.Lock()
    time.sleep(max(0.0, args.start_at - time.time()))
    stop = time.monotonic() + args.seconds

    def caller(service: LeaseService, name: str) -> None:
        n = 0
        while time.monotonic() < stop:
            user = f"{name}n{n}x"  # a name no other caller makes
            service.acquire(LeaseRequest(user, "centos"))
            service.release_names([user])
            n += 1
        with lock:
            done[0] += n

    threads = [
        threading.Thread(target=caller, args=(service, f"{args.tag}r{r}t{t}"))
        for r, service in enumerate(services)
        for t in range(args.threads)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for service in services:
        service.shutdown(grace=5)
    for db in databases:
        db.close()
    leases = done[0]
    print(
        json.dumps(
            {
                "leases": leases,
                "seconds": round(elapsed, 2),
                "per_second": round(leases / elapsed, 1),
                "statements_per_lease": round(statements[0] / max(1, leases), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
