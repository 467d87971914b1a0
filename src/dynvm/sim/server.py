"""XML-RPC over HTTP(S), the way xapi serves it: ``POST`` on any path, one thread per
connection (so slow calls never hold up others), HTTP/1.1 keep-alive.

``Endpoint`` owns one listening port and can go dark on purpose: ``refuse`` closes the
port and every open connection (clients see "connection refused"); ``hang`` keeps
accepting but never answers an xapi call (clients see a time-out). Both are undone by
``restore``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn

from . import jsonrpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Reply:
    """What a router answers: the XML body, or ``None`` to drop the connection unanswered,
    an action to run once the body has been sent, and the ``{Status, ...}`` envelope the
    body encodes (what a JSON-RPC answer is made from)."""

    body: str | None
    after: Callable[[], None] | None = None
    envelope: dict[str, object] | None = None

    @classmethod
    def of(cls, envelope: dict[str, object], after: Callable[[], None] | None = None) -> Reply:
        return cls(encode_response(envelope), after, envelope)


Router = Callable[[str, tuple[object, ...]], Reply]


def encode_response(value: dict[str, object]) -> str:
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every call.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] == "/jsonrpc":
            self._jsonrpc()
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            params, method = xmlrpc.client.loads(body)
        except Exception:
            self._send(400, "text/plain", b"bad XML-RPC request\n")
            return
        reply = self.server.router(method or "", params)
        if reply.body is None:
            self.close_connection = True
            return
        self._send(200, "text/xml", reply.body.encode("utf-8"))
        if reply.after is not None:
            reply.after()

    def _jsonrpc(self) -> None:
        """XenServer 8's JSON-RPC (``jsonrpc.py``): the same calls, routed the same way."""
        try:
            length = int(self.headers["Content-Length"])  # xapi needs it: no chunked bodies
            call = jsonrpc.parse(self.rfile.read(length))
        except (KeyError, ValueError):
            self.close_connection = True  # xapi answers a request it cannot read with a bare 500
            self._send(500, "text/html", b"<html><body><h1>500 Internal Server Error</h1></body></html>\n")
            return
        reply = self.server.router(call.method, call.params)
        if reply.body is None or reply.envelope is None:
            self.close_connection = True
            return
        self._send(200, "application/json", jsonrpc.answer(call, reply.envelope))
        if reply.after is not None:
            reply.after()

    def do_GET(self) -> None:
        self._send(200, "text/plain", b"dynvm sim: a XenAPI simulator. POST XML-RPC here.\n")

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], router: Router, tls: ssl.SSLContext | None) -> None:
        self.router = router
        self._tls = tls
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        if self._tls is not None:
            # The handshake happens in the connection's own thread (on first read), so a
            # slow client cannot stall the accept loop.
            conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError | ValueError):  # a client that gave up or closed mid-request
            log.debug("client %s went away: %r", client_address, error)
        else:
            super().handle_error(request, client_address)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def drop_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Endpoint:
    """One listening 127.0.0.1 port (by default; ``bind`` says otherwise)."""

    def __init__(
        self, router: Router, port: int = 0, tls: ssl.SSLContext | None = None, bind: str = "127.0.0.1"
    ) -> None:
        self._router = router
        self._tls = tls
        self._bind = bind
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.down = ""  # "", "hang" or "refuse"
        self._switching = threading.RLock()  # an outage and its end never overlap
        self._answering = threading.Event()
        self._answering.set()

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self._bind}:{self.port}"

    def start(self) -> None:
        self._server = _Server((self._bind, self.port), self._route, self._tls)
        self.port = self._server.server_address[1]
        # A short poll interval: stopping (and a "refuse" outage) takes effect within 0.1 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name=f"sim-port-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._answering.set()
        server, self._server = self._server, None  # two threads may stop it at once: one does
        if server is not None:
            server.shutdown()
            server.drop_connections()
            server.server_close()

    def _route(self, method: str, params: tuple[object, ...]) -> Reply:
        if not method.startswith("sim.") and not self._answering.is_set():
            self._answering.wait()  # a hung host: hold the call, then drop it unanswered
            return Reply(None)
        return self._router(method, params)

    def go_down(self, mode: str) -> None:
        if mode not in ("hang", "refuse"):
            raise ValueError(f"unknown outage mode {mode!r}: use 'hang' or 'refuse'")
        with self._switching:
            self.restore()
            self.down = mode
            if mode == "hang":
                self._answering.clear()
            else:
                self.stop()

    def restore(self) -> None:
        with self._switching:
            if self.down == "refuse":
                self.start()
            self.down = ""
            self._answering.set()
