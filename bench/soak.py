"""``make soak``: a bounded fault soak of real ``dynvm serve`` processes against ``dynvm sim``.

Clients get, hold and release VMs through the legacy and v1 APIs (some of them waiting in
the queue with ``wait=``, so queued and creating requests meet every fault) while a fault thread
injects, one at a time, every kind once in a shuffled order before any comes again (a
10-minute run meets each), the faults real labs have: kill -9 of a
``dynvm serve``, a host refusing or hanging, APIPA and DHCP exhaustion, failing clone,
start, destroy and disk destroy, sessions invalidated, a slow host, guests whose sshd never
answers, pool members down or in maintenance, a new master, an operator restoring the
oldest of the backups taken while the soak runs (one a minute in, then every 5 minutes),
a copy of the database started as a second dynvm (it must refuse to serve), and, on
PostgreSQL, the server cutting every connection of the replicas at once. A ready
pool of CentOS VMs (``[pools]``) is handed out and refilled throughout.
At the end every fault is lifted, everything held is released, the pool's target drops to
0, and the soak waits for reconcile. Then it prints what the users would have seen and
what was left on the hosts:

- VMs and disks left behind (goal 0): on the hosts, beyond what was there at the start;
- IPs handed out twice (0): an IP answered to a request while an earlier request still
  held it (released by it, its lifetime over, or forgotten by a restore, at the earliest);
- VMs handed to two users (0): one VM (by uuid, as the host says) answered to two users;
- copies of the database that served (0);
- dead VMs handed out (0): an answered IP whose VM was not running with that IP;
- VMs handed out before their sshd answered (0): the readiness probe's promise (a VM whose
  pool a fault that silences guests hit between the ask and the look is not judged: which
  came first is unknown; they are counted apart);
- over-commits (0): a host whose running VMs had more vCPUs or memory than it has;
- leases lost (0): a release answered 404 for a lease still within its lifetime (a lease
  answered after the restored backup was taken is the restore's to forget, counted apart);
- 5xx other than 502 (0), but for a 503 saying the database did not answer in the
  seconds after PostgreSQL cut its connections: a statement in flight then fails, and its
  request with it (counted apart).

Run on SQLite (one process) and on PostgreSQL (two replicas sharing a database), each for
``--minutes`` (default 10; ``SOAK_MINUTES`` for ``make soak``). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import XenAPI
from rich.console import Console
from rich.table import Table

from bench.processes import free_port, serve_argv, sim_process, wait_healthy
from dynvm import probe
from dynvm.api.errors import DATABASE_DOWN
from dynvm.config import load_settings
from dynvm.sim.control import SimControlClient
from dynvm.xen.marker import MARKER_KEY

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_SOAK_DB = "dynvm_soak"
HOSTS = 3  # pools
POOL_SIZE = 3  # members per pool, each named by a section of its own (--members-in-config)
CLIENTS = 6
POOLS = "\n[pools]\ncentos.ready=3\nrefill.per.host=1\n"  # a share of getservers comes warm


@dataclass
class Grant:
    name: str
    ip: str
    sent: float  # when its getservers was sent: its lifetime starts later, at the hand-over
    received: float
    lifetime: float
    ended: float | None = None  # when its release was sent (answered 200/202)
    uuid: str | None = None  # the VM's, as the host says when the client looked

    @property
    def valid_until(self) -> float:
        """The earliest its VM may go (and its IP be someone else's): its release, or its
        lifetime counted from when it was asked for (the hand-over is later still)."""
        own = self.sent + self.lifetime
        return min(own, self.ended) if self.ended is not None else own


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # the 429s, by why (``why_refused``)
    faults: Counter = field(default_factory=Counter)
    connection_errors: int = 0
    grants: list[Grant] = field(default_factory=list)
    doubles: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    deaf: list[str] = field(default_factory=list)  # handed out before its sshd answered
    warm: int = 0  # VMs handed out from the ready pool
    lost: list[str] = field(default_factory=list)
    overcommits: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    forgotten: set[str] = field(default_factory=set)  # users whose leases a restored backup never knew
    restored_ages: list[float] = field(default_factory=list)  # seconds: how old each restored backup was
    copies_started: list[str] = field(default_factory=list)  # a copy of the database that served
    handed_twice: list[str] = field(default_factory=list)  # one VM (by uuid) answered to two users
    # faults that silence a pool's running guests (their sshd stops answering): (pool, from, to)
    silences: list[tuple[int, float, float]] = field(default_factory=list)
    unjudged: int = 0  # handed-out VMs whose pool such a fault hit between the ask and the look
    database_cuts: list[float] = field(default_factory=list)  # when PostgreSQL cut every connection
    database_down: int = 0  # 503s saying the database did not answer, just after such a cut

    @contextlib.contextmanager
    def silencing(self, pool: int) -> Iterator[None]:
        """While a fault that can silence ``pool``'s guests lasts (and a moment after)."""
        began = time.time()
        with self.lock:
            self.silences.append((pool, began, math.inf))
            index = len(self.silences) - 1
        try:
            yield
        finally:
            with self.lock:
                self.silences[index] = (pool, began, time.time() + 1.0)

    def silenced(self, pool: int, start: float, end: float) -> bool:
        """Whether a silencing fault on ``pool`` overlapped ``[start, end]``: a guest dynvm
        saw answer may have stopped since, and the observer cannot tell which came first."""
        with self.lock:
            return any(p == pool and began <= end and start <= until for p, began, until in self.silences)

    def answered(self, response: httpx.Response) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[response.status_code] += 1
            if response.status_code == 429:
                self.refusals[why_refused(response.text)] += 1
            if response.status_code == 503 and DATABASE_DOWN in response.text and self._just_cut():
                self.database_down += 1  # a statement in flight when its connection was cut: try again
            elif response.status_code >= 500 and response.status_code != 502:
                self.server_errors.append(f"{response.status_code} {response.request.url.path}: {response.text[:200]}")

    def _just_cut(self) -> bool:
        """With the lock held: PostgreSQL cut its connections within ``CUT_ANSWERS`` seconds."""
        now = time.time()
        return any(at <= now <= at + CUT_ANSWERS for at in self.database_cuts)

    def granted(self, grants: list[Grant]) -> None:
        with self.lock:
            self.grants.extend(grants)

    def find_vms_handed_twice(self) -> None:
        """A VM (by uuid) answered to two users: never allowed, at any time (a released VM
        is destroyed, a ready-pool VM is handed out once)."""
        users: dict[str, set[str]] = {}
        for grant in self.grants:
            if grant.uuid is not None:
                users.setdefault(grant.uuid, set()).add(grant.name.rstrip("0123456789"))
        self.handed_twice = [f"{uuid}: {', '.join(sorted(u))}" for uuid, u in users.items() if len(u) > 1]

    def find_doubles(self) -> None:
        """Once every release is known (a release answered after another client's grant
        must count): an IP answered while an earlier holder could not yet have let it go."""
        by_ip: dict[str, list[Grant]] = {}
        for grant in sorted(self.grants, key=lambda g: g.received):
            by_ip.setdefault(grant.ip, []).append(grant)
        for ip, grants in by_ip.items():
            for i, new in enumerate(grants):
                for old in grants[:i]:
                    if old.received < new.received < old.valid_until:
                        early = old.valid_until - new.received
                        self.doubles.append(f"{ip}: {new.name} got it {early:.2f} s before {old.name} let it go")


REFUSALS = {  # what a 429 says -> why it was refused
    "after waiting": "waited its wait= and no room came",
    "wait in the queue for the room": "queued requests come first",
    "not enough capacity for": "the hosts were full",
}


def why_refused(answer: str) -> str:
    """Why a getservers was answered 429, by its message: the soak's clients fill the lab on
    purpose, so most should say it was full, or that the queue came first."""
    return next((why for words, why in REFUSALS.items() if words in answer), f"other: {answer[:80]}")


class Lab:
    """The simulator's pools, seen by the soak: observer sessions and sim.* control. The
    config may name a pool by several sections (``--members-in-config``); the soak reads
    each pool once, through whichever member is its master now."""

    def __init__(self, config: Path, control_url: str, pool_size: int) -> None:
        self.settings = load_settings(config)
        self.service_port = self.settings.probe.port_for("centos") or 22  # the guests' sshd (the lab's [probe])
        first: dict[str, object] = {}
        for host in self.settings.hosts:  # a pool's sections share its password
            first.setdefault(host.password.reveal(), host)
        self.pools = list(first.values())
        self.pool_size = pool_size
        self.control = [SimControlClient(control_url, h.password.reveal()) for h in self.pools]  # type: ignore[attr-defined]
        self._local = threading.local()

    def xapi(self, index: int):  # type: ignore[no-untyped-def]
        """A session per thread and pool (a XenAPI session is not thread-safe), logged in at
        whichever member answers as master: the soak moves the master around."""
        sessions = self._local.__dict__.setdefault("sessions", {})
        if index not in sessions:
            host = self.pools[index]
            port = host.url.rsplit(":", 1)[1]  # type: ignore[attr-defined]
            last: Exception | None = None
            for member in range(1, self.pool_size + 1):
                session = XenAPI.Session(f"http://127.0.0.{member}:{port}", transport=None)
                try:
                    session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "soak")  # type: ignore[attr-defined]
                except (XenAPI.Failure, OSError) as e:  # a member, or one that is down
                    last = e
                    continue
                sessions[index] = session
                break
            else:
                raise RuntimeError(f"no master answers in pool {index + 1}: {last}")
        return sessions[index].xenapi

    def forget_sessions(self) -> None:
        self._local.__dict__.pop("sessions", None)

    def objects(self) -> tuple[set[str], set[str]]:
        """Every VM and VDI of every pool. A session whose member stopped being master (the
        SDK logs in again where it logged in first, and meets HOST_IS_SLAVE) is dropped and
        the master found again."""
        for attempt in range(10):
            try:
                vms, vdis = set(), set()
                for index in range(len(self.pools)):
                    xapi = self.xapi(index)
                    vms |= {f"{index}:{r}" for r in xapi.VM.get_all()}
                    vdis |= {f"{index}:{r}" for r in xapi.VDI.get_all()}
                return vms, vdis
            except (XenAPI.Failure, OSError, RuntimeError):
                self.forget_sessions()
                if attempt == 9:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def describe(self, vms: set[str], vdis: set[str]) -> list[str]:
        """What is left: name, state, and whether it carries dynvm's marker."""
        out = []
        for cls, refs in (("VM", vms), ("VDI", vdis)):
            for item in sorted(refs):
                index, ref = item.split(":", 1)
                try:
                    record = getattr(self.xapi(int(index)), cls).get_record(ref)
                except Exception as e:
                    out.append(f"{cls} {ref} on pool {int(index) + 1}: {e}")
                    continue
                marked = "marked" if MARKER_KEY in record["other_config"] else "unmarked"
                state = record.get("power_state", "")
                out.append(f"{cls} {record['name_label']!r} on pool {int(index) + 1}: {state} {marked}".rstrip())
        return out

    def vm_with_ip(self, name: str, ip: str) -> tuple[bool | None, str | None, int | None]:
        """Is a VM of that name running with that IP (None: a pool did not answer), the
        uuid of the VM of that name that has (or last had) that IP, and its pool's index."""
        uuid, pool = None, None
        try:
            for index in range(len(self.pools)):
                xapi = self.xapi(index)
                for vm in xapi.VM.get_by_name_label(name):
                    record = xapi.VM.get_record(vm)
                    if record["guest_metrics"] == "OpaqueRef:NULL":
                        continue
                    if ip in xapi.VM_guest_metrics.get_networks(record["guest_metrics"]).values():
                        uuid, pool = str(record["uuid"]), index
                        if record["power_state"] == "Running":
                            return True, uuid, pool
            return False, uuid, pool
        except Exception:
            self.forget_sessions()
            return None, uuid, pool


