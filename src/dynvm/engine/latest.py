"""The latest values of a measure, and their median, kept in order as they come.

The queue's policy reads the median create time and hold of each OS, and of all OSes
together, at every pass that looks at timing (``QueuePolicy.timing``); sorting the
latest five hundred of each again at every read was a pass's share of its CPU on a
busy lab. Here each value is put in its place once, as it arrives, and taken out as it
leaves the window.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque


def median_of_sorted(values: list[float]) -> float:
    """The median of values already in order, as ``statistics.median`` gives it."""
    n = len(values)
    if n == 0:
        raise ValueError("no median of nothing")
    middle = n // 2
    return values[middle] if n % 2 else (values[middle - 1] + values[middle]) / 2


class Latest:
    """The latest ``keep`` values. ``union``: a list in order shared by several windows,
    which then holds every value any of them holds (the median over all OSes)."""

    def __init__(self, keep: int, union: list[float] | None = None) -> None:
        self._keep = keep
        self._arrived: deque[float] = deque()
        self._ordered: list[float] = []
        self._union = union

    def append(self, value: float) -> None:
        self._arrived.append(value)
        insort(self._ordered, value)
        if self._union is not None:
            insort(self._union, value)
        if len(self._arrived) > self._keep:
            gone = self._arrived.popleft()
            del self._ordered[bisect_left(self._ordered, gone)]
            if self._union is not None:
                del self._union[bisect_left(self._union, gone)]

    def __len__(self) -> int:
        return len(self._arrived)

    def median(self) -> float:
        return median_of_sorted(self._ordered)
