"""The demand learned sizing reads (``sizing.py``): per OS, the VMs asked for and when,
kept as an hour-of-week profile (an hour-of-day one until a week has been seen), in
5-minute bins for the hours that come in a burst, as a recent rate, and with each OS's
batch sizes and hold times. Pure: arrivals in, rates out; no database, clock or thread.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Mapping

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
RECENT_SECONDS = HOUR  # the recent rate's window
KEEP_SECONDS = 4 * WEEK  # arrivals older than this are forgotten
PROFILE_DECAY = 0.5  # each period further back counts half as much: a changed schedule is learned in days
HOLDS_KEPT = 1000  # hold times kept per OS (the latest) for the mean hold
BIN_SECONDS = 300.0  # the finer profile's bins, for an hour that comes in a burst
BURST_SCORE = 30.0  # a burst: its bins' chi-square (11 degrees of freedom) over this, p < 0.002 by chance


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
