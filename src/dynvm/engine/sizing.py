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
4. **Known waves.** An hour whose demand comes in a burst (a nightly wave: hundreds of VMs
   within 20 minutes, then quiet) is averaged away by a profile per hour. So the profile is
   kept per ``BIN_SECONDS`` too, and an hour whose bins differ from their average by more
   than Poisson-and-batch noise explains (their chi-square passes ``BURST_SCORE``) is sized
   on its bins (``burst_per_hour``), with the batches of that hour: the pool fills one lead
   time before the burst and lets go once it is over. Every other hour keeps the per-hour
   profile (bins alone are too noisy), drawn as a line between the middles of the hours,
   so that a morning's ramp is followed through the hour, not at its start.
5. **Little's law.** A VM asked for while none is ready waits until one is made; to hide
   it, as many VMs must be ready as arrive within the lead time of a refill: one create
   time, plus up to one pools pass before the refill starts (``pass_seconds``). The rate
   is the highest in the window from now to one create time plus one sizing interval
   ahead, so the pool ramps up before a forecast peak, not in it.
6. **A safety margin**, the one knob: ``margin x sqrt(mean x dispersion + spread)`` VMs
   more, from the noise of arrivals and the profile's own variance. Requests come in
   batches (a request for 8 VMs is 8 at once), so the VMs asked for within a lead time
   vary more than a Poisson count of VMs would: by ``dispersion = E[count^2] / E[count]``
   of the OS's requests (1 when every request asks for one). ``margin=0`` keeps the mean.
7. **Batches whole** (``batch_target``). A request is warm only when the pool holds its
   whole batch; one that finds fewer takes them and waits for the rest. With the OS's
   batch sizes and the rate, the VMs taken within a lead time are a compound Poisson
   count, so each pool size serves a known share of requests whole. The pool is the size
   with the most requests an hour served whole less ``WARM_PER_IDLE_HOUR / margin`` for
   each VM it keeps (idle VM-hours are the price of warm requests): the idle hours go
   where they serve most requests, deep into the tail at a busy hour or in a wave, less
   at a quiet one, where a batch's VMs would wait long for it. The target is the larger
   of this and step 6.
8. **Bounds**: at most ``<os>.max`` (``[pools]``), at most what fits, and, when the OSes
   together want more than fits, each gets its share of the room in proportion to its need.
9. **A busy lab has no pools.** By Little's law the demand keeps ``rate x mean hold`` VMs
   busy (the rate of the hour, not of a burst within it); when that, all OSes together, is
   ``BUSY_LOAD`` or more of what the whole lab holds, requests will wait for room anyway,
   and a ready VM only takes room (and a create) a waiting request needs: every target is
   0 (``capped_by="busy"``) until the load falls.

Pure: arrivals and times in, targets out; no database, clock or thread of its own, so the
service (``ready_pools.py``) and ``dynvm replay`` (virtual time) drive the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .demand_model import BIN_SECONDS, HOUR, DemandModel

DEFAULT_MARGIN = 1.0
DEFAULT_INTERVAL = 300.0  # how long a target holds before it is computed again
BUSY_LOAD = 0.75  # the share of the lab the demand keeps busy from which the pools stand down
WARM_PER_IDLE_HOUR = 1.2  # at margin 1: a ready VM is kept while it makes this many requests an hour warm


@dataclass(frozen=True)
class Forecast:
    """One OS's target, and what made it (shown by ``GET /api/v1/pools`` and /metrics)."""

    os: str
    target: int
    rate_per_hour: float  # the blended hourly rate (VMs asked per hour) sized on, unless burst_per_hour says otherwise
    profile_per_hour: float | None  # the profile's rate for now (None: no profile yet)
    recent_per_hour: float
    weight: float  # the profile's share of the blend
    create_seconds: float
    margin: float
    capped_by: str = ""  # "", "max", "room", "share" or "busy": what bounded the target
    burst_per_hour: float | None = None  # in an hour that comes in a burst: the bins' rate sized on (else None)
    batch_target: int = 0  # the VMs that serve whole the batches worth their idle hours (step 7)


