"""The learned sizing policy (``engine/sizing.py``) on known demand series, in virtual time."""

from __future__ import annotations

import math
import random

import pytest

from dynvm.engine.demand_model import DAY, HOUR
from dynvm.engine.sizing import WARM_PER_IDLE_HOUR, LearnedSizing, _compound_poisson

MONDAY = 1_800_000_000.0 - (1_800_000_000.0 % (7 * DAY))  # a week boundary: hour-of-week 0


def steady(sizing: LearnedSizing, os: str, start: float, end: float, per_hour: float) -> None:
    """One VM asked for every 3600 / per_hour seconds from start to end."""
    step = HOUR / per_hour
    t = start
    while t < end:
        sizing.model.observe(os, t, 1)
        t += step


def test_a_new_os_is_sized_on_its_recent_rate_alone():
    sizing = LearnedSizing(margin=1.0)
    assert sizing.forecast("centos", MONDAY, 65).target == 0  # nothing seen, nothing kept
    steady(sizing, "centos", MONDAY, MONDAY + HOUR, per_hour=60)
    forecast = sizing.forecast("centos", MONDAY + HOUR, create_seconds=65)
    assert forecast.weight == 0  # no profile yet
    assert forecast.recent_per_hour == pytest.approx(60, rel=0.02)
    expected = 60 * 65 / HOUR  # Little's law: VMs asked for within one create time
    assert forecast.target >= math.ceil(expected + math.sqrt(expected))  # step 6: the mean and the margin
    assert forecast.target == max(math.ceil(expected + math.sqrt(expected)), forecast.batch_target)


def test_a_step_in_demand_shows_at_once_and_is_learned_as_the_days_pass():
    sizing = LearnedSizing(margin=1.0)
    steady(sizing, "centos", MONDAY, MONDAY + 2 * DAY, per_hour=10)
    before = sizing.forecast("centos", MONDAY + 2 * DAY, create_seconds=600).target
    steady(sizing, "centos", MONDAY + 2 * DAY, MONDAY + 2 * DAY + HOUR, per_hour=120)
    after = sizing.forecast("centos", MONDAY + 2 * DAY + HOUR, create_seconds=600)
    assert after.target > before  # the recent rate shows through the blend at once
    assert 10 < after.rate_per_hour < 120  # ... tempered by two days of profile
    steady(sizing, "centos", MONDAY + 2 * DAY + HOUR, MONDAY + 5 * DAY, per_hour=120)
    settled = sizing.forecast("centos", MONDAY + 5 * DAY, create_seconds=600)
    assert settled.rate_per_hour == pytest.approx(120, rel=0.1)  # the new level, learned in days


def test_a_daily_wave_is_learned_within_days_and_the_pool_ramps_up_before_the_peak():
    sizing = LearnedSizing(margin=1.0, interval=300)
    for day in range(3):  # 09:00-17:00, 120 VMs an hour; nothing at night
        start = MONDAY + day * DAY + 9 * HOUR
        steady(sizing, "centos", start, start + 8 * HOUR, per_hour=120)
    day4 = MONDAY + 3 * DAY
    early = sizing.forecast("centos", day4 + 8 * HOUR + 50 * 60, create_seconds=600)  # 08:50, nobody asks yet
    assert early.recent_per_hour == 0
    assert early.target >= math.ceil(0.7 * 120 * 600 / HOUR)  # ready before the 09:00 rise, by one create time
    night = sizing.forecast("centos", day4 + 20 * HOUR, create_seconds=600)
    assert night.target == 0  # and it shrinks when demand falls
    too_early = sizing.forecast("centos", day4 + 6 * HOUR, create_seconds=600)
    assert too_early.target == 0  # not hours ahead: one create time and one interval


def test_noise_keeps_the_target_near_littles_law_and_the_margin_buys_head_room():
    rng = random.Random(7)
    plain, careful = LearnedSizing(margin=0.0), LearnedSizing(margin=2.0)
    t = MONDAY
    while t < MONDAY + 9 * DAY:  # Poisson arrivals, 60 an hour
        t += rng.expovariate(60 / HOUR)
        for sizing in (plain, careful):
            sizing.model.observe("centos", t, 1)
    expected = 60 * 300 / HOUR  # 5 VMs within a 300 s create
    low = plain.forecast("centos", t, create_seconds=300)
    high = careful.forecast("centos", t, create_seconds=300)
    assert abs(low.rate_per_hour - 60) < 20  # noisy, but near the true rate
    assert math.ceil(0.6 * expected) <= low.target <= math.ceil(1.4 * expected)
    assert high.target >= low.target + 2 * math.sqrt(0.6 * expected) - 1  # head room for the noise


