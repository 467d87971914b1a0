"""How ``dynvm serve`` listens (``api/server.py``)."""

from __future__ import annotations

import socket

import pytest

from dynvm.api.server import PortTaken, bind


def test_connections_are_accepted_with_nagle_off_so_keep_alive_answers_are_not_held_back():
    listener = bind("127.0.0.1", 0)
    try:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            # uvicorn writes a response's head and body apart: with Nagle on, the body would
            # wait for the client's delayed ACK, 40 ms on every request after the first
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()


def test_a_taken_port_is_refused_before_anything_else_happens():
    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(PortTaken, match=r"cannot listen on 127\.0\.0\.1"):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()
