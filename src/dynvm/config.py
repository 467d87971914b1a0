"""``.dynvmservice.ini`` -> typed ``Settings``, validated with messages that name the file,
section and key; and ``ConfigWatcher``, which reloads it when it changes.

Users bring the file their existing service used (SPEC.md §2) and it loads as is. Keys
dynvm adds are listed in docs/CONFIGURATION.md. Passwords are kept in ``Secret``,
which never shows its value in a repr, a log line or an error.
"""

from __future__ import annotations

import configparser
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import hosts
from .hosts import HostSettings

log = logging.getLogger(__name__)

DEFAULT_EXPIRY_MINUTES = 720.0
DEFAULT_NETWORK_TIMEOUT_SECS = 400.0
OS_KEY = hosts.OS_KEY
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
KNOWN_COMMON_KEYS = {
    "vm.expiry.minutes",
    "vm.network.timeout.secs",
    "cpu.overcommit",
    "db.url",
    "orphan.quarantine.hours",
    "queue.wait.minutes",
}
DEFAULT_QUARANTINE_HOURS = 24.0
KNOWN_AUTH_KEYS = {"required"}
KNOWN_PROBE_KEYS = {"enabled", "port"}  # and <os>.port
KNOWN_POOL_KEYS = {"ready.ttl.minutes", "refill.per.host", "sizing", "sizing.margin"}  # and <os>.ready, <os>.max
DEFAULT_POOL_MAX = 10  # learned sizing's ceiling per OS without an <os>.max line, at least...
DEFAULT_POOL_MAX_SHARE = 0.25  # ...and this share of the VMs of that OS the whole lab holds
DEFAULT_READY_TTL_MINUTES = 120.0
DEFAULT_PROBE_PORT = 22  # sshd
DEFAULT_WINDOWS_PROBE_PORT = 5985  # WinRM over HTTP
KNOWN_QUOTA_KEYS = {"max.count.per.request", "vms.per.user", "memory.gib.per.user"}
KNOWN_COUCHBASE_KEYS = {"couchbase.server", "couchbase.bucket", "couchbase.username", "couchbase.userpassword"}
# Every section dynvm reads besides the hosts' ([<kind prefix>N]): its keys, and the suffixes
# of the per-OS keys it takes (<os><suffix>=). The sample config and the docs are checked
# against this table.
SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "common": frozenset(KNOWN_COMMON_KEYS),
    "auth": frozenset(KNOWN_AUTH_KEYS),
    "quota": frozenset(KNOWN_QUOTA_KEYS),
    "probe": frozenset(KNOWN_PROBE_KEYS),
    "pools": frozenset(KNOWN_POOL_KEYS),
    "couchbase": frozenset(KNOWN_COUCHBASE_KEYS),
}
SECTION_OS_SUFFIXES: Mapping[str, tuple[str, ...]] = {"probe": (".port",), "pools": (".ready", ".max")}


class ConfigError(Exception):
    """An invalid configuration; the message says where and what, never a password."""


