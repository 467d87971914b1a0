"""``dynvm doctor``: log in to each configured host and check that what the config names is
there — the credentials, one template per OS key (no more: an ambiguous name is a
problem), the storage repository and the network. Read-only: it never changes a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import XenAPI

from ..model import XenError
from .session import open_session
from .settings import XenHostSettings
from .templates import candidate_of, choose


@dataclass(frozen=True)
class Check:
    what: str  # "login", "template centos", "storage", "network"
    ok: bool
    detail: str


@dataclass
class HostReport:
    host: XenHostSettings
    checks: list[Check] = field(default_factory=list)
    pool_uuid: str = ""  # the pool it reached (several sections may name one pool)
    pool_name: str = ""  # its name_label, else its master's

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(what, ok, detail))


def _pool(xapi: Any, host: XenHostSettings, report: HostReport) -> None:
    """Say which hosts the pool has and which is its master (host.name may name any)."""
    records = xapi.host.get_all_records()
    [pool] = xapi.pool.get_all_records().values()
    master = pool["master"]
    report.pool_uuid = pool["uuid"]
    report.pool_name = pool["name_label"] or records.get(master, {}).get("name_label", "")
    if len(records) < 2:
        return
    names = [records[master]["name_label"], *sorted(r["name_label"] for ref, r in records.items() if ref != master)]
    report.add("pool", True, f"{len(records)} hosts, master {names[0]}; members {', '.join(names[1:])}")


def same_pools(reports: list[HostReport]) -> dict[str, list[HostReport]]:
    """Sections that reached one pool, by the first of them (in the configuration's order):
    dynvm counts such a pool once, under its first section."""
    first: dict[str, HostReport] = {}
    out: dict[str, list[HostReport]] = {}
    for report in reports:
        if not report.pool_uuid:
            continue
        head = first.setdefault(report.pool_uuid, report)
        if head is not report:
            out.setdefault(head.host.section, [head]).append(report)
    return out


def examine(host: XenHostSettings, timeout: float = 10.0) -> HostReport:
    report = HostReport(host)
    try:
        session, _ = open_session(host, timeout)
    except XenError as e:
        report.add("login", False, str(e))
        return report
    except XenAPI.Failure as e:
        report.add("login", False, f"xapi refused the login: {' '.join(map(str, e.details))}")
        return report
    xapi = session.xenapi
    try:
        report.add("login", True, f"as {host.user}")
        _pool(xapi, host, report)
        records = xapi.VM.get_all_records_where('field "is_a_template" = "true"')
        templates = [candidate_of(ref, r) for ref, r in records.items()]
        for os in sorted(host.templates):
            choice = choose(templates, host.templates[os])
            if choice.template is None:
                report.add(f"template {os}", False, f"{choice.problem}: fix {os}.template")
            else:
                report.add(
                    f"template {os}", True, repr(choice.template.name) + (" (by prefix)" if choice.by_prefix else "")
                )
        srs = sorted(
            (r for r in xapi.SR.get_all_records().values() if r["name_label"] == host.storage_name),
            key=lambda r: r["uuid"],  # the one provision takes
        )
        members = set(xapi.host.get_all())
        reach = [{xapi.PBD.get_host(pbd) for pbd in sr["PBDs"]} for sr in srs]
        local = len(srs) > 1 and len(srs) == len(members) and all(len(r) == 1 for r in reach)
        local = local and set().union(*reach) == members  # one local SR per member, named alike
        if len(srs) > 1 and not local:
            report.add("storage", False, f"{len(srs)} storage repositories are named {host.storage_name!r}: rename one")
        elif not srs:
            report.add("storage", False, f"no storage repository named {host.storage_name!r}: fix host.storage.name")
        elif srs[0]["content_type"] == "iso":
            report.add("storage", False, f"{host.storage_name!r} holds ISO images, not disks: fix host.storage.name")
        elif local:
            free = sum(int(sr["physical_size"]) - int(sr["physical_utilisation"]) for sr in srs)
            report.add(
                "storage",
                True,
                f"{host.storage_name!r} on each of the {len(srs)} members (local), "
                f"{free / 1024**3:,.0f} GiB free in all",
            )
        else:
            free = int(srs[0]["physical_size"]) - int(srs[0]["physical_utilisation"])
            reached = reach[0]
            if len(members) > 1 and not members <= reached:
                names = ", ".join(sorted(xapi.host.get_name_label(m) for m in members - reached))
                report.add(
                    "storage",
                    False,
                    f"{host.storage_name!r} is not reachable from every pool member ({names} lack it): "
                    "name a shared SR in host.storage.name, or give each member a local SR of that name",
                )
            else:
                shared = " (shared by the pool)" if len(members) > 1 else ""
                report.add("storage", True, f"{host.storage_name!r}{shared}, {free / 1024**3:,.0f} GiB free")
        if host.network:
            found_net = xapi.network.get_by_name_label(host.network)
            report.add(
                "network",
                bool(found_net),
                f"{host.network!r}" if found_net else f"no network named {host.network!r}: fix host.network",
            )
        else:
            management = xapi.PIF.get_all_records_where('field "management" = "true"')
            report.add(
                "network",
                bool(management),
                "the management interface's network (host.network not set)"
                if management
                else "no management interface to attach VMs to",
            )
    except XenAPI.Failure as e:
        report.add("xapi", False, f"xapi error {' '.join(map(str, e.details))}")
    except OSError as e:
        report.add("xapi", False, f"stopped answering: {e}")
    finally:
        with contextlib.suppress(Exception):  # a host that just went away needs no logout
            xapi.session.logout()
    return report
