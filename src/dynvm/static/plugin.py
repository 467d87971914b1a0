"""Static machines as a plugin: ``[staticN]`` sections (``settings.py``) and the provider
that hands them out (``provider.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from ..hosts import SectionReader
from ..model import DynvmError
from ..provider import Provider, ProviderContext
from ..store.holds import HoldStore
from .provider import StaticProvider
from .settings import KNOWN_KEYS, MACHINES_SUFFIX, StaticHostSettings, parse_static_host


class StaticPlugin:
    section_prefix = StaticHostSettings.section_prefix
    os_key_suffix = MACHINES_SUFFIX
    os_key_extras: tuple[str, ...] = ()
    known_keys = KNOWN_KEYS

    def parse(self, reader: SectionReader, section: str, number: int, values: Mapping[str, str]) -> StaticHostSettings:
        return parse_static_host(reader, section, number, values)

    def make_provider(self, context: ProviderContext) -> Provider:
        if context.database is None:
            raise DynvmError("[staticN] hosts keep which machine a lease holds in dynvm's database: none was given")
        return StaticProvider(HoldStore(context.database), context.settings, context.clock, context.monotonic)


PLUGIN = StaticPlugin()
