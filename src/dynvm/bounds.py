"""The bounds of a request for VMs, in one place: the legacy API, the v1 API and the CLI
all check what a caller asks against these, so the three never drift apart. They are
sanity bounds (a typo, a hostile client); the real limits are the config's ``[quota]``
and the hosts' room. The expiry cap, the config's ``vm.expiry.minutes``, is applied by
``capped_lifetime_minutes`` wherever a lifetime is set (a request, an extension).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings

GiB = 1024**3


@dataclass(frozen=True)
class Bound:
    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


COUNT = Bound(1, 1000)  # VMs per request ([quota] max.count.per.request is the real limit)
CPUS = Bound(1, 256)  # vCPUs per VM
MEMORY = Bound(GiB // 4, 4096 * GiB)  # bytes per VM
HOST_REF = Bound(1, 999_999)  # N of [xenhostN], up to six digits
HOST_REF_PATTERN = r"^[1-9][0-9]{0,5}$"
LIFETIME_MINUTES = Bound(0, 10**7)  # exclusive of 0; capped by vm.expiry.minutes
WAIT_MINUTES = Bound(0, 7 * 24 * 60)  # a week
NAME_PATTERN = r"^[A-Za-z0-9._-]{0,63}[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"  # 1 to 64, not only dots
NAME_MAX = 64
OS_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


def capped_lifetime_minutes(settings: Settings, asked: float | None) -> float:
    """The lifetime a lease gets: what was asked, at most ``[common] vm.expiry.minutes``
    (which is also the lifetime when nothing was asked)."""
    longest = settings.common.expiry_minutes
    return longest if asked is None else min(asked, longest)
