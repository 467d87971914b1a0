"""Listing every running VM of 20 hosts x 50 VMs: dynvm's event.from mirror beside the seed
service's way (``VM.get_all``, then ``get_record`` and the guest metrics per VM), on the
same simulator with ``--latency-ms 2``. Goal: the mirror answers in < 5 ms.

Also: how long a change on a host takes to show in the mirror (contract: < 1 s).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import XenAPI
from rich.table import Table

from bench.processes import percentile, sim_process
from dynvm.config import load_settings
from dynvm.xen.inventory import Inventory

HOSTS, VMS, LATENCY_MS = 20, 50, 2


def _mirror_listing(inventory: Inventory) -> list[dict[str, str]]:
    return [
        {
            "name": vm.name,
            "power_state": vm.power_state,
            "vcpus": vm.vcpus,
            "memory_static_max": vm.memory,
            "networkinfo": ",".join(vm.addresses),
        }
        for view in inventory.views()
        for vm in view.running_vms
    ]


def _seed_listing(sessions: list) -> list[dict[str, str]]:
    out = []
    for xapi in sessions:
        for ref in xapi.VM.get_all():
            record = xapi.VM.get_record(ref)
            if record["power_state"] != "Running" or record["is_control_domain"] or record["is_a_template"]:
                continue
            networks = {}
            if record["guest_metrics"] != "OpaqueRef:NULL":
                networks = xapi.VM_guest_metrics.get_record(record["guest_metrics"])["networks"]
            out.append(
                {
                    "name": record["name_label"],
                    "power_state": record["power_state"],
                    "vcpus": record["VCPUs_at_startup"],
                    "memory_static_max": record["memory_static_max"],
                    "networkinfo": ",".join(v for k, v in sorted(networks.items()) if k.endswith("/ip")),
                }
            )
    return out


def run() -> Table:
    flags = (
        "--hosts",
        str(HOSTS),
        "--foreign-vms",
        str(VMS),
        "--host-memory-gib",
        "512",
        "--latency-ms",
        str(LATENCY_MS),
    )
    with tempfile.TemporaryDirectory() as tmp, sim_process(Path(tmp) / "lab.ini", *flags):
        config = Path(tmp) / "lab.ini"
        inventory = Inventory()
        try:
            settings = load_settings(config)
            started = time.monotonic()
            inventory.apply(settings)
            inventory.wait_synced(120)
            sync_seconds = time.monotonic() - started

            mirror = []
            for _ in range(200):
                t = time.perf_counter()
                listing = _mirror_listing(inventory)
                mirror.append(time.perf_counter() - t)
            assert len(listing) == HOSTS * VMS, len(listing)

            sessions = []
            for host in settings.hosts:
                session = XenAPI.Session(host.url)
                session.xenapi.login_with_password(host.user, host.password.reveal(), "2.21", "seed-way")
                sessions.append(session.xenapi)
            seed = []
            for _ in range(3):
                t = time.perf_counter()
                seed_listing = _seed_listing(sessions)
                seed.append(time.perf_counter() - t)
            assert len(seed_listing) == HOSTS * VMS

            xapi = sessions[0]
            vm = next(
                r
                for r, rec in xapi.VM.get_all_records().items()
                if rec["power_state"] == "Running" and not rec["is_control_domain"]
            )
            change = []
            for n in range(20):
                t = time.perf_counter()
                xapi.VM.set_name_label(vm, f"renamed-{n}")
                while not any(v.name == f"renamed-{n}" for v in inventory.view("1").vms):
                    time.sleep(0.001)
                change.append(time.perf_counter() - t)
        finally:
            inventory.stop()

    mirror_p50, seed_p50 = statistics.median(mirror), statistics.median(seed)
    table = Table(
        title=f"dynvm's Xen inventory: {HOSTS} hosts × {VMS} running VMs, sim --latency-ms {LATENCY_MS} "
        f"({os.cpu_count()} CPUs)"
    )
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("goal", justify="right")
    table.add_column("met")
    table.add_row(
        "list all running VMs from the mirror, p50",
        f"{mirror_p50 * 1e3:.2f} ms",
        "< 5 ms",
        "yes" if mirror_p50 < 0.005 else "NO",
    )
    table.add_row(
        "  same, p99",
        f"{percentile(mirror, 0.99) * 1e3:.2f} ms",
        "< 5 ms",
        "yes" if percentile(mirror, 0.99) < 0.005 else "NO",
    )
    table.add_row(
        "the seed's way (get_all + get_record + guest metrics per VM), median of 3",
        f"{seed_p50 * 1e3:.0f} ms",
        "-",
        "-",
    )
    table.add_row("ratio seed / mirror (p50)", f"{seed_p50 / mirror_p50:,.0f}×", "-", "-")
    table.add_row(
        "a change on a host visible in the mirror, p50",
        f"{statistics.median(change) * 1e3:.1f} ms",
        "< 1 s",
        "yes" if max(change) < 1 else "NO",
    )
    table.add_row("  same, max of 20", f"{max(change) * 1e3:.1f} ms", "< 1 s", "yes" if max(change) < 1 else "NO")
    table.add_row("initial sync of all 20 hosts", f"{sync_seconds:.2f} s", "-", "-")
    return table
