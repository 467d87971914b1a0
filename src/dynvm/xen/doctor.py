"""``dynvm doctor``: log in to each configured host and check that what the config names is
there — the credentials, one template per OS key (no more: an ambiguous name is a
problem), the storage repository and the network. Read-only: it never changes a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import XenAPI

from ..config import HostSettings
from ..model import XenError
from .session import open_session
from .templates import candidate_of, choose


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
        if len(srs) > 1:
            report.add("storage", False, f"{len(srs)} storage repositories are named {host.storage_name!r}: rename one")
        elif not srs:
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