class Servers:
    """The ``dynvm serve`` processes (one on SQLite, two replicas on PostgreSQL)."""

    def __init__(self, config: Path, db: Path | str, replicas: int, log_dir: Path) -> None:
        self.config, self.db, self.log_dir = config, db, log_dir
        self.ports = [free_port() for _ in range(replicas)]
        self.processes: list[subprocess.Popen | None] = [None] * replicas
        self.lock = threading.Lock()
        for index in range(replicas):
            self.start(index)

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def start(self, index: int) -> None:
        log = open(self.log_dir / f"serve{index}.log", "a")  # noqa: SIM115 - the process keeps it
        process = subprocess.Popen(serve_argv(self.config, self.db, self.ports[index]), stdout=log, stderr=log)
        wait_healthy(self.url(index), process, timeout=120)
        with self.lock:
            self.processes[index] = process

    def kill(self, index: int) -> None:
        with self.lock:
            process, self.processes[index] = self.processes[index], None
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def live_urls(self) -> list[str]:
        with self.lock:
            return [self.url(i) for i, p in enumerate(self.processes) if p is not None]

    # -- backups, restores and copies, as an operator does them --------------------------------

    def backup(self, target: Path) -> None:
        """SQLite's online backup, or pg_dump, while dynvm runs."""
        if isinstance(self.db, Path):
            source, copy = sqlite3.connect(self.db), sqlite3.connect(target)
            with copy:
                source.backup(copy)
            source.close()
            copy.close()
        else:
            subprocess.run(["pg_dump", "-Fc", "-f", str(target), _libpq(self.db)], check=True)

    def restore(self, backup: Path) -> None:
        """Stop every replica (cleanly), put the backup in place, start them again."""
        with self.lock:
            self.stop()
            if isinstance(self.db, Path):
                for suffix in ("-wal", "-shm"):
                    Path(f"{self.db}{suffix}").unlink(missing_ok=True)
                shutil.copyfile(backup, self.db)
            else:
                restore_dump(backup, self.db)
        for index in range(len(self.ports)):
            self.start(index)

    def start_copy(self, backup: Path, work: Path) -> bool:
        """Start a dynvm serve on a copy of the database (made from ``backup``), as a staging
        copy would be: True if it served (it must refuse to: production runs)."""
        if isinstance(self.db, Path):
            db: Path | str = work / "copy.db"
            shutil.copyfile(backup, db)
            name = None
        else:
            db, name = fresh_postgres()
            restore_dump(backup, db)
        port = free_port()
        log = open(self.log_dir / "copy.log", "a")  # noqa: SIM115 - the process keeps it
        process = subprocess.Popen(serve_argv(self.config, db, port), stdout=log, stderr=log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, timeout=60)
            served = True
        except RuntimeError:
            served = False
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
            if name is not None:
                drop_postgres(name)
            elif isinstance(db, Path):
                db.unlink(missing_ok=True)
        return served

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
            self.processes[index] = None


