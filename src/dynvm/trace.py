"""Demand traces: what CI asked of a lab, one request per row, to replay or learn from.

A trace is a CSV file with the header ``arrival_s,user,os,count,hold_s``:

- ``arrival_s``: seconds from the trace's start at which the request arrived (ascending);
- ``user``: the name it asked under (getservers' ``<user>``);
- ``os``: its OS key;
- ``count``: how many VMs;
- ``hold_s``: how long the VMs were held once handed over, until released or expired.

``from_history`` builds one from dynvm's own history documents (``dynvm history export
--trace FILE``): the VMs of one request are those of one user that became ready within a
few seconds of each other; a request arrived its create time before it was ready.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = ("arrival_s", "user", "os", "count", "hold_s")
SAME_REQUEST_SECONDS = 5.0  # VMs of one user ready this close together came from one request


class TraceError(ValueError):
    """A trace file that is not one; the message names the line."""


@dataclass(frozen=True)
class Demand:
    """One request of a trace."""

    arrival_s: float
    user: str
    os: str
    count: int
    hold_s: float


def read_trace(path: Path) -> list[Demand]:
    """The rows of a trace file, validated; ``TraceError`` names the first bad line."""
    with path.open(newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            raise TraceError(f"{path}: line 1: the header must be {','.join(HEADER)}")
        out: list[Demand] = []
        for line, row in enumerate(rows, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            out.append(_demand(path, line, row, out[-1].arrival_s if out else 0.0))
    return out


def _demand(path: Path, line: int, row: list[str], previous: float) -> Demand:
    where = f"{path}: line {line}"
    if len(row) != len(HEADER):
        raise TraceError(f"{where}: {len(row)} fields, not {len(HEADER)} ({','.join(HEADER)})")
    raw_arrival, user, os, raw_count, raw_hold = (cell.strip() for cell in row)
    try:
        arrival, count, hold = float(raw_arrival), int(raw_count), float(raw_hold)
    except ValueError:
        raise TraceError(f"{where}: arrival_s and hold_s are seconds, count a whole number") from None
    if not all(math.isfinite(v) for v in (arrival, hold)) or arrival < 0 or hold < 0:
        raise TraceError(f"{where}: arrival_s and hold_s must be finite and not negative")
    if arrival < previous:
        raise TraceError(f"{where}: arrival_s goes back in time ({arrival:g} after {previous:g})")
    if count < 1:
        raise TraceError(f"{where}: count must be at least 1")
    if not user or not os:
        raise TraceError(f"{where}: user and os must not be empty")
    return Demand(arrival, user, os, count, hold)


def write_trace(path: Path, demands: Iterable[Demand]) -> int:
    """Write a trace file; the number of rows."""
    n = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for d in demands:
            writer.writerow((f"{d.arrival_s:.3f}", d.user, d.os, d.count, f"{d.hold_s:.3f}"))
            n += 1
    return n


def from_history(documents: Iterable[Mapping[str, Any]], now: float) -> list[Demand]:
    """A trace of the requests behind these history documents (one per VM), from the
    first one's arrival (``requests_in_history``)."""
    found = requests_in_history(documents, now)
    if not found:
        return []
    origin = found[0].arrival_s
    return [Demand(round(d.arrival_s - origin, 3), d.user, d.os, d.count, d.hold_s) for d in found]


def create_seconds(document: Mapping[str, Any]) -> float | None:
    """A history document's create time: to the millisecond where dynvm wrote it
    (``create_duration_ms``), else the seed's whole seconds; None if it has neither."""
    millis = document.get("create_duration_ms")
    if millis is not None:
        return float(millis) / 1000
    seconds = document.get("create_duration_secs")
    return None if seconds is None else float(seconds)


def requests_in_history(documents: Iterable[Mapping[str, Any]], now: float) -> list[Demand]:
    """The requests behind these history documents (one per VM), arrival in Unix seconds.
    A request arrived its create time before its VM was ready, or when a ready-pool VM was
    handed out to it; its VMs are held until deleted (until ``now`` for one still alive)."""
    vms: list[tuple[str, str, float, float]] = []  # user, os, arrival, hold
    for doc in documents:
        created = doc.get("created_time")
        if created is None or not doc.get("username") or not doc.get("os"):
            continue
        if doc.get("pooled") and doc.get("handout_time"):
            arrival = float(doc["handout_time"])  # made ahead of demand: it arrived when taken
        else:
            arrival = float(created) - (create_seconds(doc) or 0.0)
        deleted = doc.get("deleted_time")
        end = float(deleted) if deleted is not None else now
        start = max(arrival, float(created))
        vms.append((str(doc["username"]), str(doc["os"]), arrival, max(0.0, end - start)))
    vms.sort(key=lambda v: (v[0], v[1], v[2]))
    grouped: list[list[Any]] = []  # [arrival, user, os, count, hold]
    latest: dict[tuple[str, str], list[Any]] = {}
    for user, os, arrival, hold in vms:
        group = latest.get((user, os))
        if group is not None and arrival - group[0] <= SAME_REQUEST_SECONDS:
            group[3] += 1
            group[4] = max(group[4], hold)
            continue
        group = [arrival, user, os, 1, hold]
        latest[(user, os)] = group
        grouped.append(group)
    return sorted(
        (Demand(round(a, 3), u, o, c, round(h, 3)) for a, u, o, c, h in grouped), key=lambda d: (d.arrival_s, d.user)
    )
