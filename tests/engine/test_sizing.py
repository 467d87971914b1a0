"""The learned sizing policy (``engine/sizing.py``) on known demand series, in virtual time."""

from __future__ import annotations

import math
import random

import pytest

from dynvm.engine.sizing import DAY, HOUR, LearnedSizing

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
    assert forecast.target == math.ceil(expected + math.sqrt(expected))


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
    assert single.target == math.ceil(expected + math.sqrt(expected))
    assert batched.target == math.ceil(expected + math.sqrt(4 * expected))