@dataclass(frozen=True)
class Secret:
    """A password. Its repr and str hide it; ``reveal()`` is the one way to read it."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class CommonSettings:
    expiry_minutes: float = DEFAULT_EXPIRY_MINUTES
    network_timeout_secs: float = DEFAULT_NETWORK_TIMEOUT_SECS
    cpu_overcommit: float = 1.0
    db_url: str | None = None
    # how long a VM of this installation that its database does not know is kept halted
    # before it is destroyed (0: destroyed at once)
    quarantine_hours: float = DEFAULT_QUARANTINE_HOURS
    # how long a request that does not fit waits in the queue when its caller says nothing
    # (0: refused at once with 429, the seed's behaviour)
    queue_wait_minutes: float = 0.0


@dataclass(frozen=True)
class CouchbaseSettings:
    server: str = ""
    bucket: str = ""
    username: str = ""
    password: Secret = Secret("")

    @property
    def enabled(self) -> bool:
        return bool(self.server and self.bucket)


@dataclass(frozen=True)
class AuthSettings:
    required: bool = False  # True: every route but /healthz needs "Authorization: Bearer <token>"


@dataclass(frozen=True)
class QuotaSettings:
    max_count_per_request: int = 50
    vms_per_user: int = 0  # 0: no limit
    memory_per_user: int = 0  # bytes; 0: no limit


def windows_os(os: str) -> bool:
    """Whether VMs of this OS key run Windows: a key that starts with "win" (the one rule;
    it picks the probe's default port, and lets create take an address before the guest
    agent reports an OS name)."""
    return os.startswith("win")


@dataclass(frozen=True)
class ProbeSettings:
    """When a VM counts as ready: a TCP connection to this port of its address succeeds
    (within ``vm.network.timeout.secs``), not merely xapi reporting the address."""

    enabled: bool = True
    port: int = DEFAULT_PROBE_PORT  # for OS keys without a port of their own
    ports: Mapping[str, int] = field(default_factory=dict)  # <os>.port lines; 0 turns it off for that OS

    def port_for(self, os: str) -> int | None:
        """The port to probe on a VM of ``os``; None: no probe. Windows OS keys (those
        that start with "win") default to WinRM's port."""
        if not self.enabled:
            return None
        port = self.ports.get(os)
        if port is None:
            port = DEFAULT_WINDOWS_PROBE_PORT if windows_os(os) else self.port
        return port or None


@dataclass(frozen=True)
class ReadyPoolSettings:
    """Ready pools: per OS key, how many VMs to keep booted and ready ahead of demand."""

    targets: Mapping[str, int] = field(default_factory=dict)  # <os>.ready (with learned sizing: a floor)
    ready_ttl_minutes: float = DEFAULT_READY_TTL_MINUTES  # an unused ready VM is made afresh after this
    refill_per_host: int = 2  # ready-pool VMs being made at once on one host, at most
    sizing: str = "fixed"  # "fixed": the <os>.ready targets; "learned": from the history (engine/sizing.py)
    margin: float = 1.0  # learned sizing's safety margin (sizing.margin)
    maxima: Mapping[str, int] = field(default_factory=dict)  # <os>.max: learned sizing's ceiling per OS

    def target(self, os: str) -> int:
        return self.targets.get(os, 0)

    def keeps(self, os: str) -> bool:
        """Whether ``os`` may have ready VMs: a target, or learned sizing (which may give
        any OS a pool). A request for another OS never reads the pools (a pool taken out
        of the configuration keeps its VMs only until the next pass recycles them)."""
        return self.sizing == "learned" or self.targets.get(os, 0) > 0

    def maximum(self, os: str, slots: int = 0) -> int:
        """Learned sizing's ceiling for ``os``: its ``<os>.max``, else ``DEFAULT_POOL_MAX`` or a
        quarter of the ``slots`` the lab holds of it, whichever is more (a fixed ceiling
        that suits four hosts caps a nightly wave on a hundred)."""
        if os in self.maxima:
            return self.maxima[os]
        return max(DEFAULT_POOL_MAX, math.ceil(DEFAULT_POOL_MAX_SHARE * slots))


@dataclass(frozen=True)
class Settings:
    source: Path
    common: CommonSettings = CommonSettings()
    couchbase: CouchbaseSettings = CouchbaseSettings()
    auth: AuthSettings = AuthSettings()
    quota: QuotaSettings = QuotaSettings()
    probe: ProbeSettings = ProbeSettings()
    ready_pools: ReadyPoolSettings = ReadyPoolSettings()  # [pools]: VMs kept ready ahead of demand
    hosts: tuple[HostSettings, ...] = ()
    warnings: tuple[str, ...] = ()

    def host(self, ref: str) -> HostSettings | None:
        return self._hosts_by_ref.get(ref)

    @cached_property
    def _hosts_by_ref(self) -> dict[str, HostSettings]:
        """The hosts by ref, the first section of a ref winning: ``host`` is asked for every
        lease a pass or a placement looks at, on labs of hundreds of hosts."""
        out: dict[str, HostSettings] = {}
        for host in self.hosts:
            out.setdefault(host.ref, host)
        return out

    @property
    def os_keys(self) -> list[str]:
        return sorted({key for host in self.hosts for key in host.templates})


