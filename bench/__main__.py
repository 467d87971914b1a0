"""``python -m bench [NAME ...]``: run the benchmarks (all by default) and print their tables."""

from __future__ import annotations

import sys

from rich.console import Console

from bench import (
    dashboard_bench,
    engine_bench,
    history_bench,
    lease_bench,
    libvirt_bench,
    live_bench,
    newcomer_bench,
    pool_bench,
    pool_identity_bench,
    queue_bench,
    service_bench,
    sim_bench,
    sizing_bench,
    xen_bench,
)

BENCHMARKS = {
    "sim": sim_bench.run,
    "xen": xen_bench.run,
    "leases": lease_bench.run,
    "service": service_bench.run,
    "queue": queue_bench.run,
    "pools": pool_bench.run,
    "pool-identity": pool_identity_bench.run,
    "sizing": sizing_bench.run,
    "live": live_bench.run,
    "dashboard": dashboard_bench.run,
    "libvirt": libvirt_bench.run,
    "engine": engine_bench.run,
    "history": history_bench.run,
    "newcomer": newcomer_bench.run,
}


def main(argv: list[str]) -> None:
    console = Console(width=140)
    scale = None
    if "--scale" in argv:  # python -m bench sizing --scale 10
        at = argv.index("--scale")
        scale = float(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        console.print(f"Error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        raise SystemExit(2)
    for name in names:
        if name == "sizing" and scale is not None:
            console.print(sizing_bench.run(scale=scale))
        else:
            console.print(BENCHMARKS[name]())


main(sys.argv[1:])