WAITING_SHARE = 0.3  # of getservers that send wait=<2-20 s>: the queue under the same faults


def client(number: int, servers: Servers, lab: Lab, tally: Tally, until: float, rng: random.Random) -> None:
    held: list[tuple[str, int, list[Grant]]] = []  # (user, count, grants)
    letting_go: list[tuple[str, int, list[Grant]]] = []  # released, but not answered 200/202 yet
    made = 0
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < until:
            urls = servers.live_urls()
            if not urls:
                time.sleep(0.5)
                continue
            url = rng.choice(urls)
            held = [h for h in held if min(g.valid_until for g in h[2]) > time.time() + 1.5]
            try:
                roll = rng.random()
                if roll < 0.45 or not held:
                    made += 1
                    user, count = (
                        f"soak{number}r{made}v",
                        rng.choice((1, 1, 2, 3)),
                    )  # no name is a prefix + digits of another
                    lifetime = rng.uniform(3, 40)  # seconds; the SPEC's own example is 0.05 min
                    sent = time.time()
                    params = {"os": "centos", "count": count, "format": "detailed", "expiresin": f"{lifetime / 60:.4f}"}
                    if rng.random() < WAITING_SHARE:  # some wait in the queue when the hosts are full
                        params["wait"] = f"{rng.uniform(2, 20) / 60:.4f}"
                    answer = http.get(f"{url}/getservers/{user}", params=params)
                    tally.answered(answer)
                    if answer.status_code == 200:
                        received = time.time()
                        grants = [Grant(n, ip, sent, received, lifetime) for n, ip in answer.json().items()]
                        tally.granted(grants)
                        for grant in grants:
                            running, grant.uuid, pool = lab.vm_with_ip(grant.name, grant.ip)
                            answers = probe.answers(grant.ip, lab.service_port)
                            looked = time.time()
                            # a look that ended after the lease could have expired says nothing
                            # (a hung pool holds the observer's calls for seconds)
                            if looked >= grant.sent + grant.lifetime:
                                continue
                            if running is False:
                                with tally.lock:
                                    tally.dead.append(f"{grant.name} {grant.ip}")
                            elif not answers and (pool is None or tally.silenced(pool, grant.sent, looked)):
                                with tally.lock:  # its pool was hit meanwhile: which came first is unknown
                                    tally.unjudged += 1
                            elif not answers:
                                with tally.lock:
                                    tally.deaf.append(f"{grant.name} {grant.ip}:{lab.service_port}")
                        held.append((user, count, grants))
                elif roll < 0.80:
                    user, count, grants = held.pop(rng.randrange(len(held)))
                    sent = time.time()
                    for grant in grants:  # the user lets go now, whatever the answer: dynvm finishes
                        grant.ended = sent
                    try:
                        answer = http.get(f"{url}/releaseservers/{user}", params={"count": count})
                    except httpx.HTTPError:
                        answer = None  # dynvm serve was killed: the release may or may not have begun
                    if answer is not None:
                        tally.answered(answer)
                    if answer is not None and answer.status_code == 404:
                        if sent < min(g.valid_until for g in grants) - 1 and user not in tally.forgotten:
                            with tally.lock:
                                tally.lost.append(f"{user} x{count}: {answer.text.strip()}")
                    elif answer is None or answer.status_code not in (200, 202):
                        letting_go.append((user, count, grants))  # released for good at the end
                elif roll < 0.92:
                    tally.answered(http.get(f"{url}/getavailablecount/centos"))
                else:
                    tally.answered(http.get(f"{url}/showall"))
            except httpx.HTTPError:
                with tally.lock:
                    tally.connection_errors += 1
                time.sleep(0.2)
    # what this client still holds goes back at the end
    for user, count, grants in held + letting_go:
        release_for_good(servers, tally, user, count, grants)


