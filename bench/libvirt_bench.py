"""Real guests under libvirt/QEMU (software emulation) on this machine: cold time-to-VM
through a real ``dynvm serve`` for count=1 and count=4, against the raw floor measured in
the same run, interleaved (libvirt alone: clone, define, ``create()`` and wait for the
guest's SSH banner, no dynvm), and a warm hand-out from a ready pool of real guests.

Goals (issue 26): dynvm's own overhead (its time less the floor's, medians) at most 5 % of
the floor; a warm hand-out at most 50 ms.

It runs inside a network namespace of its own (where the guests' network lives): outside
one it runs itself again through ``tests/libvirt/in-netns``.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table
from rich.text import Text

from bench.processes import percentile, serve_process

ROUNDS = 3  # cold rounds of each kind, interleaved (floor, dynvm, floor, dynvm, ...)
WARM = 8  # warm hand-outs
REPO = Path(__file__).resolve().parents[1]


def run() -> Table | Text:
    from dynvm.libvirt.commands import own_network_namespace

    if not own_network_namespace():
        done = subprocess.run(
            [str(REPO / "tests/libvirt/in-netns"), sys.executable, "-m", "bench", "libvirt"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        return Text(done.stdout + done.stderr)
    return measure()


def measure() -> Table:
    from dynvm.libvirt import image, lab
    from dynvm.libvirt.commands import image_dir

    built = image.build(image_dir())
    directory = Path(tempfile.mkdtemp(prefix="dynvm-bench-", dir="/var/tmp"))
    directory.chmod(0o755)
    made = lab.start("dynvm-bench", directory, built)
    try:
        return _measure(made, built, directory)
    finally:
        lab.stop(made)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def _measure(made: Any, built: Any, directory: Path) -> Table:
    config = directory / "dynvmservice.ini"
    config.write_text(
        "[common]\ncpu.overcommit=8\nvm.network.timeout.secs=120\n\n" + made.section(1, built) + "\n[probe]\nport=22\n"
    )
    cold: dict[int, dict[str, list[float]]] = {n: {"floor": [], "dynvm": []} for n in (1, 4)}
    with serve_process(config, directory / "dynvm.db", timeout=120) as url:
        http = httpx.Client(base_url=url, timeout=300)
        for _ in range(ROUNDS):
            for count in (1, 4):
                cold[count]["floor"].append(floor(made, built, count))
                started = time.perf_counter()
                answer = http.get("/getservers/bench", params={"os": "tiny", "count": count})
                cold[count]["dynvm"].append(time.perf_counter() - started)
                answer.raise_for_status()
                http.get("/releaseservers/bench", params={"os": "tiny", "count": count}).raise_for_status()
    pooled = directory / "pooled.ini"
    pooled.write_text(config.read_text() + "\n[pools]\ntiny.ready=2\n")
    warm: list[float] = []
    with serve_process(pooled, directory / "pooled.db", timeout=120) as url:
        http = httpx.Client(base_url=url, timeout=300)
        for n in range(WARM):
            wait_ready(http, 2)
            started = time.perf_counter()
            answer = http.get(f"/getservers/warm{n}", params={"os": "tiny"})
            warm.append(time.perf_counter() - started)
            answer.raise_for_status()
            http.get(f"/releaseservers/warm{n}", params={"os": "tiny"}).raise_for_status()
    table = Table(title="Real guests under libvirt/QEMU (TCG, this machine): cold time-to-VM against the raw floor")
    for column in ("what", "floor p50 s", "dynvm p50 s", "dynvm's own s", "of the floor", "runs"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for count, runs in cold.items():
        raw, ours = statistics.median(runs["floor"]), statistics.median(runs["dynvm"])
        table.add_row(
            f"cold, count={count}",
            f"{raw:.2f}",
            f"{ours:.2f}",
            f"{ours - raw:+.2f}",
            f"{(ours - raw) / raw:+.1%}",
            f"{ROUNDS} each: floor {' '.join(f'{x:.1f}' for x in runs['floor'])}; "
            f"dynvm {' '.join(f'{x:.1f}' for x in runs['dynvm'])}",
        )
    table.add_row(
        "warm hand-out (ready pool)",
        "",
        f"{statistics.median(warm) * 1000:.0f} ms",
        "",
        "",
        f"{WARM}: p90 {percentile(warm, 0.9) * 1000:.0f} ms, max {max(warm) * 1000:.0f} ms",
    )
    return table


def wait_ready(http: httpx.Client, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = http.get("/api/v1/pools").json()
        ready = sum(p.get("ready", 0) for p in pools if p.get("os") == "tiny")
        if ready >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the ready pool did not reach {count}")


def floor(made: Any, built: Any, count: int) -> float:
    """libvirt alone: ``count`` guests cloned, defined and started at once; the seconds
    until every one's sshd sends its banner. Its domains and volumes are removed after."""
    import libvirt
    from dynvm.libvirt import marker
    from dynvm.libvirt.provision import clone_xml, domain_xml
    from dynvm.libvirt.settings import LibvirtHostSettings
    from dynvm.model import VmSpec

    connection = libvirt.open("qemu:///system")
    host = LibvirtHostSettings(
        number=1,
        templates={"tiny": built.disk.name},
        storage_pool=made.name,
        network=made.name,
        domain_type="qemu",
        images={"tiny": _image(built)},
    )
    pool = connection.storagePoolLookupByName(made.name)
    base = pool.storageVolLookupByName(built.disk.name)
    image = host.images["tiny"]
    names = [f"floor-{uuid.uuid4()}" for _ in range(count)]
    took: list[float] = []
    started = time.perf_counter()

    def one(lease: str) -> None:
        spec = VmSpec(name=lease, os="tiny", template=image.volume, lease_id=lease)
        volume = f"{lease}.qcow2"
        xml = domain_xml(host, spec, image, marker.Mark(lease, "floor"), 1, 128 * 1024 * 1024, volume)
        dom = connection.defineXML(xml)
        pool.createXML(clone_xml(volume, base), 0)
        dom.create()
        address = None
        while address is None:
            leases = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0) or {}
            address = next((a["addr"] for nic in leases.values() for a in nic.get("addrs") or ()), None)
            if address is None:
                time.sleep(0.02)
        while not banner(address):
            time.sleep(0.02)
        took.append(time.perf_counter() - started)

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in names:
        dom = connection.lookupByName(marker.domain_name(name))
        dom.destroy()
        pool.storageVolLookupByName(f"{name}.qcow2").delete(0)
        dom.undefine()
    connection.close()
    if len(took) != count:
        raise RuntimeError("a floor guest did not come up")
    return max(took)


def _image(built: Any) -> Any:
    from dynvm.libvirt.settings import OsImage

    return OsImage(built.disk.name, 1, 128, built.kernel, built.initrd, "console=ttyS0 quiet")


def banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as connection:
            connection.settimeout(2)
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False
