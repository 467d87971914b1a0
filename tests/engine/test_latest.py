"""``engine/latest.py``: the latest values of a measure and their median, kept in order."""

from __future__ import annotations

import random
import statistics
from collections import deque

import pytest

from dynvm.engine.latest import Latest, median_of_sorted


def test_the_median_is_statistics_median_of_the_latest_values_and_the_union_of_all_windows() -> None:
    rng = random.Random(7)
    union: list[float] = []
    windows = {os: Latest(50, union) for os in ("centos", "windows", "debian")}
    kept = {os: deque[float](maxlen=50) for os in windows}
    for n in range(2000):
        os = rng.choice(list(windows))
        value = rng.choice([rng.uniform(20, 90), 65.0, float(n % 7)])  # ties, as create times have
        windows[os].append(value)
        kept[os].append(value)
        if n % 37 == 0:
            for name, window in windows.items():
                assert len(window) == len(kept[name])
                if kept[name]:
                    assert window.median() == statistics.median(kept[name])
            assert median_of_sorted(union) == statistics.median([v for k in kept.values() for v in k])
    assert len(union) == 150  # each window keeps its latest 50, and the union only those


def test_an_empty_window_has_no_median() -> None:
    with pytest.raises(ValueError, match="no median"):
        Latest(5).median()
