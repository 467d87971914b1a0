"""Xen as a plugin: ``[xenhostN]`` sections (``settings.py``) and the provider that leases
VMs from them (``provider.py``), watched by one inventory mirror (``inventory.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from ..hosts import SectionReader
from ..provider import Provider, ProviderContext
from .inventory import Inventory
from .provider import XenProvider
from .settings import KNOWN_KEYS, XenHostSettings, parse_xen_host


class XenPlugin:
    section_prefix = XenHostSettings.section_prefix
    os_key_suffix = ".template"
    os_key_extras: tuple[str, ...] = ()
    known_keys = KNOWN_KEYS

    def parse(self, reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> XenHostSettings:
        return parse_xen_host(reader, section, number, values)

    def make_provider(self, context: ProviderContext) -> Provider:
        inventory = Inventory(event_timeout=context.event_timeout)
        return XenProvider(inventory, context.settings, context.installation, context.monotonic)


PLUGIN = XenPlugin()
