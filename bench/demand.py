"""A synthetic week of CI demand, as a trace (``dynvm.trace``): ``python -m bench.demand
--out week.csv [--seed N] [--days 7] [--scale 1.0]``.

Its shape, each part a parameter of ``WeekShape``:

- **Weekdays and weekends.** Daytime demand on Saturday and Sunday is ``weekend_factor``
  of a weekday's.
- **A daytime peak.** From ``day_start`` to ``day_end`` (hours, UTC) jobs arrive at
  ``day_rate`` requests an hour, rising and falling over an hour at each end; at night at
  ``night_rate``.
- **A nightly regression wave.** On weekdays at ``wave_hour`` (UTC), ``wave_jobs`` jobs
  arrive within ``wave_minutes``, each asking for ``wave_count`` VMs.
- **A per-OS mix** (``os_mix``): the share of requests for each OS key.
- **Heavy-tailed hold times.** Log-normal: median ``hold_median_s``, shape ``hold_sigma``,
  at most ``hold_max_s`` (a VM expires then).
- **Batches.** ``count`` is 1 mostly; 2 to 4, or 8, as ``count_mix`` says.

Arrivals are a Poisson process whose rate follows the shape (thinning), with one seeded
``random.Random``: the same seed gives the same trace, row for row.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from dynvm.trace import Demand, write_trace

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class WeekShape:
    days: int = 7
    day_rate: float = 40.0  # requests an hour at the daytime peak
    night_rate: float = 4.0
    day_start: float = 8.0
    day_end: float = 19.0
    weekend_factor: float = 0.15
    wave_hour: float = 1.0
    wave_minutes: float = 20.0
    wave_jobs: int = 30
    wave_count: int = 2
    os_mix: dict[str, float] = field(
        default_factory=lambda: {"centos": 0.55, "ubuntu18": 0.2, "windows": 0.15, "centos8": 0.1}
    )
    count_mix: dict[int, float] = field(default_factory=lambda: {1: 0.7, 2: 0.12, 3: 0.08, 4: 0.06, 8: 0.04})
    hold_median_s: float = 25 * 60.0
    hold_sigma: float = 1.1
    hold_max_s: float = 12 * HOUR
    jobs: int = 60  # distinct job names that ask by day
    scale: float = 1.0  # multiplies every rate


def rate_at(shape: WeekShape, t: float) -> float:
    """Requests an hour at ``t`` seconds from Monday 00:00, the wave aside."""
    day, hour = int(t // DAY), (t % DAY) / HOUR
    weekend = day % 7 >= 5
    rise = _ramp(hour - shape.day_start + 0.5)
    fall = _ramp(shape.day_end + 0.5 - hour)
    daytime = shape.night_rate + (shape.day_rate - shape.night_rate) * min(rise, fall)
    if weekend:
        daytime = shape.night_rate + (daytime - shape.night_rate) * shape.weekend_factor
    return daytime * shape.scale


def _ramp(x: float) -> float:
    """0 before, 1 after, linear over the hour in between."""
    return min(1.0, max(0.0, x))


def _pick(rng: random.Random, mix: dict) -> object:  # type: ignore[type-arg]
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def _hold(rng: random.Random, shape: WeekShape) -> float:
    return min(shape.hold_max_s, rng.lognormvariate(math.log(shape.hold_median_s), shape.hold_sigma))


def generate(shape: WeekShape, seed: int) -> list[Demand]:
    rng = random.Random(seed)
    end = shape.days * DAY
    peak = max(shape.day_rate, shape.night_rate) * shape.scale
    out: list[Demand] = []
    t = 0.0
    while True:  # thinning: candidates at the peak rate, kept with probability rate(t) / peak
        t += rng.expovariate(peak / HOUR)
        if t >= end:
            break
        if rng.random() * peak <= rate_at(shape, t):
            job = rng.randrange(shape.jobs)
            os = str(_pick(rng, shape.os_mix))
            count = int(_pick(rng, shape.count_mix))  # type: ignore[call-overload]
            out.append(Demand(round(t, 3), f"job{job:02d}-{len(out)}", os, count, round(_hold(rng, shape), 3)))
    for day in range(shape.days):
        if day % 7 >= 5:
            continue
        start = day * DAY + shape.wave_hour * HOUR
        for n in range(round(shape.wave_jobs * shape.scale)):
            at = start + rng.uniform(0, shape.wave_minutes * 60)
            os = str(_pick(rng, shape.os_mix))
            out.append(
                Demand(round(at, 3), f"nightly{n:02d}-d{day}", os, shape.wave_count, round(_hold(rng, shape), 3))
            )
    return sorted(out, key=lambda d: (d.arrival_s, d.user))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every rate")
    args = parser.parse_args()
    rows = write_trace(args.out, generate(WeekShape(days=args.days, scale=args.scale), args.seed))
    print(f"{args.out}: {rows} requests over {args.days} day(s)")


if __name__ == "__main__":
    main()
