"""A ``[xenhostN]`` section: a XenServer / XCP-ng host or pool, as the seed's file names it
(SPEC.md §2), and the settings it becomes."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..config import Secret
from ..hosts import HostSettings, SectionReader, templates_of

KNOWN_KEYS = frozenset(
    {
        "host.name",
        "host.user",
        "host.password",
        "host.storage.name",
        "host.network",
        "host.tls.verify",
        "host.tls.ca_file",
    }
)


@dataclass(frozen=True)
class XenHostSettings(HostSettings):
    """``templates``: OS key -> template name (or name prefix)."""

    section_prefix: ClassVar[str] = "xenhost"

    url: str
    user: str
    password: Secret
    storage_name: str
    network: str | None = None
    tls_verify: bool = True
    tls_ca_file: Path | None = None

    @property
    def display(self) -> str:
        """How logs and errors name the host: section and URL, never credentials."""
        return f"{self.section} ({self.url})"

    @property
    def address(self) -> str:
        return self.url

    @property
    def origin(self) -> str:
        return origin_of(self.url)

    @property
    def details(self) -> str:
        if not self.url.startswith("https"):
            tls = "no TLS"
        elif self.tls_ca_file:
            tls = f"TLS: CA {self.tls_ca_file}"
        else:
            tls = "TLS verified" if self.tls_verify else "TLS NOT verified"
        return f"user {self.user}, storage {self.storage_name}, {tls}"


def parse_xen_host(reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> XenHostSettings:
    def required(key: str) -> str:
        value = values.get(key, "").strip()
        if not value:
            raise reader.error(section, key, "is missing or empty")
        return value

    templates = templates_of(reader, section, values, ".template")
    password = values.get("host.password", "")
    if not password:
        raise reader.error(section, "host.password", "is missing or empty")
    verify = reader.boolean(section, values, "host.tls.verify", True)
    ca_file = None
    if values.get("host.tls.ca_file", "").strip():
        ca_file = Path(values["host.tls.ca_file"].strip()).expanduser()
        if not ca_file.is_absolute():
            ca_file = reader.path.parent / ca_file
        if not ca_file.is_file():
            raise reader.error(section, "host.tls.ca_file", f"{ca_file} does not exist")
    return XenHostSettings(
        number=number,
        templates=templates,
        url=host_url(reader, section, required("host.name")),
        user=required("host.user"),
        password=Secret(password),
        storage_name=required("host.storage.name"),
        network=values.get("host.network", "").strip() or None,
        tls_verify=verify,
        tls_ca_file=ca_file,
    )


def origin_of(url: str) -> str:
    """The host a VM came from, as the history names it: address[:port] of its xapi."""
    return urllib.parse.urlsplit(url).netloc


def host_url(reader: SectionReader, section: str, name: str) -> str:
    """A bare address means xapi's default, HTTPS on 443; a URL is taken as given.
    Errors quote the value without any ``user:password@`` written into it."""
    if "://" not in name:
        name = f"https://{name}"
    parsed = urllib.parse.urlsplit(name)
    shown = without_credentials(name)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise reader.error(section, "host.name", f"has a bad port: {shown!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise reader.error(section, "host.name", f"must be an address or an http(s) URL, not {shown!r}")
    if parsed.username or parsed.password:
        raise reader.error(section, "host.name", "must not hold credentials: use host.user and host.password")
    return name.rstrip("/")


def without_credentials(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://***@host``."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", url)
