"""``dynvm replay TRACE --live --speed N``: the same replay as ``runner.py``, but against real
``dynvm serve`` and ``dynvm sim`` processes on 127.0.0.1, with time compressed ``N`` times.

The simulator makes a VM in ``create_seconds / N`` wall seconds; the service runs on a
compressed clock (``clock.py``), so what it times — leases, the queue, history, learned
sizing, the create times it measures — is in trace seconds, as in a virtual replay. Each
request is a real ``POST /api/v1/leases?wait=true`` at its arrival, and its VMs are
released through the legacy ``/releaseservers`` after their hold. A request served whole
from the ready pools counts the handout as measured (wall seconds, not compressed); any
other counts its measured time in trace seconds. Idle VM-hours are read from the service's
own database afterwards, as a virtual replay reads them.

Meant for a few hours of trace: its figures say how far the virtual clock's are from what a
real service does (``python -m bench live``), not a week's.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import heapq
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ..api.server import serves_database
from ..store.db import Database
from ..store.history import HistoryStore
from ..store.leases import LeaseStore
from ..store.requests import RequestStore
from ..trace import Demand
from .runner import ReplayOptions, ReplayResult, idle_seconds, known_before, replay_sections, slice_of

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # wall seconds for the simulator and the service to come up
# A v1 request that may wait is always queued and granted by the scheduler's next pass; it
# counts as queued (it waited for room) when that took longer than this many wall seconds.
QUEUED_WALL_SECONDS = 0.25


class LiveReplayError(RuntimeError):
    """The simulator or the service did not start (or stopped)."""


@dataclasses.dataclass
class _Served:
    request_id: str
    demand: Demand
    wall_seconds: float  # POST sent to its answer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LiveReplay:
    """One live replay. ``speed``: trace seconds per wall second. ``progress(done, total)``
    is called as requests are answered."""

    def __init__(
        self,
        trace: list[Demand],
        options: ReplayOptions,
        speed: float,
        history: list[Demand] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("the speed is positive")
        self.trace = slice_of(trace, options.start / 3600, options.hours)
        self.options = options
        self.speed = speed
        self.history = known_before(trace, options.start, history or [])
        self.progress = progress or (lambda done, total: None)
        self.result = ReplayResult()
        self._served: list[_Served] = []
        self._lock = threading.Lock()
        self._releases: list[tuple[float, int, str, int]] = []  # wall time, seq, user, count
        self._released = threading.Condition()
        self._answered = 0
        self.release_failures = 0
        self._driving_since = 0.0

    def run(self) -> ReplayResult:
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="dynvm-live-"))
        try:
            with self._sim(work / "lab.ini") as config:
                db_path = work / "dynvm.db"
                self._prepare(config, db_path)
                with self._serve(config, db_path) as (url, offset):
                    self._drive(url, offset)
                self._account(db_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.result.wall_seconds = time.perf_counter() - started
        return self.result

    # -- the processes -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _sim(self, config: Path) -> Iterator[Path]:
        create = self.options.create_seconds / self.speed  # clone, boot and address as the defaults share them
        argv = [sys.executable, "-m", "dynvm", "sim", "--hosts", str(self.options.hosts), "--write-config", str(config)]
        argv += ["--clone-seconds", f"{create / 7:.4f}", "--boot-seconds", f"{create * 4 / 7:.4f}"]
        argv += ["--ip-seconds", f"{create * 2 / 7:.4f}", "--service-seconds", "0"]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not config.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise LiveReplayError("dynvm sim did not start")
                time.sleep(0.05)
            time.sleep(0.2)  # the file is written in one go, but let it be closed
            yield config
        finally:
            _stop(process)

    def _prepare(self, config: Path, db_path: Path) -> None:
        """The replay's settings over the simulator's config, and the past in the history."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the case of ini keys, as configparser documents
        parser.read(config)
        oses = {d.os for d in [*self.trace, *self.history]} or {"centos"}
        for section, values in replay_sections(oses, self.options).items():
            if not parser.has_section(section):
                parser.add_section(section)
            for key, value in values.items():
                parser.set(section, key, value)
        with config.open("w") as out:
            parser.write(out)
        db = Database(f"sqlite:///{db_path}")
        try:
            db.migrate()
            if self.history:  # what a running lab would know at the slice's start (runner.known_before)
                HistoryStore(db).import_demands(self.history, self.options.create_seconds)
        finally:
            db.close()

    @contextlib.contextmanager
    def _serve(self, config: Path, db_path: Path) -> Iterator[tuple[str, float]]:
        """The service, its clock reading the slice's start when it starts; yields its URL
        and the offset from wall time to its clock's reading at wall time 0 (so that its
        clock reads ``offset + speed * wall``)."""
        db_url = f"sqlite:///{db_path}"
        for _ in range(3):  # a port picked free may be taken before dynvm binds it: pick another
            port = _free_port()
            argv = [sys.executable, "-m", "dynvm", "serve", "--config", str(config), "--db", db_url]
            argv += ["--port", str(port), "--log-level", "warning", "--clock-speed", f"{self.speed:g}"]
            argv += ["--clock-start", f"{self.options.start:.3f}"]
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while not serves_database(url, db_url):
                    if process.poll() is not None:
                        break
                    if time.monotonic() > deadline:
                        raise LiveReplayError(f"dynvm serve did not answer within {START_TIMEOUT:.0f} s")
                    time.sleep(0.1)
                else:
                    yield url, self._offset(url)
                    return
            finally:
                _stop(process)
        raise LiveReplayError("dynvm serve exited at start")

    def _offset(self, url: str, samples: int = 7) -> float:
        """The service's clock against ours, from the quickest of a few readings (its time
        is read half a round trip after we ask, give or take the round trip)."""
        best: tuple[float, float] | None = None  # round trip, offset
        for _ in range(samples):
            before = time.monotonic()
            reading = float(httpx.get(f"{url}/healthz", params={"detail": "true"}, timeout=10).json()["time"])
            after = time.monotonic()
            offset = reading - self.speed * (before + after) / 2
            if best is None or after - before < best[0]:
                best = (after - before, offset)
        assert best is not None
        return best[1]

    # -- the demand ---------------------------------------------------------------------------

    def _drive(self, url: str, offset: float) -> None:
        """Each request at its arrival on the service's clock; releases after their hold."""
        total = len(self.trace)
        releaser = threading.Thread(target=self._release_loop, args=(url,), name="live-releases", daemon=True)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        with httpx.Client(base_url=url, timeout=None, limits=limits) as client, ThreadPoolExecutor(256) as pool:
            self._client = client
            self._driving_since = time.monotonic()
            releaser.start()
            try:
                futures = []
                for n, demand in enumerate(self.trace):
                    at = (demand.arrival_s - offset) / self.speed  # wall (monotonic) time it arrives
                    time.sleep(max(0.0, at - time.monotonic()))
                    futures.append(pool.submit(self._request, n, demand, total, at))
                for future in futures:
                    future.result()
            finally:  # the end, also on an error: what is still held is released now
                with self._released:
                    self._releases.append((float("-inf"), -1, "", 0))
                    heapq.heapify(self._releases)
                    self._released.notify_all()
                releaser.join()

    def _request(self, n: int, demand: Demand, total: int, arrived: float) -> None:
        """One request, timed from its arrival (``arrived``, wall): a request that had to
        wait for a free worker counts that wait too, as a user would have."""
        user = f"r{n}-{demand.user}"[:63]
        body = {"os": demand.os, "name": user, "count": demand.count, "wait_minutes": self.options.wait_minutes}
        answer = self._client.post("/api/v1/leases", params={"wait": "true"}, json=body)
        took = time.monotonic() - max(arrived, self._driving_since)  # one due before the start: from the start
        with self._lock:
            self.result.requests += 1
            self._answered += 1
            if answer.status_code == 200:
                self._served.append(_Served(answer.json()["id"], demand, took))
            else:
                self.result.refused += 1
            self.progress(self._answered, total)
        if answer.status_code == 200:
            with self._released:
                heapq.heappush(self._releases, (time.monotonic() + demand.hold_s / self.speed, n, user, demand.count))
                self._released.notify_all()

    def _release_loop(self, url: str) -> None:
        while True:
            with self._released:
                while not self._releases or self._releases[0][0] > time.monotonic():
                    wait = self._releases[0][0] - time.monotonic() if self._releases else None
                    self._released.wait(wait)
                when, _, user, count = heapq.heappop(self._releases)
            if when == float("-inf"):  # the end: what is still held goes now
                for _, _, rest, n in sorted(self._releases):
                    self._release(rest, n)
                return
            self._release(user, count)

    def _release(self, user: str, count: int) -> None:
        """Release one request's VMs; a failure is counted (``release_failures``), never
        the end of the releases that follow."""
        try:
            answer = self._client.get(f"/releaseservers/{user}", params={"count": count})
            if answer.status_code not in (200, 202):
                raise httpx.HTTPStatusError(answer.text, request=answer.request, response=answer)
        except httpx.HTTPError as e:
            log.warning("live replay: releasing %s failed: %s", user, e)
            self.release_failures += 1

    # -- the figures ---------------------------------------------------------------------------

    def _account(self, db_path: Path) -> None:
        """What each request got, from the service's own records."""
        db = Database(f"sqlite:///{db_path}")
        try:
            store, requests = LeaseStore(db), RequestStore(db)
            for served in self._served:
                leases = store.by_request(served.request_id)
                record = requests.get(served.request_id)
                warm = bool(leases) and all(lease.pooled_at for lease in leases)
                waited = 0.0
                if record is not None and record.wait_until is not None and record.started_at is not None:
                    waited = record.started_at - record.created_at
                if waited > QUEUED_WALL_SECONDS * self.speed:
                    self.result.queued += 1
                    self.result.queue_waits.append(waited)
                self.result.ttv.append(served.wall_seconds if warm else served.wall_seconds * self.speed)
                self.result.warm += 1 if warm else 0
                self.result.vms += served.demand.count
                self.result.vm_seconds_used += served.demand.hold_s * served.demand.count
            end = self.trace[-1].arrival_s if self.trace else 0.0
            self.result.vm_seconds_idle = idle_seconds(store.ever_pooled(), end)
        finally:
            db.close()
