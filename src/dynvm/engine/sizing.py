"""Learned ready-pool sizing (``[pools] sizing=learned``): how many VMs of each OS to keep
ready for the next while, from the demand dynvm has seen.

Per OS, from its arrivals (VMs asked for, and when):

1. **A profile.** The number of VMs asked for in each hour of the week, averaged over the
   weeks seen, the latest counting most (each week back half as much); until a whole week
   has been seen, the same for that hour of the day over the days seen (so a daily
   schedule is learned within a day). With it, its spread.
2. **The recent rate**: VMs asked for in the last ``RECENT_SECONDS``.
3. **A blend**: ``w x profile + (1 - w) x recent``, where ``w`` grows with the days of
   profile behind it (``w = d / (d + 1)``): a new OS is sized on its recent rate alone,
   and a changed schedule shows through the recent rate at once.
4. **Little's law.** A VM asked for while none is ready waits one create time; to hide it,
   as many VMs must be ready as arrive within a create time: ``rate x create_seconds``. The
   rate is the highest blended rate in the window from now to one create time plus one
   sizing interval ahead, so the pool ramps up before a forecast peak, not in it.
5. **A safety margin**, the one knob: ``margin x sqrt(mean x dispersion + spread)`` VMs
   more, from the noise of arrivals and the profile's own variance. Requests come in
   batches (a request for 8 VMs is 8 at once), so the VMs asked for within a create time
   vary more than a Poisson count of VMs would: by ``dispersion = E[count^2] / E[count]``
   of the OS's requests (1 when every request asks for one). ``margin=0`` keeps the mean.
6. **Bounds**: at most ``<os>.max`` (``[pools]``), at most what fits, and, when the OSes
   together want more than fits, each gets its share of the room in proportion to its need.
7. **A busy lab has no pools.** By Little's law the demand keeps ``rate x mean hold`` VMs
   busy; when that, all OSes together, is ``BUSY_LOAD`` or more of what the whole lab holds,
   requests will wait for room anyway, and a ready VM only takes room (and a create) a
   waiting request needs: every target is 0 (``capped_by="busy"``) until the load falls.

Pure: arrivals and times in, targets out; no database, clock or thread of its own, so the
service (``ready_pools.py``) and ``dynvm replay`` (virtual time) drive the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
RECENT_SECONDS = HOUR  # the recent rate's window
KEEP_SECONDS = 4 * WEEK  # arrivals older than this are forgotten
DEFAULT_MARGIN = 1.0
PROFILE_DECAY = 0.5  # each period further back counts half as much: a changed schedule is learned in days
DEFAULT_INTERVAL = 300.0  # how long a target holds before it is computed again
BUSY_LOAD = 0.75  # the share of the lab the demand keeps busy from which the pools stand down
HOLDS_KEPT = 1000  # hold times kept per OS (the latest) for the mean hold


@dataclass(frozen=True)
class Forecast:
    """One OS's target, and what made it (shown by ``GET /api/v1/pools`` and /metrics)."""

    os: str
    target: int
    rate_per_hour: float  # the blended rate the target was sized on (VMs asked per hour)
    profile_per_hour: float | None  # the profile's rate for now (None: no profile yet)
    recent_per_hour: float
    weight: float  # the profile's share of the blend
    create_seconds: float
    margin: float
    capped_by: str = ""  # "", "max", "room", "share" or "busy": what bounded the target