class LearnedSizing:
    """Targets per OS from a ``DemandModel``. ``margin`` is the safety margin (the knob);
    ``pass_seconds``: how long a VM taken from a pool may wait for the pass that refills it
    (the service's pools pass: a second)."""

    def __init__(
        self, margin: float = DEFAULT_MARGIN, interval: float = DEFAULT_INTERVAL, pass_seconds: float = 0.0
    ) -> None:
        if margin < 0:
            raise ValueError("the safety margin is not negative")
        self.margin = margin
        self.interval = interval
        self.pass_seconds = pass_seconds
        self.model = DemandModel()

    def forecast(self, os: str, now: float, create_seconds: float) -> Forecast:
        """One OS's target before bounds."""
        recent = self.model.recent_per_hour(os, now)
        horizon = create_seconds + self.interval
        lead = create_seconds + self.pass_seconds  # a VM taken is ready again this long after
        best: tuple[float, float | None, float, float] = (recent, None, 0.0, 0.0)  # rate, profile, variance, weight
        steps = max(1, math.ceil(horizon / HOUR)) + 1
        for step in range(steps):
            at = now + min(horizon, step * HOUR)
            profile, variance, days = self.model.profile_at(os, now, at)
            weight = days / (days + 1) if profile is not None else 0.0
            rate = weight * (profile or 0.0) + (1 - weight) * recent
            if step == 0 or rate > best[0]:
                best = (rate, profile, variance, weight)
        rate, profile, variance, weight = best
        burst, peak = self._burst(os, now, horizon, lead, recent)
        sized = rate if burst is None else burst  # the hour's rate, or its bins' in a burst
        expected = sized * lead / HOUR  # VMs asked for within one lead time
        spread = variance * (lead / HOUR) ** 2 * weight
        noise = expected * self.model.dispersion(os)
        target = expected + self.margin * math.sqrt(noise + spread) if expected > 0 else 0.0
        batches = self.model.batches(os, now, peak) if peak is not None else self.model.batches(os)
        batch = self._batch_target(sized, lead, batches)
        return Forecast(
            os=os,
            target=max(math.ceil(target - 1e-9), batch),
            rate_per_hour=rate,
            profile_per_hour=profile,
            recent_per_hour=recent,
            weight=weight,
            create_seconds=create_seconds,
            margin=self.margin,
            burst_per_hour=burst,
            batch_target=batch,
        )

    def _burst(
        self, os: str, now: float, horizon: float, lead: float, recent: float
    ) -> tuple[float | None, float | None]:
        """Step 4: when a burst (``DemandModel.burst_per_hour``) lies from now to
        ``horizon`` ahead, the highest blended rate over one lead time starting in that
        window, by the bins, and where its lead time starts; (None, None) when no burst is
        near."""
        rates = []
        starts = [now + k * BIN_SECONDS for k in range(math.ceil(horizon / BIN_SECONDS))] + [now + horizon]
        for at in starts:
            fine = self.model.burst_per_hour(os, now, at, at + lead)
            if fine is not None:
                _, _, days = self.model.profile_per_hour(os, now, at)
                weight = days / (days + 1)
                rates.append((weight * fine + (1 - weight) * recent, at))
        return max(rates) if rates else (None, None)

    def _batch_target(self, rate: float, lead: float, batches: Mapping[int, float]) -> int:
        """Step 7: the number of ready VMs that makes the most of its idle hours: the most
        requests an hour served whole less ``WARM_PER_IDLE_HOUR / margin`` for each VM kept.
        The VMs taken within a lead time are compound Poisson (the requests Poisson, each
        its batch); a request for ``c`` is warm when ``taken + c <= ready``."""
        requests = rate / sum(c * p for c, p in batches.items())  # requests an hour
        if requests <= 0 or self.margin <= 0:
            return 0
        worth = WARM_PER_IDLE_HOUR / self.margin
        below = [0.0]  # below[n + 1] = P(taken <= n)
        for p in _compound_poisson(requests * lead / HOUR, batches):
            below.append(below[-1] + p)
        best, value = 0, 0.0
        for ready in range(1, len(below) + max(batches)):
            warm = sum(p * below[min(len(below) - 1, ready - c + 1)] for c, p in batches.items() if ready >= c)
            if warm * requests - worth * ready > value:
                best, value = ready, warm * requests - worth * ready
        return best

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


def _compound_poisson(mean_requests: float, batches: Mapping[int, float], tail: float = 1e-6) -> list[float]:
    """P(n VMs asked for) for n = 0, 1, ..., when the requests are Poisson with this mean and
    each asks for ``c`` VMs with ``batches[c]`` (Panjer's recursion), until all but ``tail``
    of it is covered ([]: a mean too large for it, past what a pool is sized for)."""
    out = [math.exp(-mean_requests)]
    if out[0] <= 0.0:
        return []
    covered = out[0]
    top = max(batches)
    longest = math.ceil(top * (mean_requests + 10 * math.sqrt(mean_requests)) + 50)
    while covered < 1 - tail and len(out) < longest:
        n = len(out)
        p = mean_requests / n * sum(c * batches.get(c, 0.0) * out[n - c] for c in range(1, min(n, top) + 1))
        out.append(p)
        covered += p
    return out
