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
from collections import Counter, defaultdict, deque
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
BIN_SECONDS = 300.0  # the finer profile's bins, for an hour that comes in a burst
BURST_SCORE = 30.0  # a burst: its bins' chi-square (11 degrees of freedom) over this, p < 0.002 by chance
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


class DemandModel:
    """Arrivals per OS, kept as VMs asked for per clock hour, and the rates they imply at a
    given moment. Times are Unix seconds (or any seconds: ``dynvm replay`` uses the
    trace's own)."""

    def __init__(self) -> None:
        self._hours: dict[str, dict[int, int]] = defaultdict(dict)  # os -> hour index -> VMs
        self._first: dict[str, float] = {}
        self._recent: dict[str, list[tuple[float, int]]] = defaultdict(list)  # the last RECENT_SECONDS
        self._holds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=HOLDS_KEPT))
        self._bins: dict[str, dict[int, int]] = defaultdict(dict)  # os -> BIN_SECONDS index -> VMs
        self._counts: dict[str, Counter[int]] = defaultdict(Counter)  # os -> VMs a request asked for -> requests
        self._hour_counts: dict[str, dict[int, Counter[int]]] = defaultdict(dict)  # the same per clock hour

    @property
    def oses(self) -> list[str]:
        return sorted(self._first)

    def observe(self, os: str, at: float, count: int, hold: float | None = None) -> None:
        """``count`` VMs of ``os`` were asked for at ``at`` (and held ``hold`` seconds, when
        known: a request from the history)."""
        self._counts[os][count] += 1
        self._hour_counts[os].setdefault(int(at // HOUR), Counter())[count] += 1
        if hold is not None:
            self._holds[os].append(hold)
        self._first.setdefault(os, at)
        self._first[os] = min(self._first[os], at)
        hours = self._hours[os]
        hour = int(at // HOUR)
        hours[hour] = hours.get(hour, 0) + count
        bins = self._bins[os]
        slot = int(at // BIN_SECONDS)
        bins[slot] = bins.get(slot, 0) + count
        recent = self._recent[os]
        recent.append((at, count))
        if len(recent) > 1 and recent[-2][0] > at:
            recent.sort()

    def dispersion(self, os: str) -> float:
        """``E[count^2] / E[count]`` of the OS's requests: how much more the VMs asked for
        vary than a Poisson count of VMs (1: every request asks for one VM)."""
        counts = self._counts.get(os)
        vms = sum(c * n for c, n in counts.items()) if counts else 0
        return max(1.0, sum(c * c * n for c, n in counts.items()) / vms) if counts and vms else 1.0

    def batches(self, os: str, now: float | None = None, at: float | None = None) -> dict[int, float]:
        """The share of the OS's requests asking for each number of VMs (``{1: 1.0}``:
        none seen); with ``now`` and ``at``, of those in the hour that holds ``at`` in the
        periods before ``now`` (a nightly wave's batches are its own), weighted as the
        profile, when there were any."""
        counts: Mapping[int, float] | None = self._counts.get(os)
        periods = self._periods(os, now) if now is not None and at is not None else None
        if periods is not None and at is not None:
            period, weights = periods
            hours, mix = self._hour_counts[os], defaultdict[int, float](float)
            for k, w in enumerate(weights):
                for c, n in hours.get(int((at - (k + 1) * period) // HOUR), Counter()).items():
                    mix[c] += w * n
            counts = mix or counts
        if not counts:
            return {1: 1.0}
        total = sum(counts.values())
        return {c: n / total for c, n in sorted(counts.items())}

    def mean_hold(self, os: str) -> float | None:
        """The mean hold time of ``os``'s requests seen with one (None: none seen)."""
        holds = self._holds.get(os)
        return sum(holds) / len(holds) if holds else None

    def forget_before(self, at: float) -> None:
        for os, hours in self._hours.items():
            for hour in [h for h in hours if (h + 1) * HOUR <= at]:
                del hours[hour]
            counted = self._hour_counts[os]
            for hour in [h for h in counted if (h + 1) * HOUR <= at]:
                del counted[hour]
            bins = self._bins[os]
            for slot in [b for b in bins if (b + 1) * BIN_SECONDS <= at]:
                del bins[slot]
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
        periods = self._periods(os, now)
        if periods is None:
            return None, 0.0, 0.0
        period, weights = periods
        hours = self._hours[os]
        totals = [float(hours.get(int((at - (k + 1) * period) // HOUR), 0)) for k in range(len(weights))]
        mean = sum(w * x for w, x in zip(weights, totals, strict=True)) / sum(weights)
        variance = sum(w * (x - mean) ** 2 for w, x in zip(weights, totals, strict=True)) / sum(weights)
        return mean, variance, (now - self._first[os]) / DAY

    def _periods(self, os: str, now: float) -> tuple[float, list[float]] | None:
        """The profile's period (a week, or a day until a week has been seen) and the
        weights of the periods back from ``now``, the latest first (None: not a day seen)."""
        first = self._first.get(os)
        if first is None or now - first < DAY:
            return None
        period = WEEK if now - first >= WEEK else DAY
        return period, [PROFILE_DECAY**k for k in range(int((now - first) // period))]

    def burst_per_hour(self, os: str, now: float, start: float, end: float) -> float | None:
        """The profile's rate over ``[start, end)`` (VMs per hour) at the grain of its bins,
        when some of it lies in an hour that comes in a burst: an hour whose bins' squared
        distances from their mean, over Poisson-and-batch noise (``mean x dispersion``), add
        up to more than ``BURST_SCORE``. A bin of such an hour counts its own profile, any
        other its hour's average; None when no part of the window is in a burst (the hour's
        profile says it)."""
        if self._periods(os, now) is None or end <= start:
            return None
        vms, bursty = 0.0, False
        slot = int(start // BIN_SECONDS)
        while slot * BIN_SECONDS < end:
            hour = int(slot * BIN_SECONDS // HOUR)
            seen, mean, burst = self._hour_bins(os, now, hour)
            overlap = min(end, (slot + 1) * BIN_SECONDS) - max(start, slot * BIN_SECONDS)
            vms += (seen[slot - hour * len(seen)] if burst else mean) * overlap / BIN_SECONDS
            bursty = bursty or burst
            slot += 1
        return vms * HOUR / (end - start) if bursty else None

    def _hour_bins(self, os: str, now: float, hour: int) -> tuple[list[float], float, bool]:
        """The profile of hour ``hour``'s bins (VMs), their mean, and whether the hour comes
        in a burst (``burst_per_hour``)."""
        periods = self._periods(os, now)
        per_hour = round(HOUR / BIN_SECONDS)
        if periods is None:
            return [0.0] * per_hour, 0.0, False
        period, weights = periods
        bins, total, back = self._bins[os], sum(weights), round(period / BIN_SECONDS)
        seen = [
            sum(w * bins.get(hour * per_hour + i - (k + 1) * back, 0) for k, w in enumerate(weights)) / total
            for i in range(per_hour)
        ]
        mean = sum(seen) / per_hour
        score = sum((x - mean) ** 2 for x in seen) / (max(mean, 1.0) * self.dispersion(os))
        return seen, mean, score > BURST_SCORE

    def profile_at(self, os: str, now: float, at: float) -> tuple[float | None, float, float]:
        """As ``profile_per_hour``, the rate drawn as a line between the middles of the
        hours (a ramp rises through an hour, not at its start), but not toward an hour that
        comes in a burst (``burst_per_hour`` says that one)."""
        mean, variance, days = self.profile_per_hour(os, now, at)
        if mean is None:
            return mean, variance, days
        offset = (at % HOUR) / HOUR - 0.5  # -0.5 .. 0.5: where in the hour
        other = at + (HOUR if offset >= 0 else -HOUR)
        if self._hour_bins(os, now, int(other // HOUR))[2] or self._hour_bins(os, now, int(at // HOUR))[2]:
            return mean, variance, days
        neighbour, _, _ = self.profile_per_hour(os, now, other)
        return mean + abs(offset) * ((neighbour or 0.0) - mean), variance, days


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
