"""The simulator's own figures: overlapping boots, a big listing, and memory.

1. 50 VMs started at once on one host with ``--boot-seconds 1``: wall time until every
   guest reports an address (goal: about 1 s, not 50).
2. A ``dynvm sim`` process holding 20 hosts x 50 running VMs: ``VM.get_all_records`` for one
   host, p50 and p99 over 100 calls (goal: < 50 ms), timed twice: on the wire (request sent
   -> last byte of the answer read: what the simulator costs) and through the XenAPI SDK
   (which adds the client's own XML parsing); and the process's resident memory (goal:
   < 300 MB).
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import xmlrpc.client
from configparser import ConfigParser
from pathlib import Path

import psutil
import XenAPI
from rich.table import Table

from bench.processes import percentile, sim_process
from dynvm.sim.lab import Lab, LabOptions
from dynvm.sim.settings import Timing


def _login(url: str, password: str) -> XenAPI.Session:
    session = XenAPI.Session(url)
    session.xenapi.login_with_password("root", password, "2.21", "dynvm-bench")
    return session


def overlapping_boots(count: int = 50, boot_seconds: float = 1.0) -> float:
    lab = Lab(LabOptions(hosts=1, host_memory_gib=512, timing=Timing(boot_seconds=boot_seconds)))
    lab.start()
    try:
        node = lab.nodes[0]
        xapi = _login(node.url, node.host.spec.password).xenapi
        template = xapi.VM.get_by_name_label("tmpl-cnt7.7")[0]
        vms = []
        for n in range(count):
            vm = xapi.VM.clone(template, f"bench{n}")
            xapi.VM.provision(vm)
            vms.append(vm)
        started = time.monotonic()
        for vm in vms:
            xapi.VM.start(vm, False, False)
        pending = set(vms)
        while pending:
            records = xapi.VM_guest_metrics.get_all_records()
            with_ip = {ref for ref, r in records.items() if "0/ip" in r["networks"]}
            pending = {vm for vm in pending if xapi.VM.get_guest_metrics(vm) not in with_ip}
            if pending:
                time.sleep(0.02)
        return time.monotonic() - started
    finally:
        lab.stop()


def _wire_samples(url: str, session: str, calls: int) -> list[float]:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port)
    body = xmlrpc.client.dumps((session,), "VM.get_all_records").encode()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        connection.request("POST", "/", body, {"Content-Type": "text/xml"})
        connection.getresponse().read()
        samples.append(time.perf_counter() - started)
    connection.close()
    return samples


def big_lab(hosts: int = 20, vms_per_host: int = 50, calls: int = 100) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "lab.ini"
        flags = ("--hosts", str(hosts), "--foreign-vms", str(vms_per_host), "--host-memory-gib", "512")
        with sim_process(config_path, *flags) as process:
            config = ConfigParser(interpolation=None)
            config.read(config_path)
            host = config["xenhost1"]
            session = _login(host["host.name"], host["host.password"])
            xapi = session.xenapi
            sdk = []
            for _ in range(calls):
                started = time.perf_counter()
                records = xapi.VM.get_all_records()
                sdk.append(time.perf_counter() - started)
            running = sum(1 for r in records.values() if r["power_state"] == "Running" and not r["is_control_domain"])
            assert running == vms_per_host, running
            wire = _wire_samples(host["host.name"], session.handle, calls)
            return {
                "records": len(records),
                "wire_p50": statistics.median(wire),
                "wire_p99": percentile(wire, 0.99),
                "sdk_p50": statistics.median(sdk),
                "sdk_p99": percentile(sdk, 0.99),
                "rss_mb": psutil.Process(process.pid).memory_info().rss / 1e6,
            }


def run() -> Table:
    boots = overlapping_boots()
    big = big_lab()
    table = Table(title=f"dynvm sim ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("goal", justify="right")
    table.add_column("met")
    table.add_row("50 VMs booted at once, --boot-seconds 1: all IPs", f"{boots:.2f} s", "≈ 1 s", _met(boots < 2))
    label = f"VM.get_all_records, 1 host of 20 × 50 VMs ({big['records']} records)"
    for stat in ("p50", "p99"):
        value = big[f"wire_{stat}"]
        table.add_row(f"{label}, answer on the wire, {stat}", f"{value * 1e3:.1f} ms", "< 50 ms", _met(value < 0.05))
    for stat in ("p50", "p99"):
        # The SDK parses the XML in pure Python: most of this figure is the client, not the host.
        value = big[f"sdk_{stat}"]
        table.add_row(
            f"  same through the XenAPI SDK (client parsing included), {stat}", f"{value * 1e3:.1f} ms", "-", "-"
        )
    rss = big["rss_mb"]
    table.add_row("sim process RSS, 20 hosts × 50 running VMs", f"{rss:.0f} MB", "< 300 MB", _met(rss < 300))
    return table


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"