# -- locating and loading ------------------------------------------------------------------


def locate_config(
    explicit: Path | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    cwd: Path | None = None,
) -> Path:
    """``--config PATH``, else ``$DYNVM_CONFIG``, else ``~/.dynvmservice.ini``, else
    ``./.dynvmservice.ini``. An explicit path is returned even if missing, so that the
    error names it."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return explicit.expanduser()
    if environ.get("DYNVM_CONFIG"):
        return Path(environ["DYNVM_CONFIG"]).expanduser()
    candidates = [(home or Path.home()) / ".dynvmservice.ini", (cwd or Path.cwd()) / ".dynvmservice.ini"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no configuration found: give --config PATH, set DYNVM_CONFIG, or create "
        + " or ".join(str(c) for c in candidates)
    )


def load_settings(path: Path) -> Settings:
    """Read and validate the file; raises ``ConfigError`` naming file, section and key."""
    parser = configparser.ConfigParser(
        interpolation=None,  # passwords may hold '%'
        inline_comment_prefixes=(";",),  # "720 ; default and maximum lifetime"; '#' may be in a password
        strict=True,
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: not a valid ini file: {_without_values(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _Reader(path, parser).settings()


def _without_values(error: configparser.Error) -> str:
    """What is wrong and on which line, but never the line's text (it may hold a password)."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: a key before any [section] header"
    if isinstance(error, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in error.errors)
        return f"line {lines}: not a 'key=value', a '[section]' or a comment"
    if isinstance(error, configparser.DuplicateOptionError):
        return f"line {error.lineno}: [{error.section}] {error.option} is given twice"
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: [{error.section}] is given twice"
    text = str(error).splitlines()[0]
    return re.sub(r"\[line\s+(\d+)\]:.*", r"line \1", text)


