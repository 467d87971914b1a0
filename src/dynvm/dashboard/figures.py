"""The dashboard's figures, from what the service already keeps: VMs in use over time, how
long VMs take to come and to be made, who used most, and why requests failed.

Pure: rows in, JSON-ready dicts out (``routes.py`` reads the rows from the stores), so each
is tested on known input.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..engine.ready_stock import POOL_USER
from ..states import RequestState

# Histogram bin edges, seconds: fine where a warm handout lands, coarse where a create does.
EDGES = (0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800)
SPANS = {"24h": (24 * 3600.0, 300.0), "7d": (7 * 24 * 3600.0, 3600.0)}  # span -> (seconds, step)

Lifetime = tuple[str, str, float, float | None, float | None]  # user, os, created, lived, create seconds


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The value at rank ``round(fraction x (n - 1))`` of the sorted values (ties to even,
    as Python rounds), the rule ``/api/v1/stats`` and the benches use; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def in_use(lifetimes: Iterable[Lifetime], now: float, span: str) -> dict[str, Any]:
    """VMs in use per OS at each step of the span up to ``now``: a VM counts from its
    creation to its deletion (to now while alive). Idle ready-pool VMs are not in use."""
    seconds, step = SPANS[span]
    start = math.floor((now - seconds) / step) * step
    times = [start + step * (k + 1) for k in range(int(seconds // step))]
    times = [t for t in times if t < now] + [now]  # the last point is now: a VM made a moment ago shows
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for user, os, created, lived, _ in lifetimes:
        if user == POOL_USER:
            continue
        end = created + lived if lived is not None else math.inf
        if end < start:
            continue
        changes[os] += [(created, 1), (end, -1)]
    series = {}
    for os, events in sorted(changes.items()):
        events.sort()
        counts, level, n = [], 0, 0
        for t in times:  # a sweep: each event is passed once
            while n < len(events) and events[n][0] <= t:
                level += events[n][1]
                n += 1
            counts.append(level)
        series[os] = counts
    return {"span": span, "step": step, "times": times, "series": series}


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """How many values fall in each bin of ``EDGES`` (the last bin is open), with p50/p95."""
    counts = [0] * len(EDGES)
    for value in values:
        counts[max(0, bisect.bisect_right(EDGES, value) - 1)] += 1
    p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
    return {"n": len(values), "p50": p50, "p95": p95, "edges": list(EDGES), "counts": counts}


def timings(lifetimes: Iterable[Lifetime], requests: Iterable[Any], since: float) -> dict[str, Any]:
    """Per OS: the time to VM of requests served since ``since`` (asked to ready, queue wait
    and all), and the create time of VMs made since then."""
    ttv: dict[str, list[float]] = defaultdict(list)
    for record in requests:
        if record.state == "ready" and record.finished_at is not None and record.finished_at >= since:
            ttv[record.os].append(max(0.0, record.finished_at - record.created_at))
    create: dict[str, list[float]] = defaultdict(list)
    for _, os, created, _, seconds in lifetimes:
        if created >= since and seconds is not None:
            create[os].append(float(seconds))
    oses = sorted(set(ttv) | set(create))
    return {
        "edges": list(EDGES),
        "time_to_vm": {os: distribution(ttv.get(os, [])) for os in oses},
        "create": {os: distribution(create.get(os, [])) for os in oses},
    }


# What the page says for each reason (the engine's error kind, or a request's end state)
REASONS = {
    "NotEnoughCapacity": "not enough capacity",
    "QuotaExceeded": "over a quota",
    "UnknownOs": "unknown OS",
    "NameInUse": "name already in use",
    "BadRequest": "bad request",
    "Forbidden": "not allowed",
    "QueueTimedOut": "waited too long in the queue",
    RequestState.TIMED_OUT: "waited too long in the queue",
    "RequestCancelled": "cancelled",
    RequestState.CANCELLED: "cancelled",
    "CreateFailed": "VM could not be made",
    "ProvisionError": "VM could not be made",
    "HostUnreachable": "host unreachable",
    "ShuttingDown": "dynvm was stopping",
}


def reason_words(reason: str) -> str:
    """``REASONS``, else the CamelCase kind in lower-case words (``SomeError``: "some error")."""
    return REASONS.get(reason) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", reason).lower()


def refused(record: Any) -> bool:
    """Whether a request that ended without its VMs was refused (a 4xx: it could not, or
    no longer should, be served as asked: capacity, quota, name, OS, its wait ran out, its
    caller cancelled it) rather than failed while its VMs were made (a 5xx)."""
    if record.state in (RequestState.TIMED_OUT, RequestState.CANCELLED):
        return True
    return record.error_status is not None and 400 <= record.error_status < 500


def failures(requests: Iterable[Any], since: float) -> list[dict[str, Any]]:
    """Requests that ended without their VMs since ``since``, by reason (the engine's error
    kind, or the state: timed out, cancelled), most first, with the latest message. Each
    says its ``group`` ("refused" or "create_failed", ``refused``) and its ``label`` in words."""
    found: dict[str, dict[str, Any]] = {}
    for record in requests:
        if record.state == "ready" or record.finished_at is None or record.finished_at < since:
            continue
        reason = record.error_kind or record.state
        group = "refused" if refused(record) else "create_failed"
        entry = found.setdefault(
            f"{group}:{reason}",
            {
                "reason": reason,
                "label": reason_words(reason),
                "group": group,
                "count": 0,
                "last_at": 0.0,
                "last_error": "",
            },
        )
        entry["count"] += 1
        if record.finished_at >= entry["last_at"]:
            entry["last_at"] = record.finished_at
            entry["last_error"] = record.error or record.state
    return sorted(found.values(), key=lambda e: (-e["count"], e["reason"]))
