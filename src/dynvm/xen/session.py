"""A thread-safe pool of logged-in XenAPI sessions per host.

One ``XenAPI.Session`` is not thread-safe (it wraps one HTTP connection), so a session is
used by one thread at a time: ``with pool.session() as xapi:`` lends one out and takes it
back. Every call has a socket time-out, so a dead host can never hang a caller; a host
that fails to answer is backed off (1 s, 2 s, 4 s ... up to 30 s) and, meanwhile, callers
get ``HostUnreachable`` at once instead of waiting for another time-out. ``SESSION_INVALID``
is handled by the SDK itself, which logs in again with the same credentials.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import XenAPI

from ..backoff import SESSION, Backoff
from ..model import HostAuthFailed, HostUnreachable, XenError
from .settings import XenHostSettings

log = logging.getLogger(__name__)

API_VERSION = "2.21"
ORIGINATOR = "dynvm"
CONNECTION_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)


def to_wire(value: Any) -> Any:
    """xapi's int64 travel as decimal strings (XML-RPC's <int> is 32-bit)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


class _Timeouts:
    """Mixed into the SDK's transports: a socket time-out on every call, and ``abort()`` to
    break a call that is blocked (for shutdown)."""

    timeout: float
    _live: http.client.HTTPConnection | None = None
    _aborted = False

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._aborted:  # xmlrpc.client retries a reset connection once: not after abort()
            raise ConnectionAbortedError("the session was closed")
        connection = super().make_connection(host)  # type: ignore[misc]  # xmlrpc's Transport.make_connection is untyped in typeshed's stubs
        connection.timeout = self.timeout
        if connection.sock is not None:
            connection.sock.settimeout(self.timeout)
        self._live = connection
        return connection

    def abort(self) -> None:
        self._aborted = True
        connection = self._live
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class TimeoutTransport(_Timeouts, xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout


class TimeoutSafeTransport(_Timeouts, xmlrpc.client.SafeTransport):
    if TYPE_CHECKING:  # _Timeouts hands on the connection SafeTransport made: an HTTPS one

        def make_connection(self, host: Any) -> http.client.HTTPSConnection: ...

    def __init__(self, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self.timeout = timeout


class XapiSession(XenAPI.Session):
    """The SDK's session, sending int arguments as xapi's decimal strings."""

    def xenapi_request(self, methodname: str, params: tuple[Any, ...]) -> Any:
        return super().xenapi_request(methodname, tuple(to_wire(p) for p in params))


def tls_context(host: XenHostSettings) -> ssl.SSLContext:
    if host.tls_ca_file is not None:
        return ssl.create_default_context(cafile=str(host.tls_ca_file))
    if not host.tls_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context()


def master_url(url: str, address: str) -> str:
    """The URL of a pool's master, from a member's URL and the address its
    ``HOST_IS_SLAVE`` names: the member's scheme, the master's address, and the member's
    port unless the address carries one (``host:port``, ``[v6]:port``; a bare IPv6
    address is bracketed)."""
    parts = urllib.parse.urlsplit(url)
    try:
        ipaddress.IPv6Address(address)
        netloc = f"[{address}]" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        target = urllib.parse.urlsplit(f"//{address}")
        port = target.port or parts.port
        netloc = (target.hostname or address) if ":" not in (target.hostname or "") else f"[{target.hostname}]"
        netloc += f":{port}" if port else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


MAX_MASTER_HOPS = 2  # a member names its master; a master that moved may name another once


def open_session(
    host: XenHostSettings, timeout: float, members: Sequence[str] = (), pool_uuid: str = ""
) -> tuple[XapiSession, _Timeouts]:
    """Log in to one host: a new session (and HTTP connection) of its own.

    ``host.name`` may be any member of a pool: a member refuses the login with
    ``HOST_IS_SLAVE [master address]`` (only the master hands out sessions; the SDK does
    not follow it), and the login goes to the master it names. When that fails (the
    member or the master it names is gone), the other ``members`` of the pool last seen
    (their addresses, the master first) are tried the same way: after an emergency
    transition, one of them is the new master. A session found that way must reach the
    pool ``pool_uuid`` (the one last seen): an address that now belongs to another pool
    is passed over, so a section never starts counting another pool. The error raised is
    the configured address's own."""
    try:
        return _login_following_master(host, host.url, timeout)
    except (HostUnreachable, XenAPI.Failure) as e:
        first_error = e
        fallbacks = [u for u in dict.fromkeys(master_url(host.url, a) for a in members) if u != host.url]
        if not fallbacks:
            raise
    log.info("%s: %s; trying the pool's other members", host.display, first_error)
    for url in fallbacks:
        try:
            session, transport = _login_following_master(host, url, timeout)
        except (XenError, XenAPI.Failure) as e:  # down, refusing, or another pool's credentials
            log.info("%s: %s: %s", host.display, url, e)
            continue
        if pool_uuid and _pool_of(session) != pool_uuid:
            log.warning("%s: %s now belongs to another pool; not using it", host.display, url)
            with contextlib.suppress(Exception):
                session.xenapi.session.logout()
            continue
        return session, transport
    raise first_error


def _pool_of(session: XapiSession) -> str:
    try:
        pools: dict[str, dict[str, Any]] = session.xenapi.pool.get_all_records()
    except (XenAPI.Failure, *CONNECTION_ERRORS):
        return ""
    return str(next(iter(pools.values()), {}).get("uuid", ""))


def _login_following_master(host: XenHostSettings, url: str, timeout: float) -> tuple[XapiSession, _Timeouts]:
    for _ in range(MAX_MASTER_HOPS + 1):
        try:
            return _login(host, url, timeout)
        except XenAPI.Failure as e:
            if not (e.details and e.details[0] == "HOST_IS_SLAVE" and len(e.details) > 1):
                raise
            url = master_url(url, str(e.details[1]))
            log.info("%s is a pool member; logging in to its master at %s", host.display, url)
    raise HostUnreachable(f"{host.display}: each pool member named another as master; last {url}", host.ref)


def _login(host: XenHostSettings, url: str, timeout: float) -> tuple[XapiSession, _Timeouts]:
    if url.startswith("https"):
        transport: _Timeouts = TimeoutSafeTransport(timeout, tls_context(host))
    else:
        transport = TimeoutTransport(timeout)
    session = XapiSession(url, transport=transport)
    try:
        session.xenapi.login_with_password(host.user, host.password.reveal(), API_VERSION, ORIGINATOR)
    except XenAPI.Failure as e:
        if e.details and e.details[0] == "SESSION_AUTHENTICATION_FAILED":
            raise HostAuthFailed(
                f"{host.display} refused the login of user {host.user!r}: check host.user and host.password",
                host.ref,
            ) from None
        raise
    except ssl.SSLError as e:
        raise HostUnreachable(
            f"{host.display}: TLS failed ({e.reason or e}); for a self-signed certificate set "
            "host.tls.ca_file (or host.tls.verify=false)",
            host.ref,
        ) from None
    except CONNECTION_ERRORS as e:
        raise HostUnreachable(f"{host.display} does not answer: {describe(e)}", host.ref) from None
    return session, transport


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return str(error) or type(error).__name__


class SessionPool:
    """Sessions for one host, lent to one thread at a time."""

    def __init__(
        self,
        host: XenHostSettings,
        timeout: float = 30.0,
        max_idle: int = 8,
        clock: Callable[[], float] = time.monotonic,
        members: Callable[[], Sequence[str]] = tuple,
        pool_uuid: Callable[[], str] = str,
    ) -> None:
        """``members``, ``pool_uuid``: the addresses of the pool's members and the pool's
        uuid as last seen (the inventory's mirror), to find the master through when the
        configured address does not answer, and only in that pool."""
        self.host = host
        self._members = members
        self._pool_uuid = pool_uuid
        self.timeout = timeout
        self.max_idle = max_idle
        self._clock = clock
        self._idle: list[tuple[XapiSession, _Timeouts]] = []
        self._busy: set[_Timeouts] = set()
        self._lock = threading.Lock()
        self._backoff = Backoff(SESSION, clock)
        self._closed = False

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """Lend a logged-in session's ``xenapi`` proxy to the calling thread.

        A connection-level error inside the block discards the session, starts a backoff
        and is raised as ``HostUnreachable``; xapi failures (``XenAPI.Failure``) pass through
        and the session goes back to the pool.
        """
        session, transport = self._checkout()
        try:
            yield session.xenapi
        except CONNECTION_ERRORS as e:
            self._discard(transport, failed=True)
            raise HostUnreachable(f"{self.host.display} stopped answering: {describe(e)}", self.host.ref) from None
        except BaseException:
            self._checkin(session, transport)
            raise
        else:
            self._checkin(session, transport)

    def _checkout(self) -> tuple[XapiSession, _Timeouts]:
        with self._lock:
            if self._closed:
                raise HostUnreachable(f"{self.host.display} is no longer configured", self.host.ref)
            if self._idle:
                session, transport = self._idle.pop()
                self._busy.add(transport)
                return session, transport
            wait = self._backoff.waiting()
            if wait > 0:
                raise HostUnreachable(
                    f"{self.host.display} is not answering; next attempt in {wait:.1f} s", self.host.ref
                )
        try:
            session, transport = open_session(self.host, self.timeout, self._members(), self._pool_uuid())
        except HostUnreachable:
            self._record_failure()
            raise
        self._backoff.succeeded()
        with self._lock:
            self._busy.add(transport)
        return session, transport

    def _checkin(self, session: XapiSession, transport: _Timeouts) -> None:
        with self._lock:
            self._busy.discard(transport)
            self._backoff.succeeded()
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append((session, transport))
                return
        self._logout(session)

    def _discard(self, transport: _Timeouts, failed: bool) -> None:
        with self._lock:
            self._busy.discard(transport)
        transport.abort()
        if failed:
            self._record_failure()

    def _record_failure(self) -> None:
        delay = self._backoff.failed()
        log.warning("%s: not answering; backing off %.0f s", self.host.display, delay)

    def reset_backoff(self) -> None:
        """Allow the next checkout to try at once (e.g. when the host is known to be back)."""
        self._backoff.try_now()

    def reconnected(self) -> None:
        """The host answers again, maybe through another member (a new master): try at once,
        and log in anew, since idle sessions may be connections to a master that is gone."""
        self._backoff.try_now()
        with self._lock:
            idle, self._idle = self._idle, []
        for session, _ in idle:  # their logout must not hold up the watcher: a master may be gone
            threading.Thread(target=self._logout, args=(session,), name="xapi-logout", daemon=True).start()

    @property
    def backing_off(self) -> bool:
        with self._lock:
            return self._backoff.waiting() > 0

    def close(self) -> None:
        """Log out idle sessions and break calls still in progress. Called when the host is
        removed from the configuration or dynvm stops."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for transport in busy:
            transport.abort()
        for session, _ in idle:
            self._logout(session)

    def _logout(self, session: XapiSession) -> None:
        with contextlib.suppress(Exception):
            session.xenapi.session.logout()