def test_targets_are_bounded_by_the_maximum_the_room_and_a_fair_share():
    sizing = LearnedSizing(margin=0.0)
    steady(sizing, "centos", MONDAY, MONDAY + HOUR, per_hour=360)  # 6 an hour per minute of create
    steady(sizing, "windows", MONDAY, MONDAY + HOUR, per_hour=120)
    now = MONDAY + HOUR
    free = sizing.targets(now, {"centos": 600, "windows": 600}, room={}, maxima={})
    assert (free["centos"].target, free["windows"].target) == (60, 20)
    capped = sizing.targets(now, {"centos": 600, "windows": 600}, room={}, maxima={"centos": 8})
    assert (capped["centos"].target, capped["centos"].capped_by) == (8, "max")
    shared = sizing.targets(now, {"centos": 600, "windows": 600}, room={"centos": 40, "windows": 40}, maxima={})
    assert shared["centos"].target + shared["windows"].target <= 40
    assert shared["centos"].target == 30  # 60 of 80 wanted: three quarters of the room
    assert shared["windows"].target == 10
    assert {f.capped_by for f in shared.values()} == {"share"}


def test_a_lab_its_demand_keeps_busy_has_no_pools_until_the_load_falls():
    # 60 VMs an hour held 30 minutes each keep 30 VMs busy (Little's law)
    sizing = LearnedSizing(margin=1.0)
    t = MONDAY
    while t < MONDAY + HOUR:
        sizing.model.observe("centos", t, 1, hold=1800.0)
        t += 60
    now = MONDAY + HOUR
    roomy = sizing.targets(now, {"centos": 65}, room={"centos": 100}, maxima={}, slots={"centos": 100})
    assert roomy["centos"].target > 0  # 30 of 100 busy: the pool hides the create
    busy = sizing.targets(now, {"centos": 65}, room={"centos": 10}, maxima={}, slots={"centos": 36})
    assert sizing.load(busy, {"centos": 36}, {}) == pytest.approx(30 / 36, rel=0.05)
    assert (busy["centos"].target, busy["centos"].capped_by) == (0, "busy")  # requests will wait anyway
    # with no hold seen in the history, the ended leases' hold counts
    fresh = LearnedSizing(margin=1.0)
    steady(fresh, "centos", MONDAY, MONDAY + HOUR, per_hour=60)
    unknown = fresh.targets(now, {"centos": 65}, room={"centos": 10}, maxima={}, slots={"centos": 36})
    assert unknown["centos"].capped_by == ""  # no hold known: no load to judge by
    known = fresh.targets(
        now, {"centos": 65}, room={"centos": 10}, maxima={}, slots={"centos": 36}, holds={"centos": 1800}
    )
    assert known["centos"].target == 0


def test_batches_widen_the_margin_by_their_dispersion():
    ones, batches = LearnedSizing(margin=1.0), LearnedSizing(margin=1.0)
    t = MONDAY
    while t < MONDAY + HOUR:  # 60 VMs an hour either way: one at a time, or four at once
        ones.model.observe("centos", t, 1)
        if round((t - MONDAY) / 60) % 4 == 0:
            batches.model.observe("centos", t, 4)
        t += 60
    now = MONDAY + HOUR
    single, batched = ones.forecast("centos", now, 65), batches.forecast("centos", now, 65)
    assert batches.model.dispersion("centos") == 4.0  # E[c^2] / E[c] = 16 / 4
    assert ones.model.dispersion("centos") == 1.0
    expected = 60 * 65 / HOUR
    assert math.ceil(expected + math.sqrt(expected)) <= single.target
    assert math.ceil(expected + math.sqrt(4 * expected)) <= batched.target
    assert batched.batch_target >= 4  # a batch of 4 is served whole only from 4 ready


