"""The virtual clock against the live one, on the same slice of the synthetic week
(``bench/demand.py``, seed 1; learned sizing with seed 2 as its history): ``dynvm replay``
in virtual time, and ``dynvm replay --live`` against real ``dynvm serve`` and ``dynvm sim``
processes with time compressed ``SPEED`` times. The table prints both clocks' figures and
their difference: how far a virtual replay's answer is from what a real service does.
"""

from __future__ import annotations

from rich.table import Table

from bench.demand import WeekShape, generate
from dynvm.replay.live import LiveReplay
from dynvm.replay.runner import Replay, ReplayOptions

HOSTS = 14
SPEED = 60.0
FROM_HOUR = 7.5  # Monday 07:30 to 09:30: the night's trickle, then the morning ramp
HOURS = 2.0
FIGURES = ("requests", "warm_requests", "ttv_p50_s", "ttv_p95_s", "ttv_mean_s", "queued", "vm_hours_idle")


def run() -> Table:
    trace = generate(WeekShape(), seed=1)  # the slice is replayed; what came before it is known
    past = generate(WeekShape(), seed=2)
    start = FROM_HOUR * 3600
    policies = {
        "learned, margin 1": ReplayOptions(hosts=HOSTS, policy="learned", start=start, hours=HOURS),
        "fixed, 12 ready": ReplayOptions(
            hosts=HOSTS,
            policy="fixed",
            fixed={"centos": 7, "ubuntu18": 2, "windows": 2, "centos8": 1},
            start=start,
            hours=HOURS,
        ),
    }
    table = Table(
        title=f"virtual against live clock: {HOURS:g} h of the synthetic week from Monday {FROM_HOUR:g} h, "
        f"{HOSTS} hosts, create 65 s, live at {SPEED:g}x"
    )
    for column in ("policy", "figure", "virtual", "live", "live - virtual"):
        table.add_column(column, justify="left" if column in ("policy", "figure") else "right")
    for label, options in policies.items():
        history = past if options.policy == "learned" else None
        virtual = Replay(trace, options, history).run().summary()
        live = LiveReplay(trace, options, SPEED, history).run().summary()
        for n, figure in enumerate(FIGURES):
            a, b = virtual[figure], live[figure]
            table.add_row(label if n == 0 else "", figure, f"{a:g}", f"{b:g}", f"{b - a:+.3g}")
        table.add_row(
            "", "wall seconds", f"{virtual['wall_seconds']:g}", f"{live['wall_seconds']:g}", "", end_section=True
        )
    table.caption = (
        "ttv in trace seconds; a warm handout counts its measured wall time on both clocks, a cold one the create "
        "time (virtual) or its measured time x speed (live, so the service's own overheads are multiplied too)"
    )
    return table