class _Reader:
    """Reads one file; given to each kind of host to read its sections (``hosts.SectionReader``)."""

    def __init__(self, path: Path, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser
        self.warnings: list[str] = []

    def error(self, section: str, key: str | None, what: str) -> ConfigError:
        where = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{self.path}: {where}: {what}")

    def warn(self, section: str, key: str | None, what: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]"
        self.warnings.append(f"{self.path}: {where}: {what}")

    def settings(self) -> Settings:
        found: list[HostSettings] = []
        for section in self.parser.sections():
            owner = hosts.match(section)
            if owner is not None:
                found.append(self.host(section, *owner))
            elif section not in SECTION_KEYS:
                self.warn(section, None, "unknown section, ignored")
        numbers = [host.number for host in found]
        for number in sorted({n for n in numbers if numbers.count(n) > 1}):
            same = " and ".join(f"[{host.section}]" for host in found if host.number == number)
            raise ConfigError(f"{self.path}: {same} share the number {number}: a host's number is its ref, once")
        if not found:
            kinds = ", ".join(f"[{prefix}N]" for prefix in hosts.prefixes())
            self.warn("xenhost1", None, f"no host section ({kinds}): no host can be used until one is added")
        return Settings(
            source=self.path,
            common=self.common(),
            couchbase=self.couchbase(),
            auth=self.auth(),
            quota=self.quota(),
            probe=self.probe(),
            ready_pools=self.ready_pools(),
            hosts=tuple(sorted(found, key=lambda h: h.number)),
            warnings=tuple(self.warnings),
        )

    def _section(
        self, name: str, known: set[str] | frozenset[str], per_os_suffix: tuple[str, ...] = ()
    ) -> Mapping[str, str]:
        if not self.parser.has_section(name):
            return {}
        values = dict(self.parser.items(name))
        suffixes = per_os_suffix + SECTION_OS_SUFFIXES.get(name, ())
        for key in values:
            if key not in known and not (suffixes and key.endswith(suffixes)):
                self.warn(name, key, "unknown key, ignored")
        return values

    def number(
        self, section: str, values: Mapping[str, str], key: str, default: float, allow_zero: bool = False
    ) -> float:
        raw = values.get(key, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.error(section, key, f"must be a number, not {raw!r}") from None
        if not (value > 0 or (allow_zero and value == 0)) or value == float("inf"):
            raise self.error(section, key, f"must be a positive number, not {raw!r}")
        return value

    def common(self) -> CommonSettings:
        values = self._section("common", KNOWN_COMMON_KEYS)
        return CommonSettings(
            expiry_minutes=self.number("common", values, "vm.expiry.minutes", DEFAULT_EXPIRY_MINUTES),
            network_timeout_secs=self.number("common", values, "vm.network.timeout.secs", DEFAULT_NETWORK_TIMEOUT_SECS),
            cpu_overcommit=self.number("common", values, "cpu.overcommit", 1.0),
            db_url=values.get("db.url", "").strip() or None,
            quarantine_hours=self.number(
                "common", values, "orphan.quarantine.hours", DEFAULT_QUARANTINE_HOURS, allow_zero=True
            ),
            queue_wait_minutes=self.number("common", values, "queue.wait.minutes", 0.0, allow_zero=True),
        )

    def ready_pools(self) -> ReadyPoolSettings:
        values = self._section("pools", KNOWN_POOL_KEYS)

        def whole(key: str, default: int, low: int) -> int:
            raw = values.get(key, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or int(raw) < low:
                raise self.error("pools", key, f"must be a whole number of at least {low}, not {raw!r}")
            return int(raw)

        targets: dict[str, int] = {}
        maxima: dict[str, int] = {}
        for key in values:
            for suffix, into in ((".ready", targets), (".max", maxima)):
                if key.endswith(suffix) and key not in KNOWN_POOL_KEYS:
                    os = key.removesuffix(suffix)
                    if not OS_KEY.match(os):
                        raise self.error("pools", key, "an OS key is lower-case letters, digits, '-' or '_'")
                    into[os] = whole(key, 0, 0)
        sizing = values.get("sizing", "").strip().lower() or "fixed"
        if sizing not in ("fixed", "learned"):
            raise self.error("pools", "sizing", f"must be fixed or learned, not {sizing!r}")
        known = {os for host in self._host_templates() for os in host}
        for os in sorted(targets):
            if targets[os] and known and os not in known:
                self.warn("pools", f"{os}.ready", f"no host has a {os} template: that pool stays empty")
        return ReadyPoolSettings(
            targets={os: n for os, n in targets.items() if n > 0},
            ready_ttl_minutes=self.number("pools", values, "ready.ttl.minutes", DEFAULT_READY_TTL_MINUTES),
            refill_per_host=whole("refill.per.host", 2, 1),
            sizing=sizing,
            margin=self.number("pools", values, "sizing.margin", 1.0, allow_zero=True),
            maxima=maxima,
        )

    def _host_templates(self) -> list[set[str]]:
        """The OS keys each host section names (before the sections are validated)."""
        out = []
        for section in self.parser.sections():
            owner = hosts.match(section)
            if owner is not None:
                suffix = owner[0].os_key_suffix
                out.append({key.removesuffix(suffix) for key in self.parser.options(section) if key.endswith(suffix)})
        return out

    def probe(self) -> ProbeSettings:
        values = self._section("probe", KNOWN_PROBE_KEYS)

        def port(key: str, default: int) -> int:
            raw = values.get(key, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or int(raw) > 65535:
                raise self.error("probe", key, f"must be a TCP port (0 turns the probe off), not {raw!r}")
            return int(raw)

        ports = {}
        for key in values:
            if key.endswith(".port"):
                os = key.removesuffix(".port")
                if not OS_KEY.match(os):
                    raise self.error("probe", key, "an OS key is lower-case letters, digits, '-' or '_'")
                ports[os] = port(key, 0)
        return ProbeSettings(
            enabled=self.boolean("probe", values, "enabled", True),
            port=port("port", DEFAULT_PROBE_PORT),
            ports=ports,
        )

    def auth(self) -> AuthSettings:
        values = self._section("auth", KNOWN_AUTH_KEYS)
        return AuthSettings(required=self.boolean("auth", values, "required", False))

    def quota(self) -> QuotaSettings:
        values = self._section("quota", KNOWN_QUOTA_KEYS)

        def whole(key: str, default: int) -> int:
            raw = values.get(key, "").strip()
            if not raw:
                return default
            if not raw.isdigit():
                raise self.error("quota", key, f"must be a whole number (0: no limit), not {raw!r}")
            return int(raw)

        count = whole("max.count.per.request", 50)
        if count < 1:
            raise self.error("quota", "max.count.per.request", "must be at least 1")
        memory_gib = (
            self.number("quota", values, "memory.gib.per.user", 0.0)
            if values.get("memory.gib.per.user", "0").strip() not in ("", "0")
            else 0.0
        )
        return QuotaSettings(
            max_count_per_request=count,
            vms_per_user=whole("vms.per.user", 0),
            memory_per_user=int(memory_gib * 1024**3),
        )

    def boolean(self, section: str, values: Mapping[str, str], key: str, default: bool) -> bool:
        raw = values.get(key, "").strip().lower()
        if not raw:
            return default
        if raw not in TRUE_WORDS | FALSE_WORDS:
            raise self.error(section, key, f"must be true or false, not {raw!r}")
        return raw in TRUE_WORDS

    def couchbase(self) -> CouchbaseSettings:
        values = self._section("couchbase", KNOWN_COUCHBASE_KEYS)
        settings = CouchbaseSettings(
            server=values.get("couchbase.server", "").strip(),
            bucket=values.get("couchbase.bucket", "").strip(),
            username=values.get("couchbase.username", "").strip(),
            password=Secret(values.get("couchbase.userpassword", "")),
        )
        if bool(settings.server) != bool(settings.bucket):
            missing = "couchbase.bucket" if settings.server else "couchbase.server"
            raise self.error("couchbase", missing, "is needed too (fill in both, or neither)")
        return settings

    def host(self, section: str, kind: hosts.HostKind, number: int) -> HostSettings:
        """A host section, read by its kind (``hosts.py``)."""
        values = self._section(section, kind.known_keys, (kind.os_key_suffix, *kind.os_key_extras))
        return kind.parse(self, section, number, values)


# -- watching ------------------------------------------------------------------------------


class ConfigWatcher:
    """Reloads the configuration within about a second of a change to the file.

    ``on_change(settings)`` is called on the watcher thread with each new valid
    configuration; an invalid edit is logged and the last good configuration stays. The
    file's directory is watched, so editors that replace the file (write + rename) are
    seen too. Every half second the file's size, inode and mtime are also compared with the
    last load, which catches a change made before the watch was in place.
    """

    def __init__(self, path: Path, initial: Settings, on_change: Callable[[Settings], None]) -> None:
        self.path = path.resolve()
        self._current = initial
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._signature = _signature(self.path)

    @property
    def current(self) -> Settings:
        with self._lock:
            return self._current

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reload(self) -> bool:
        """Load the file now; True when a new configuration took effect."""
        self._signature = _signature(self.path)
        try:
            settings = load_settings(self.path)
        except ConfigError as e:
            log.error("configuration not reloaded, keeping the last good one: %s", e)
            return False
        with self._lock:
            if settings == self._current:
                return False
            self._current = settings
        for warning in settings.warnings:
            log.warning("%s", warning)
        log.info("configuration reloaded from %s: %d host(s)", self.path, len(settings.hosts))
        self._on_change(settings)
        return True

    def _run(self) -> None:
        import watchfiles

        name = self.path.name
        for changes in watchfiles.watch(
            self.path.parent,
            watch_filter=lambda _change, changed: Path(changed).name == name,
            debounce=100,
            step=50,
            stop_event=self._stop,
            recursive=False,
            rust_timeout=500,
            yield_on_timeout=True,
        ):
            if not changes and _signature(self.path) == self._signature:
                continue
            try:
                self.reload()
            except Exception:  # a bug in a listener must not stop reloads for good
                log.exception("applying the reloaded configuration failed")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