def test_batches_are_kept_whole_where_a_ready_vm_serves_enough_requests_for_its_idle_hour():
    """Step 7 with numbers: 60 requests an hour, 70 % for one VM and 30 % for four, a lead of
    60 s. The VMs taken within a lead are compound Poisson (one request expected); a
    request is warm when the pool still holds its whole batch."""
    sizing = LearnedSizing(margin=1.0)
    t = MONDAY
    n = 0
    while t < MONDAY + HOUR:
        sizing.model.observe("centos", t, 4 if n % 10 < 3 else 1)
        t += 60
        n += 1
    taken = _compound_poisson(1.0, {1: 0.7, 4: 0.3})
    assert taken[0] == pytest.approx(math.exp(-1))  # no request within the lead
    assert taken[1] == pytest.approx(math.exp(-1) * 0.7)  # one, for one VM
    assert taken[4] == pytest.approx(math.exp(-1) * (0.3 + 0.7**4 / 24))  # one for four, or four for one
    assert sum(taken) == pytest.approx(1.0, abs=1e-5)
    forecast = sizing.forecast("centos", MONDAY + HOUR, create_seconds=60)
    assert forecast.rate_per_hour == pytest.approx(60 * 1.9, rel=0.02)  # VMs: 1.9 a request
    below = [sum(taken[: n + 1]) for n in range(len(taken))]

    def warm(ready: int) -> float:
        return sum(p * below[min(ready - c, len(below) - 1)] for c, p in ((1, 0.7), (4, 0.3)) if ready >= c)

    # the size with the most requests served warm an hour, less WARM_PER_IDLE_HOUR a VM kept
    best = max(range(30), key=lambda r: warm(r) * 60 - WARM_PER_IDLE_HOUR * r)
    assert forecast.batch_target == best
    assert warm(best) > 0.9  # deep in the tail: 60 requests an hour make a ready VM worth it
    assert forecast.target == max(forecast.batch_target, math.ceil(1.9 + math.sqrt(1.9 * (0.7 + 4.8) / 1.9)))
    # a quiet OS (2 requests an hour) keeps far fewer: a VM there waits long for its batch
    quiet = LearnedSizing(margin=1.0)
    for k in range(2):
        quiet.model.observe("centos", MONDAY + k * 1800, 4 if k else 1)
    assert quiet.forecast("centos", MONDAY + HOUR, create_seconds=60).batch_target < best
    # a larger margin keeps more (a VM is worth keeping for fewer requests)
    careful = LearnedSizing(margin=3.0)
    careful.model = sizing.model
    assert careful.forecast("centos", MONDAY + HOUR, create_seconds=60).batch_target > best


def test_a_pass_between_refills_lengthens_the_lead_little_s_law_hides():
    sizing, passing = LearnedSizing(margin=0.0), LearnedSizing(margin=0.0, pass_seconds=60)
    for s in (sizing, passing):
        steady(s, "centos", MONDAY, MONDAY + HOUR, per_hour=360)
    assert sizing.forecast("centos", MONDAY + HOUR, 60).target == 6  # 6 a minute, one create time
    assert passing.forecast("centos", MONDAY + HOUR, 60).target == 12  # and as many while the pass comes


def test_a_known_wave_is_prefilled_one_lead_time_before_and_let_go_after():
    """Two weeks of a quiet night (12 VMs an hour) but for a wave on Monday 01:00-01:20:
    120 requests for 2 VMs within 20 minutes. The hour's profile averages it to 252 VMs an
    hour; its bins know that 240 come in the first 20 minutes (720 an hour)."""
    sizing = LearnedSizing(margin=1.0, interval=60)
    for week in range(2):
        start = MONDAY + week * 7 * DAY
        steady(sizing, "centos", start, start + 7 * DAY, per_hour=12)
        for k in range(120):
            sizing.model.observe("centos", start + HOUR + k * 10, 2)
    monday = MONDAY + 2 * 7 * DAY
    quiet = sizing.forecast("centos", monday + 0.5 * HOUR, create_seconds=65)
    assert quiet.burst_per_hour is None  # the night's hours keep their profile
    before = sizing.forecast("centos", monday + HOUR - 100, create_seconds=65)  # 00:58:20: the wave is one lead ahead
    wave = 720 + 12  # the wave's own rate, not the hour's, blended with the recent rate as the profile is
    assert before.burst_per_hour == pytest.approx(before.weight * wave + (1 - before.weight) * 12, rel=0.02)
    assert before.rate_per_hour < 300  # the hour's (what the busy lab check and the headroom read)
    # its batches are the wave's: 2 VMs each, 24.4 expected within the 65 s create
    assert sizing.model.batches("centos", monday, monday + HOUR) == pytest.approx({1: 12 / 132, 2: 120 / 132})
    assert before.target >= 24.4 + 2  # the first lead time's requests, served whole
    assert before.target > 3 * sizing.forecast("centos", monday + 0.5 * HOUR, create_seconds=65).target
    early = sizing.forecast("centos", monday + HOUR - 600, create_seconds=65)  # 00:50: not yet
    assert early.target == quiet.target
    after = sizing.forecast("centos", monday + HOUR + 25 * 60, create_seconds=65)  # 01:25: the wave is over
    assert after.burst_per_hour is not None
    assert after.burst_per_hour < 50
    assert after.target < before.target / 3  # let go, though the hour's profile is still 252 an hour


def test_the_profile_follows_a_ramp_through_the_hour():
    sizing = LearnedSizing(margin=0.0)
    for day in range(3):  # nothing until 08:00, then 120 an hour
        start = MONDAY + day * DAY + 8 * HOUR
        steady(sizing, "centos", start, start + 8 * HOUR, per_hour=120)
    day4 = MONDAY + 3 * DAY
    profile = [sizing.model.profile_at("centos", day4, day4 + h * HOUR)[0] for h in (7.5, 7.75, 8.0, 8.5)]
    assert profile == pytest.approx([0, 30, 60, 120])  # a line between the hours' middles
