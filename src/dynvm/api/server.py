"""How ``dynvm serve`` listens: the socket is bound before anything else happens, and a
request that is never finished is cut off.

Binding first matters for safety: start-up runs reconcile, which may stop and destroy
VMs. A second ``dynvm serve`` started by mistake on a taken port must fail before it
has touched any host, not after.
"""

from __future__ import annotations

import asyncio
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_REQUEST_TIMEOUT = 30.0


def serves_database(url: str, db_url: str) -> bool:
    """Whether the dynvm at ``url`` answers, and is the one serving ``db_url``: on a port
    picked free a moment before, another process may have bound it first, and another
    test's or lab's service must never be taken for one's own."""
    import httpx

    from ..store.installation import installation_of

    try:
        answer = httpx.get(f"{url}/healthz", params={"detail": "true"}, timeout=2)
        answered = answer.json().get("installation") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return False
    return answered is not None and answered == installation_of(db_url)


class PortTaken(Exception):
    """The address is in use (or cannot be bound); the message says which."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ``PortTaken``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: uvicorn writes a response's head and body apart, and
    # without it the body waits for the client's delayed ACK (40 ms a request on keep-alive)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise PortTaken(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def protocol_with_request_timeout(seconds: float = DEFAULT_REQUEST_TIMEOUT) -> type[H11Protocol]:
    """uvicorn's h11 protocol, but a connection whose request does not arrive whole within
    ``seconds`` (headers and body; a silent new connection too) is closed. uvicorn itself
    waits for ever on a half-sent request, and each such connection holds a slot."""

    class RequestTimeoutProtocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # asyncio.Protocol types the transport as BaseTransport; uvicorn gives a Transport
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                if self._request_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._request_timer = self.loop.call_later(seconds, self._request_timed_out)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _request_timed_out(self) -> None:
            self._request_timer = None
            waiting_for_client = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            busy = self.cycle is not None and not self.cycle.response_complete and not waiting_for_client
            if waiting_for_client and not busy and not self.transport.is_closing():
                self.logger.info("closing a connection whose request did not arrive within %.0f s", seconds)
                self.transport.close()

    return RequestTimeoutProtocol