def release_for_good(servers: Servers, tally: Tally, user: str, count: int, grants: list[Grant]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            for url in servers.live_urls():
                sent = time.time()
                answer = httpx.get(f"{url}/releaseservers/{user}", params={"count": count}, timeout=120)
                tally.answered(answer)
                if answer.status_code in (200, 202, 404):
                    for grant in grants:
                        grant.ended = grant.ended or sent
                    return
                if answer.status_code == 502:
                    for grant in grants:
                        grant.ended = grant.ended or sent
        time.sleep(2)


FAULTS = (
    "kill -9 of dynvm serve",
    "pool refuses connections",
    "pool hangs",
    "APIPA on 30% of boots",
    "DHCP pool exhausted",
    "VM.destroy fails",
    "VDI.destroy fails",
    "VM.clone fails",
    "VM.start fails",
    "sessions invalidated",
    "slow pool (300 ms a call)",
    "sshd never answers",
    "a member goes down",
    "a member hangs",
    "a slow member (300 ms a call)",
    "maintenance: a member disabled and evacuated",
    "a new master (designate_new_master)",
    "the master dies: emergency transition",
    "restore the oldest backup",
    "start a copy of the database",
    "PostgreSQL cuts every connection",
)
POSTGRES_ONLY = ("PostgreSQL cuts every connection",)
CUT_ANSWERS = 10.0  # seconds after a cut in which a 503 "the database does not answer" is its doing


ONLY: tuple[str, ...] = ()  # --faults: inject only these (a rehearsal of some of them)


def _members(lab: Lab, pool: int) -> tuple[int, list[str]]:
    """The pool's master position and its members' refs, in position order."""
    xapi = lab.xapi(pool)
    records = xapi.host.get_all_records()
    by_address = sorted(records, key=lambda ref: records[ref]["address"])
    master = xapi.pool.get_master(xapi.pool.get_all()[0])
    return by_address.index(master), by_address


def evacuate_where_it_fits(xapi, member: str) -> None:  # type: ignore[no-untyped-def]
    """Move the member's VMs away, each with VM.pool_migrate to a member where its vCPUs
    and memory fit, as a careful admin's maintenance mode does; one that fits nowhere
    stays. xapi's own host.evacuate checks memory only, so it may leave a member with more
    vCPUs than CPUs: that would be the admin's over-commit, not dynvm's, and the soak
    counts only dynvm's."""
    hosts = xapi.host.get_all_records()
    for vm in list(hosts[member]["resident_VMs"]):
        record = xapi.VM.get_record(vm)
        if record["is_control_domain"] or record["power_state"] != "Running":
            continue
        records = xapi.VM.get_all_records()  # afresh for each move: dynvm places meanwhile
        for target, host in hosts.items():
            if target == member or not host["enabled"]:
                continue
            used = sum(
                int(r["VCPUs_at_startup"])
                for r in records.values()
                if r["resident_on"] == target and r["power_state"] == "Running" and not r["is_control_domain"]
            )
            if used + int(record["VCPUs_at_startup"]) <= int(host["cpu_info"]["cpu_count"]):
                with contextlib.suppress(XenAPI.Failure):  # memory (xapi's own check), or gone
                    xapi.VM.pool_migrate(vm, target, {"live": "true"})
                    break


def _master_dies(lab: Lab, control: SimControlClient, pool: int, hold: float, stop: threading.Event) -> None:
    """The master goes; after a while an admin makes a member the master, and the old one
    comes back as its member."""
    master, _ = _members(lab, pool)
    control.member_down(master, "refuse")
    stop.wait(hold)
    heir = (master + 1) % lab.pool_size
    port = lab.pools[pool].url.rsplit(":", 1)[1]  # type: ignore[attr-defined]
    url = f"http://127.0.0.{heir + 1}:{port}"
    password = lab.pools[pool].password.reveal()  # type: ignore[attr-defined]
    local = XenAPI.Session(url)
    local._session = xmlrpc.client.ServerProxy(url).session.slave_local_login_with_password("root", password)["Value"]
    local.xenapi.pool.emergency_transition_to_master()
    local.xenapi.pool.recover_slaves()
    lab.forget_sessions()
    stop.wait(hold)
    control.member_up(master)  # back as a member of the new master


def inject(kind: str, lab: Lab, servers: Servers, tally: Tally, rng: random.Random, stop: threading.Event) -> None:
    pool = rng.randrange(len(lab.control))
    control = lab.control[pool]
    hold = rng.uniform(5, 12)
    match kind:
        case "kill -9 of dynvm serve":
            index = rng.randrange(len(servers.ports))
            servers.kill(index)
            stop.wait(rng.uniform(0.5, 3))
            servers.start(index)
        case "pool refuses connections" | "pool hangs":
            with tally.silencing(pool):
                control.host_down("refuse" if "refuses" in kind else "hang")
                stop.wait(hold)
                control.host_up()
        case "APIPA on 30% of boots":
            control.set_apipa_rate(0.3)
            stop.wait(hold * 2)
            control.set_apipa_rate(0.0)
        case "DHCP pool exhausted":
            control.dhcp_exhausted(True)
            stop.wait(hold)
            control.dhcp_exhausted(False)
        case "VM.destroy fails":
            control.fail_next("destroy", "INTERNAL_ERROR", 2)
        case "VDI.destroy fails":
            control.fail_next("vdi_destroy", "SR_BACKEND_FAILURE_1200", 2)
        case "VM.clone fails":
            control.fail_next("clone", "SR_BACKEND_FAILURE_44", 2)
        case "VM.start fails":
            control.fail_next("start", "BOOTLOADER_FAILED", 2)
        case "sessions invalidated":
            control.invalidate_sessions()
        case "sshd never answers":
            with tally.silencing(pool):
                control.service_never(True)
                stop.wait(hold)
                control.service_never(False)
        case "slow pool (300 ms a call)":
            control.set_timing({"latency_ms": 300})
            stop.wait(hold)
            control.set_timing({"latency_ms": 0})
        case "a member goes down" | "a member hangs" | "a slow member (300 ms a call)":
            master, _ = _members(lab, pool)
            member = rng.choice([p for p in range(lab.pool_size) if p != master])
            with contextlib.ExitStack() as silence:
                if "slow" in kind:
                    control.member_slow(member, 0.3)
                else:
                    silence.enter_context(tally.silencing(pool))
                    control.member_down(member, "hang" if "hangs" in kind else "refuse")
                stop.wait(hold * 2)
                if "slow" in kind:
                    control.member_slow(member, 0)
                else:
                    control.member_up(member)
        case "maintenance: a member disabled and evacuated":
            master, members = _members(lab, pool)
            xapi = lab.xapi(pool)
            member = members[rng.choice([p for p in range(lab.pool_size) if p != master])]
            xapi.host.disable(member)
            try:
                evacuate_where_it_fits(xapi, member)
                stop.wait(hold * 2)
            finally:
                lab.xapi(pool).host.enable(member)
        case "a new master (designate_new_master)":
            master, members = _members(lab, pool)
            lab.xapi(pool).pool.designate_new_master(members[(master + 1) % lab.pool_size])
            lab.forget_sessions()
        case "restore the oldest backup":
            backups = sorted(servers.log_dir.glob("backup-*.dump"))
            if not backups:
                return
            oldest = backups[0]
            taken = float(oldest.stem.removeprefix("backup-"))
            restored_at = time.time()
            with tally.lock:
                tally.restored_ages.append(restored_at - taken)
                # what was answered after the backup is unknown to it: those leases end with the
                # restore (their VMs are quarantined, halted): not lost, and their IPs free
                for grant in tally.grants:
                    if grant.received > taken:
                        tally.forgotten.add(grant.name.rstrip("0123456789"))  # its user (names end in v)
                        grant.ended = min(grant.ended or restored_at, restored_at)
            servers.restore(oldest)
        case "start a copy of the database":
            copy = servers.log_dir / "copy.dump"
            servers.backup(copy)
            stop.wait(25)  # a copy is started a while after it is made; production renews its claim
            if servers.start_copy(copy, servers.log_dir):
                with tally.lock:
                    tally.copies_started.append(time.strftime("%H:%M:%S"))
        case "PostgreSQL cuts every connection":
            # a failover, a restart, a proxy that drops its links: every backend of the
            # soak's database ends, idle or mid-statement, under the replicas' load
            assert isinstance(servers.db, str), "PostgreSQL only (faults_for)"
            with tally.lock:
                tally.database_cuts.append(time.time())
            cut_connections(servers.db.rsplit("/", 1)[1])
        case "the master dies: emergency transition":
            with tally.silencing(pool):
                _master_dies(lab, control, pool, hold, stop)


def faults_for(backend: str) -> tuple[str, ...]:
    """The faults a soak on ``backend`` injects: SQLite has no connection to cut."""
    kinds = ONLY or FAULTS
    return kinds if backend == "postgres" else tuple(kind for kind in kinds if kind not in POSTGRES_ONLY)


def faults(
    backend: str, lab: Lab, servers: Servers, tally: Tally, until: float, rng: random.Random, stop: threading.Event
) -> None:
    kinds = faults_for(backend)
    deck: list[str] = []
    while not stop.wait(rng.uniform(8, 20)) and time.monotonic() < until and kinds:
        if not deck:  # every kind once, in a shuffled order, before any comes again
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        with tally.lock:
            tally.faults[kind] += 1
        try:
            inject(kind, lab, servers, tally, rng, stop)
        except Exception as e:  # the soak goes on; the count says it was tried
            print(f"soak: injecting {kind!r} failed: {e}", file=sys.stderr)


def backups(servers: Servers, stop: threading.Event) -> None:
    """An operator's backups: one a minute in, then every 5 minutes (``backup-<time>.dump``)."""
    wait = 60.0
    while not stop.wait(wait):
        target = servers.log_dir / f"backup-{time.time():.0f}.dump"
        try:
            servers.backup(target)
        except Exception as e:  # a backup that fails is retried at the next
            print(f"soak: backup failed: {e}", file=sys.stderr)
        wait = 300.0


def sampler(lab: Lab, tally: Tally, stop: threading.Event) -> None:
    """Every 2 s: no member of a pool runs more vCPUs than it has CPUs, nor holds more
    memory than it has (Xen's own share, dom0 and each domain with its overhead)."""
    while not stop.wait(2):
        for index in range(len(lab.pools)):
            try:
                xapi = lab.xapi(index)
                hosts = xapi.host.get_all_records()
                vms = xapi.VM.get_all_records()
                for ref, host in hosts.items():
                    cpus = int(host["cpu_info"]["cpu_count"])
                    memory = int(xapi.host_metrics.get_memory_total(host["metrics"])) - int(host["memory_overhead"])
                    resident = [r for r in vms.values() if r["resident_on"] == ref and r["power_state"] == "Running"]
                    used_cpus = sum(int(r["VCPUs_at_startup"]) for r in resident if not r["is_control_domain"])
                    used_memory = sum(int(r["memory_static_max"]) + int(r["memory_overhead"]) for r in resident)
                    if used_cpus > cpus or used_memory > memory:
                        with tally.lock:
                            tally.overcommits.append(
                                f"pool {index + 1} {host['name_label']}: {used_cpus}/{cpus} vCPUs, "
                                f"{used_memory}/{memory} bytes"
                            )
            except Exception:
                lab.forget_sessions()  # a pool that is down right now, or whose master just moved


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def restore_dump(dump: Path, url: str) -> None:
    subprocess.run(["pg_restore", "--clean", "--if-exists", "--no-owner", "-d", _libpq(url), str(dump)], check=True)


def fresh_postgres() -> tuple[str, str]:
    """A database of this run's own (a soak beside another on the same server never
    touches the other's): its URL and name, dropped by ``drop_postgres`` at the end."""
    import psycopg

    name = f"{PG_SOAK_DB}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def cut_connections(name: str) -> None:
    """End every backend of database ``name`` but this one, as a server restart does."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


def drop_postgres(name: str) -> None:
    """Drop this run's database, once its servers are stopped."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # its own only: a killed replica may linger


def soak(backend: str, minutes: float, seed: int, work: Path) -> tuple[Tally, dict[str, object]]:
    databases: list[str] = []  # this run's own, dropped however it ends
    try:
        return _soak(backend, minutes, seed, work, databases)
    finally:
        for name in databases:
            with contextlib.suppress(Exception):
                drop_postgres(name)


def _soak(backend: str, minutes: float, seed: int, work: Path, databases: list[str]) -> tuple[Tally, dict[str, object]]:
    rng = random.Random(seed)
    config = work / f"{backend}.ini"
    control_port = free_port()
    timing = ("--clone-seconds", "0.2", "--boot-seconds", "0.8", "--ip-seconds", "0.4")
    # members small enough that the soak's clients fill them: over-commits would show
    pools = ("--pool-size", str(POOL_SIZE), "--members-in-config", "--host-cpus", "8", "--host-memory-gib", "24")
    with sim_process(config, "--hosts", str(HOSTS), "--control-port", str(control_port), *pools, *timing):
        text = config.read_text().replace("vm.network.timeout.secs=400", "vm.network.timeout.secs=4")
        # what a restore quarantines goes within the soak (72 s), not a day later
        text = text.replace("[common]\n", "[common]\norphan.quarantine.hours=0.02\n", 1)
        config.write_text(text + POOLS)  # ready pools in the storm too: handed out, refilled, killed mid-way
        lab = Lab(config, f"http://127.0.0.1:{control_port}/", POOL_SIZE)
        before_vms, before_vdis = lab.objects()
        if backend == "sqlite":
            db: Path | str = work / "soak.db"
        else:
            db, name = fresh_postgres()
            databases.append(name)
        servers = Servers(config, db, 1 if backend == "sqlite" else 2, work)
        tally = Tally()
        stop = threading.Event()
        until = time.monotonic() + minutes * 60
        threads = [
            threading.Thread(target=client, args=(n, servers, lab, tally, until, random.Random(seed * 100 + n)))
            for n in range(CLIENTS)
        ]
        threads.append(threading.Thread(target=faults, args=(backend, lab, servers, tally, until, rng, stop)))
        watcher = threading.Thread(target=sampler, args=(lab, tally, stop))
        threads.append(threading.Thread(target=backups, args=(servers, stop)))
        started = time.monotonic()
        for thread in [*threads, watcher]:
            thread.start()
        for thread in threads[:CLIENTS]:
            thread.join()
        stop.set()
        for thread in threads[CLIENTS:]:
            thread.join()
        watcher.join()
        for control in lab.control:
            control.reset()
        for index, process in enumerate(servers.processes):
            if process is None:
                servers.start(index)
        with contextlib.suppress(httpx.HTTPError):
            pools = httpx.get(f"{servers.url(0)}/api/v1/pools", timeout=30).json()
            tally.warm = sum(pool["handed_out"] for pool in pools)
        config.write_text(text)  # the pools' targets drop to 0: their ready VMs drain
        # everything is released; reconcile (every 30 s) removes what failures left
        deadline = time.monotonic() + 180
        leases: list = []
        while time.monotonic() < deadline:  # reconcile's passes (every 30 s) remove what failures left
            leases = httpx.get(f"{servers.url(0)}/api/v1/leases", timeout=30).json()
            if not leases and lab.objects() == (before_vms, before_vdis):
                break
            time.sleep(3)
        after_vms, after_vdis = lab.objects()
        tally.leftovers = lab.describe(after_vms - before_vms, after_vdis - before_vdis)
        servers.stop()
        tally.find_doubles()
        tally.find_vms_handed_twice()
        figures = {
            "duration": time.monotonic() - started,
            "vms_left": len(after_vms - before_vms),
            "disks_left": len(after_vdis - before_vdis),
            "leases_left": len(leases),
        }
        return tally, figures


def table(backend: str, tally: Tally, figures: dict[str, object], minutes: float) -> Table:
    title = (
        f"fault soak on {backend}: {minutes:g} min, {HOSTS} pools of {POOL_SIZE} (a section per member), "
        f"{CLIENTS} clients (2 CPUs)"
    )
    out = Table(title=title)
    for column in ("figure", "measured", "goal", "met"):
        out.add_column(column, justify="left" if column == "figure" else "right")

    def row(name: str, value: object, goal: object = "-") -> None:
        met = "-" if goal == "-" else ("yes" if value == goal else "NO")
        out.add_row(name, str(value), str(goal), met)

    five = sum(n for status, n in tally.statuses.items() if status >= 500 and status != 502)
    row("requests answered", tally.requests)
    row("  by status", ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items())))
    for why, n in tally.refusals.most_common():
        row(f"  429: {why}", n)
    row("  connection errors (dynvm serve killed)", tally.connection_errors)
    row("VMs granted", len(tally.grants))
    row("  of them from a ready pool", tally.warm)
    row("faults injected", sum(tally.faults.values()))
    for kind in faults_for(backend):
        row(f"  {kind}", tally.faults.get(kind, 0))
    row("VMs left behind", figures["vms_left"], 0)
    row("disks left behind", figures["disks_left"], 0)
    row("leases left after releasing all", figures["leases_left"], 0)
    row("IPs handed out twice", len(tally.doubles), 0)
    row("VMs handed to two users", len(tally.handed_twice), 0)
    row("copies of the database that served", len(tally.copies_started), 0)
    ages = ", ".join(f"{age / 60:.0f}" for age in tally.restored_ages) or "-"
    row("backups restored (their age, minutes)", ages)
    row("  users the restores forgot (not lost)", len(tally.forgotten))
    row("dead VMs handed out", len(tally.dead), 0)
    row("VMs handed out before their sshd answered", len(tally.deaf), 0)
    row("  not judged: a fault silenced their pool meanwhile", tally.unjudged)
    row("over-commits", len(tally.overcommits), 0)
    row("leases lost", len(tally.lost), 0)
    if "PostgreSQL cuts every connection" not in faults_for(backend):
        row("5xx other than 502", five, 0)
        return out
    row("  503s: a statement in flight when PostgreSQL cut its connection", tally.database_down)
    row("5xx other than 502 (and those 503s)", five - tally.database_down, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 10)))
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", 1)))
    parser.add_argument("--faults", default="", help="inject only these faults (comma-separated names)")
    args = parser.parse_args()
    global ONLY
    ONLY = tuple(kind.strip() for kind in args.faults.split(",") if kind.strip())
    unknown = [kind for kind in ONLY if kind not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    console = Console(width=140)
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    failed = False
    for backend in backends:
        work = tempfile.mkdtemp(prefix=f"dynvm-soak-{backend}-")
        if True:
            tally, figures = soak(backend, args.minutes, args.seed, Path(work))
            console.print(table(backend, tally, figures, args.minutes))
            for label, items in (
                ("IPs handed out twice", tally.doubles),
                ("VMs handed to two users", tally.handed_twice),
                ("copies that served", tally.copies_started),
                ("dead VMs handed out", tally.dead),
                ("handed out before sshd answered", tally.deaf),
                ("over-commits", tally.overcommits),
                ("leases lost", tally.lost),
                ("5xx", tally.server_errors),
                ("left behind", tally.leftovers),
            ):
                for item in items[:10]:
                    console.print(f"{label}: {item}", markup=False)
            bad = [
                tally.doubles,
                tally.handed_twice,
                tally.copies_started,
                tally.dead,
                tally.deaf,
                tally.overcommits,
                tally.lost,
                tally.server_errors,
            ]
            failed = failed or any(bad) or any(figures[k] for k in ("vms_left", "disks_left", "leases_left"))
            if failed:
                console.print(f"serve logs kept in {work}", markup=False)
            else:
                shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
