"""A fault soak on real guests under libvirt/QEMU: ``python -m bench.libvirt_soak --minutes 10``.

A real ``dynvm serve`` (with a ready pool) serves three clients that lease one to three
guests at a time, SSH into one of them, and release them or let them expire; meanwhile,
every 30 to 60 s, one fault: ``dynvm serve`` killed with SIGKILL and started again,
libvirtd stopped and started again, a guest's domain destroyed and undefined by hand, or a
clone volume made undeletable for 30 s (``chattr +i``) so that its delete fails. At the end
the clients stop, every lease is released, and after reconcile nothing may be left: no
domain, no clone volume, no lease still active. Throughout, no address may be handed to
two leases at once.

It runs inside a network namespace of its own (re-running itself through
``tests/libvirt/in-netns`` when it is not in one). Never part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench.processes import free_port, serve_argv, wait_healthy

REPO = Path(__file__).resolve().parents[1]


class Soak:
    def __init__(self, made: Any, built: Any, directory: Path, seed: int) -> None:
        self.made = made
        self.built = built
        self.directory = directory
        self.random = random.Random(seed)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = directory / "dynvmservice.ini"
        self.config.write_text(
            "[common]\ncpu.overcommit=6\nvm.network.timeout.secs=120\norphan.quarantine.hours=0\n\n"
            + made.section(1, built)
            + "\n[pools]\ntiny.ready=1\n"
        )
        self.db = directory / "dynvm.db"
        self.process: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.holding: dict[str, str] = {}  # address -> the lease name holding it (as the clients saw)
        self.double: list[str] = []
        self.log = open(directory / "serve.log", "ab")  # noqa: SIM115 - open for the soak's whole run

    # -- the service ---------------------------------------------------------------------

    def start_service(self) -> None:
        self.process = subprocess.Popen(
            serve_argv(self.config, self.db, self.port), stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_healthy(self.url, self.process, timeout=120)

    def kill_service(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    # -- clients -------------------------------------------------------------------------

    def client(self, number: int) -> None:
        http = httpx.Client(base_url=self.url, timeout=300)
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"c{number}x{n}"
            count = self.random.randint(1, 3)
            expires = self.random.choice(["", "0.5"])  # some expire by themselves (30 s)
            params: dict[str, str | int] = {"os": "tiny", "count": count}
            if expires:
                params["expiresin"] = expires
            try:
                answer = http.get(f"/getservers/{name}", params=params)
            except httpx.HTTPError:
                self.count("request cut (the service died)")
                time.sleep(1)
                continue
            if answer.status_code != 200:
                self.count(f"refused {answer.status_code}")
                time.sleep(self.random.uniform(0.5, 2))
                continue
            addresses = answer.json()
            self.count("leased")
            self.count("guests", len(addresses))
            with self.lock:
                for address in addresses:
                    if address in self.holding:
                        self.double.append(f"{address}: {self.holding[address]} and {name}")
                    self.holding[address] = name
            if self.reach(addresses[0]):
                self.count("ssh ok")
            else:
                self.count("ssh failed")
            self.stop.wait(self.random.uniform(1, 8))
            with self.lock:
                for address in addresses:
                    if self.holding.get(address) == name:
                        del self.holding[address]
            if expires and self.random.random() < 0.5:
                continue  # left to expire
            try:
                http.get(f"/releaseservers/{name}", params={"os": "tiny", "count": len(addresses)})
            except httpx.HTTPError:
                self.count("release cut (the service died)")

    def reach(self, address: str) -> bool:
        done = subprocess.run(
            [
                *("ssh", "-i", str(self.built.key), "-o", "StrictHostKeyChecking=no"),
                *("-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"),
                *("-o", "LogLevel=ERROR", f"root@{address}", "hostname"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.returncode == 0 and done.stdout.strip() == "dynvm-guest"

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    # -- faults --------------------------------------------------------------------------

    def faults(self) -> None:
        kinds = ["kill -9 dynvm serve", "libvirtd restarted", "domain destroyed by hand", "volume delete fails"]
        while not self.stop.wait(self.random.uniform(30, 60)):
            kind = self.random.choice(kinds)
            try:
                if kind == "kill -9 dynvm serve":
                    self.kill_service()
                    self.start_service()
                elif kind == "libvirtd restarted":
                    subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False)
                    time.sleep(2)
                    subprocess.run(["libvirtd", "-d"], check=True)
                elif kind == "domain destroyed by hand":
                    if not self.destroy_one_by_hand():
                        continue
                elif not self.make_a_volume_stick():
                    continue
                self.count(f"fault: {kind}")
            except Exception as e:  # a fault that could not be made is counted, the soak goes on
                self.count(f"fault failed: {kind}: {e}")

    def connection(self) -> Any:
        import libvirt

        return libvirt.open("qemu:///system")

    def destroy_one_by_hand(self) -> bool:
        connection = self.connection()
        try:
            domains = [d for d in connection.listAllDomains(0) if d.name().startswith("dynvm-") and d.isActive()]
            if not domains:
                return False
            dom = self.random.choice(domains)
            dom.destroy()
            dom.undefine()
            return True
        finally:
            connection.close()

    def make_a_volume_stick(self) -> bool:
        pool = self.made.pool_path
        volumes = [p for p in pool.iterdir() if p.name.startswith("dynvm-")]
        if not volumes:
            return False
        path = self.random.choice(volumes)
        subprocess.run(["chattr", "+i", str(path)], check=False)

        def unstick() -> None:
            time.sleep(30)
            subprocess.run(["chattr", "-i", str(path)], check=False)

        threading.Thread(target=unstick, daemon=True).start()
        return True

    # -- the end -------------------------------------------------------------------------

    def leftovers(self) -> tuple[list[str], list[str], list[str]]:
        connection = self.connection()
        try:
            domains = [d.name() for d in connection.listAllDomains(0) if d.name().startswith("dynvm-")]
        finally:
            connection.close()
        volumes = [p.name for p in self.made.pool_path.iterdir() if p.name.startswith("dynvm-")]
        leases = httpx.get(f"{self.url}/api/v1/leases", params={"all": "true"}, timeout=30).json()
        active = [lease["name"] for lease in leases if lease["state"] in ("creating", "ready", "releasing")]
        return domains, volumes, active


def soak(minutes: float, seed: int) -> Table:
    from dynvm.libvirt import image, lab
    from dynvm.libvirt.commands import image_dir

    built = image.build(image_dir())
    directory = Path(tempfile.mkdtemp(prefix="dynvm-soak-", dir="/var/tmp"))
    directory.chmod(0o755)
    made = lab.start("dynvm-soak", directory, built)
    run = Soak(made, built, directory, seed)
    started = time.monotonic()
    try:
        run.start_service()
        threads = [threading.Thread(target=run.client, args=(n,), daemon=True) for n in range(3)]
        threads.append(threading.Thread(target=run.faults, daemon=True))
        for thread in threads:
            thread.start()
        run.stop.wait(minutes * 60)
        run.stop.set()
        for thread in threads:
            thread.join(timeout=400)
        for path in made.pool_path.iterdir():
            subprocess.run(["chattr", "-i", str(path)], check=False)
        # the end of the soak: the pool emptied, every lease released, then reconcile
        run.config.write_text(run.config.read_text().replace("tiny.ready=1", "tiny.ready=0"))
        http = httpx.Client(base_url=run.url, timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            domains, volumes, active = run.leftovers()
            for name in active:
                http.delete(f"/api/v1/leases/{name}")
            if not domains and not volumes and not active:
                break
            time.sleep(5)
        domains, volumes, active = run.leftovers()
    finally:
        if run.process is not None and run.process.poll() is None:
            run.process.send_signal(signal.SIGTERM)
            run.process.wait(timeout=60)
        lab.stop(made)
    table = Table(
        title=f"Fault soak on real guests: {minutes:g} min, seed {seed}, {time.monotonic() - started:.0f} s in all"
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    for what, n in sorted(run.counts.items()):
        table.add_row(what, str(n))
    table.add_row("addresses handed to two leases at once", str(len(run.double)))
    table.add_row("left at the end: domains", str(len(domains)))
    table.add_row("left at the end: clone volumes", str(len(volumes)))
    table.add_row("left at the end: active leases", str(len(active)))
    if run.double or domains or volumes or active:
        table.add_row("[red]FAILED[/red]", "; ".join(run.double + domains + volumes + active)[:200])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from dynvm.libvirt.commands import own_network_namespace

    if not own_network_namespace():
        os.execv(
            str(REPO / "tests/libvirt/in-netns"),
            [str(REPO / "tests/libvirt/in-netns"), sys.executable, "-m", "bench.libvirt_soak", *sys.argv[1:]],
        )
    Console(width=140).print(soak(args.minutes, args.seed))


if __name__ == "__main__":
    main()
