"""The OS templates every simulated host carries, and what their guests report.

Names follow the ones in SPEC.md's example configuration; sizes follow the issue that
introduced the simulator (Linux: 4 vCPUs, 4 GiB, 35 GiB disk; Windows: 6 vCPUs, 6 GiB,
71 GiB). ``os_version`` maps are shaped like those real guest agents report (see
``../shared/xapi/real-records``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class OsTemplate:
    name_label: str
    vcpus: int
    memory: int
    disk: int
    os_version: dict[str, str]
    windows: bool = False
    base_template_name: str = ""
    keys: tuple[str, ...] = field(default=())  # the config's <os>.template keys that use it


def _linux(
    name_label: str, keys: tuple[str, ...], base: str, distro: str, version: str, pretty: str, uname: str
) -> OsTemplate:
    """A Linux template: 4 vCPUs, 4 GiB, a 35 GiB disk, and what its guest agent reports."""
    major, _, minor = version.partition(".")
    os_version = {"name": pretty, "distro": distro, "major": major, "minor": minor, "uname": uname}
    return OsTemplate(name_label, 4, 4 * GiB, 35 * GiB, os_version, base_template_name=base, keys=keys)


TEMPLATES: tuple[OsTemplate, ...] = (
    _linux(
        "tmpl-cnt7.7",
        ("centos", "centos7"),
        "CentOS 7",
        "centos",
        "7.7",
        "CentOS Linux release 7.7.1908 (Core)",
        "3.10.0-1062.el7.x86_64",
    ),
    _linux(
        "tmpl-cnt8.0",
        ("centos8",),
        "CentOS 8",
        "centos",
        "8.0",
        "CentOS Linux release 8.0.1905 (Core)",
        "4.18.0-80.el8.x86_64",
    ),
    _linux(
        "tmpl-oel8",
        ("oel8",),
        "Oracle Linux 8",
        "oracle",
        "8.2",
        "Oracle Linux Server release 8.2",
        "5.4.17-2011.1.2.el8uek.x86_64",
    ),
    _linux(
        "tmpl-deb10-too",
        ("debian10",),
        "Debian Buster 10",
        "debian",
        "10.0",
        "Debian GNU/Linux 10 (buster)",
        "4.19.0-6-amd64",
    ),
    _linux(
        "tmpl-ubu18-4cgb",
        ("ubuntu18",),
        "Ubuntu Bionic Beaver 18.04",
        "ubuntu",
        "18.04",
        "Ubuntu 18.04.4 LTS",
        "4.15.0-76-generic",
    ),
    _linux(
        "tmpl-suse15",
        ("suse15",),
        "SUSE Linux Enterprise Server 15 (64-bit)",
        "sles",
        "15.1",
        "SUSE Linux Enterprise Server 15 SP1",
        "4.12.14-197.29-default",
    ),
    OsTemplate(
        "tmpl-win16dc - PATCHED (1)",
        6,
        6 * GiB,
        71 * GiB,
        {
            "name": "Microsoft Windows Server 2016 Datacenter|C:\\Windows|\\Device\\Harddisk0\\Partition2",
            "distro": "windows",
            "major": "10",
            "minor": "0",
            "spmajor": "0",
            "spminor": "0",
            "build": "14393",
        },
        windows=True,
        base_template_name="Windows Server 2016 (64-bit)",
        keys=("windows",),
    ),
)


def template_for_key(key: str) -> OsTemplate:
    for template in TEMPLATES:
        if key in template.keys:
            return template
    raise KeyError(key)


def os_keys() -> list[str]:
    """The ``<os>.template`` keys written into a generated config, in a stable order."""
    return ["centos", "centos7", "centos8", "windows", "oel8", "debian10", "ubuntu18", "suse15"]


# A few of the templates a freshly installed XenServer 8 / XCP-ng 8 host carries (a real
# host has about a hundred; the names follow the real records' base_template_name values
# and the XenServer 6.2 dump in ../shared/xapi/real-records/fog-xenserver). They hold no
# disk, VIF or CD of their own, only a provision spec with sr="" (xe fills it in).
BUILTIN_TEMPLATES: tuple[tuple[str, int, int, bool], ...] = (  # name, vCPUs, memory, Windows
    ("CentOS 7", 1, 2 * GiB, False),
    ("CentOS 8", 1, 2 * GiB, False),
    ("CentOS Stream 9", 1, 2 * GiB, False),
    ("Debian Buster 10", 1, 2 * GiB, False),
    ("Debian Bullseye 11", 1, 2 * GiB, False),
    ("Debian Bookworm 12", 1, 2 * GiB, False),
    ("Oracle Linux 7", 1, 2 * GiB, False),
    ("Oracle Linux 8", 1, 2 * GiB, False),
    ("Red Hat Enterprise Linux 7", 1, 2 * GiB, False),
    ("Red Hat Enterprise Linux 8", 1, 2 * GiB, False),
    ("Rocky Linux 8", 1, 2 * GiB, False),
    ("SUSE Linux Enterprise Server 12 SP5 (64-bit)", 1, 2 * GiB, False),
    ("SUSE Linux Enterprise Server 15 (64-bit)", 1, 2 * GiB, False),
    ("Ubuntu Bionic Beaver 18.04", 1, 2 * GiB, False),
    ("Ubuntu Focal Fossa 20.04", 1, 2 * GiB, False),
    ("Ubuntu Jammy Jellyfish 22.04", 1, 2 * GiB, False),
    ("Windows 10 (64-bit)", 2, 4 * GiB, True),
    ("Windows 11", 2, 4 * GiB, True),
    ("Windows Server 2016 (64-bit)", 2, 4 * GiB, True),
    ("Windows Server 2019 (64-bit)", 2, 4 * GiB, True),
    ("Windows Server 2022 (64-bit)", 2, 4 * GiB, True),
    ("Other install media", 1, GiB, False),
)

# Snapshots of the CI templates that an administrator took before patching them: xapi
# lists them as templates (is_a_template and is_a_snapshot both true), and their names
# start with the template's, so a name prefix would pick them.
TEMPLATE_SNAPSHOTS: tuple[tuple[str, str], ...] = (
    ("tmpl-cnt7.7", "tmpl-cnt7.7 before patch"),
    ("tmpl-win16dc - PATCHED (1)", "tmpl-win16dc - PATCHED (1) before KB5005043"),
)
