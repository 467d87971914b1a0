"""``dynvm doctor``: log in to each configured host and check that what the config names is
there — the credentials, one template per OS key (no more: an ambiguous name is a
problem), the storage repository and the network. Read-only: it never changes a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import XenAPI

from ..config import HostSettings
from ..model import XenError
from .session import open_session


@dataclass(frozen=True)
class Check:
    what: str  # "login", "template centos", "storage", "network"
    ok: bool
    detail: str


@dataclass
class HostReport:
    host: HostSettings
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(what, ok, detail))


def template_matches(templates: dict[str, dict[str, Any]], name: str) -> tuple[list[str], bool]:
    """The templates an ``<os>.template`` name picks, and whether by exact name: every
    exact match, else every template whose name starts with it. Snapshots are not
    templates to clone (xapi marks them ``is_a_template`` too)."""
    usable = {ref: r for ref, r in templates.items() if not r.get("is_a_snapshot")}
    exact = sorted(r["name_label"] for r in usable.values() if r["name_label"] == name)
    if exact:
        return exact, True
    return sorted(r["name_label"] for r in usable.values() if r["name_label"].startswith(name)), False


def examine(host: HostSettings, timeout: float = 10.0) -> HostReport:
    report = HostReport(host)
    try:
        session, _ = open_session(host, timeout)
    except XenError as e:
        report.add("login", False, str(e))
        return report
    except XenAPI.Failure as e:
        details = list(e.details)
        if details[:1] == ["HOST_IS_SLAVE"]:
            report.add("login", False, f"{host.display} is a pool member; its master is {details[1]}")
        else:
            report.add("login", False, f"xapi refused the login: {' '.join(map(str, details))}")
        return report
    xapi = session.xenapi
    try:
        report.add("login", True, f"as {host.user}")
        templates = xapi.VM.get_all_records_where('field "is_a_template" = "true"')
        for os in sorted(host.templates):
            name = host.templates[os]
            found, exact = template_matches(templates, name)
            key = f"{os}.template"
            if not found:
                report.add(f"template {os}", False, f"no template named {name!r} (or starting with it): fix {key}")
            elif len(found) > 1:
                names = ", ".join(repr(n) for n in found)
                how = "named" if exact else "starting with"
                report.add(f"template {os}", False, f"{len(found)} templates {how} {name!r}: {names}; make {key} exact")
            else:
                report.add(f"template {os}", True, repr(found[0]) + ("" if exact else " (by prefix)"))
        srs = [r for r in xapi.SR.get_all_records().values() if r["name_label"] == host.storage_name]
        if not srs:
            report.add("storage", False, f"no storage repository named {host.storage_name!r}: fix host.storage.name")
        elif srs[0]["content_type"] == "iso":
            report.add("storage", False, f"{host.storage_name!r} holds ISO images, not disks: fix host.storage.name")
        else:
            free = int(srs[0]["physical_size"]) - int(srs[0]["physical_utilisation"])
            report.add("storage", True, f"{host.storage_name!r}, {free / 1024**3:,.0f} GiB free")
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
                "the management interface's" if management else "no management interface to attach VMs to",
            )
    except XenAPI.Failure as e:
        report.add("xapi", False, f"xapi error {' '.join(map(str, e.details))}")
    except OSError as e:
        report.add("xapi", False, f"stopped answering: {e}")
    finally:
        with contextlib.suppress(Exception):  # a host that just went away needs no logout
            xapi.session.logout()
    return report
