"""libvirt as a plugin: ``[libvirthostN]`` sections (``settings.py``) and the provider that
leases VMs from them (``provider.py``), watched by one inventory (``inventory.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from ..hosts import SectionReader
from ..provider import Provider, ProviderContext
from .inventory import Inventory
from .provider import LibvirtProvider
from .settings import IMAGE_SUFFIX, KNOWN_KEYS, OS_SUFFIXES, LibvirtHostSettings, parse_libvirt_host


class LibvirtPlugin:
    section_prefix = LibvirtHostSettings.section_prefix
    os_key_suffix = IMAGE_SUFFIX
    os_key_extras = OS_SUFFIXES
    known_keys = KNOWN_KEYS

    def parse(self, reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> LibvirtHostSettings:
        return parse_libvirt_host(reader, section, number, values)

    def make_provider(self, context: ProviderContext) -> Provider:
        return LibvirtProvider(Inventory(), context.settings, context.installation, context.monotonic)


PLUGIN = LibvirtPlugin()