class DemandModel:
    """Arrivals per OS, kept as VMs asked for per clock hour, and the rates they imply at a
    given moment. Times are Unix seconds (or any seconds: ``dynvm replay`` uses the
    trace's own)."""

    def __init__(self) -> None:
        self._hours: dict[str, dict[int, int]] = defaultdict(dict)  # os -> hour index -> VMs
        self._first: dict[str, float] = {}
        self._recent: dict[str, list[tuple[float, int]]] = defaultdict(list)  # the last RECENT_SECONDS
        self._holds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HOLDS_KEPT))
        self._batches: dict[str, tuple[int, int]] = {}  # os -> (VMs asked for, sum of each request's count squared)

    @property
    def oses(self) -> list[str]:
        return sorted(self._first)

    def observe(self, os: str, at: float, count: int, hold: float | None = None) -> None:
        """``count`` VMs of ``os`` were asked for at ``at`` (and held ``hold`` seconds, when
        known: a request from the history)."""
        vms, squares = self._batches.get(os, (0, 0))
        self._batches[os] = (vms + count, squares + count * count)
        if hold is not None:
            self._holds[os].append(hold)
        self._first.setdefault(os, at)
        self._first[os] = min(self._first[os], at)
        hours = self._hours[os]
        hour = int(at // HOUR)
        hours[hour] = hours.get(hour, 0) + count
        recent = self._recent[os]
        recent.append((at, count))
        if len(recent) > 1 and recent[-2][0] > at:
            recent.sort()

    def dispersion(self, os: str) -> float:
        """``E[count^2] / E[count]`` of the OS's requests: how much more the VMs asked for
        vary than a Poisson count of VMs (1: every request asks for one VM)."""
        vms, squares = self._batches.get(os, (0, 0))
        return max(1.0, squares / vms) if vms else 1.0

    def mean_hold(self, os: str) -> float | None:
        """The mean hold time of ``os``'s requests seen with one (None: none seen)."""
        holds = self._holds.get(os)
        return sum(holds) / len(holds) if holds else None

    def forget_before(self, at: float) -> None:
        for os, hours in self._hours.items():
            for hour in [h for h in hours if (h + 1) * HOUR <= at]:
                del hours[hour]
            if os in self._first and self._first[os] < at:
                self._first[os] = at

    def recent_per_hour(self, os: str, now: float) -> float:
        recent = self._recent.get(os)
        if not recent:
            return 0.0
        since = now - RECENT_SECONDS
        while recent and recent[0][0] < since - RECENT_SECONDS:  # long gone: not asked again
            recent.pop(0)
        total = sum(c for t, c in recent if since <= t <= now)
        return total * HOUR / RECENT_SECONDS

    def profile_per_hour(self, os: str, now: float, at: float) -> tuple[float | None, float, float]:
        """The profile's rate for the hour that holds ``at``, from what was seen before
        ``now``: (VMs per hour or None, its variance, days of profile behind it). The hour
        is compared with the same hour one, two, ... weeks before (days, until a week has
        been seen)."""
        first = self._first.get(os)
        if first is None:
            return None, 0.0, 0.0
        seen = now - first
        if seen < DAY:
            return None, 0.0, 0.0
        period = WEEK if seen >= WEEK else DAY
        periods = int(seen // period)
        hours = self._hours[os]
        totals = [float(hours.get(int((at - (k + 1) * period) // HOUR), 0)) for k in range(periods)]
        weights = [PROFILE_DECAY**k for k in range(periods)]  # the latest periods count most
        mean = sum(w * x for w, x in zip(weights, totals, strict=True)) / sum(weights)
        variance = sum(w * (x - mean) ** 2 for w, x in zip(weights, totals, strict=True)) / sum(weights)
        return mean, variance, seen / DAY


class LearnedSizing:
    """Targets per OS from a ``DemandModel``. ``margin`` is the safety margin (the knob)."""

    def __init__(self, margin: float = DEFAULT_MARGIN, interval: float = DEFAULT_INTERVAL) -> None:
        if margin < 0:
            raise ValueError("the safety margin is not negative")
        self.margin = margin
        self.interval = interval
        self.model = DemandModel()

    def forecast(self, os: str, now: float, create_seconds: float) -> Forecast:
        """One OS's target before bounds."""
        recent = self.model.recent_per_hour(os, now)
        horizon = create_seconds + self.interval
        best: tuple[float, float | None, float, float] = (recent, None, 0.0, 0.0)  # rate, profile, variance, weight
        steps = max(1, math.ceil(horizon / HOUR)) + 1
        for step in range(steps):
            at = now + min(horizon, step * HOUR)
            profile, variance, days = self.model.profile_per_hour(os, now, at)
            weight = days / (days + 1) if profile is not None else 0.0
            rate = weight * (profile or 0.0) + (1 - weight) * recent
            if step == 0 or rate > best[0]:
                best = (rate, profile, variance, weight)
        rate, profile, variance, weight = best
        expected = rate * create_seconds / HOUR  # VMs asked for within one create time
        spread = variance * (create_seconds / HOUR) ** 2 * weight
        noise = expected * self.model.dispersion(os)
        target = expected + self.margin * math.sqrt(noise + spread) if expected > 0 else 0.0
        return Forecast(
            os=os,
            target=math.ceil(target - 1e-9),
            rate_per_hour=rate,
            profile_per_hour=profile,
            recent_per_hour=recent,
            weight=weight,
            create_seconds=create_seconds,
            margin=self.margin,
        )

    def targets(
        self,
        now: float,
        create_seconds: Mapping[str, float],
        room: Mapping[str, int],
        maxima: Mapping[str, int],
        oses: Iterable[str] | None = None,
        slots: Mapping[str, int] | None = None,
        holds: Mapping[str, float] | None = None,
    ) -> dict[str, Forecast]:
        """Targets for every OS (those asked for, else every OS seen). ``maxima``: a
        ceiling per OS. ``room``: per OS, how many of its VMs would fit if the pools held
        nothing else (an OS without an entry is not bounded by room). When the OSes want
        more than fits together, each gets a share in proportion to its need: a target
        takes ``target / room`` of the hosts, and the shares add up to at most all of them.
        ``slots``: per OS, how many of its VMs the whole lab holds, empty; ``holds``: per
        OS, its mean hold in seconds where the model has seen none: with both, a busy lab
        (``BUSY_LOAD``) has no pools."""
        out: dict[str, Forecast] = {}
        for os in sorted(oses if oses is not None else self.model.oses):
            forecast = self.forecast(os, now, create_seconds.get(os, 60.0))
            target, capped = forecast.target, ""
            if os in maxima and target > maxima[os]:
                target, capped = maxima[os], "max"
            if os in room and room[os] <= 0 and target > 0:
                target, capped = 0, "room"
            out[os] = _with(forecast, target, capped)
        if slots is not None and self.load(out, slots, holds or {}) >= BUSY_LOAD:
            return {os: _with(f, 0, "busy") for os, f in out.items()}
        used = sum(f.target / room[os] for os, f in out.items() if os in room and room[os] > 0)
        if used > 1:
            for os, f in out.items():
                if os in room and room[os] > 0 and f.target:
                    out[os] = _with(f, math.floor(f.target / used), "share")
        return out

    def load(self, forecasts: Mapping[str, Forecast], slots: Mapping[str, int], holds: Mapping[str, float]) -> float:
        """The share of the lab the forecast demand keeps busy: per OS, ``rate x mean
        hold`` VMs over the VMs of that OS the lab holds, summed (an OS with no hold known
        counts nothing)."""
        load = 0.0
        for os, forecast in forecasts.items():
            hold = self.model.mean_hold(os) or holds.get(os)
            if hold and slots.get(os, 0) > 0:
                load += forecast.rate_per_hour * hold / HOUR / slots[os]
        return load


def _with(forecast: Forecast, target: int, capped: str) -> Forecast:
    return dataclasses.replace(forecast, target=target, capped_by=capped or forecast.capped_by)
