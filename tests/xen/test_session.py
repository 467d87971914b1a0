"""The session pool: one session per thread at a time, re-login, time-outs, backoff, TLS."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynvm.config import Secret
from dynvm.model import HostAuthFailed, HostUnreachable
from dynvm.xen.session import SessionPool, XapiSession, master_url, to_wire

from ..sim.simtools import wait_for


def test_int64_arguments_are_sent_as_decimal_strings():
    assert to_wire(8589934592) == "8589934592"
    assert to_wire(True) is True
    assert to_wire({"virtual_size": 5, "SR": "OpaqueRef:x", "tags": [1, "a"]}) == {
        "virtual_size": "5",
        "SR": "OpaqueRef:x",
        "tags": ["1", "a"],
    }


def test_the_session_class_converts_every_argument(monkeypatch):
    sent = []
    monkeypatch.setattr("XenAPI.Session.xenapi_request", lambda self, name, params: sent.append((name, params)))
    XapiSession("http://127.0.0.1:1").xenapi.VM.set_memory_limits("OpaqueRef:vm", 1, 2**33, 2**33, 2**33)
    assert sent == [("VM.set_memory_limits", ("OpaqueRef:vm", "1", "8589934592", "8589934592", "8589934592"))]


def test_threads_never_share_a_session_and_sessions_are_reused(sim_lab):
    lab = sim_lab()
    pool = SessionPool(lab.host(), max_idle=4)
    in_use: set[int] = set()
    guard = threading.Lock()
    clashes = []

    def work(_: int) -> int:
        done = 0
        for _ in range(20):
            with pool.session() as xapi:
                key = id(xapi._Dispatcher__send.__self__)  # the Session object behind the proxy
                with guard:
                    if key in in_use:
                        clashes.append(key)
                    in_use.add(key)
                assert len(xapi.host.get_all()) == 1
                with guard:
                    in_use.discard(key)
                done += 1
        return done

    with ThreadPoolExecutor(8) as threads:
        assert sum(threads.map(work, range(8))) == 160
    assert clashes == []
    # 160 calls from 8 threads needed at most 8 logins: sessions were lent again, not remade
    assert lab.lab.nodes[0].host.store.count("session") <= 8
    pool.close()
    assert lab.lab.nodes[0].host.store.count("session") == 0  # closing logs the idle ones out


def test_an_ended_session_is_replaced_without_the_caller_noticing(sim_lab):
    lab = sim_lab()
    pool = SessionPool(lab.host())
    with pool.session() as xapi:
        xapi.VM.get_all()
    lab.control().invalidate_sessions()
    with pool.session() as xapi:
        assert xapi.VM.get_all()


def test_wrong_credentials_say_so_without_the_password(sim_lab):
    lab = sim_lab()
    host = dataclasses.replace(lab.host(), password=Secret("wrong-pw-42"))
    with pytest.raises(HostAuthFailed) as error, SessionPool(host).session():
        pass
    assert "check host.user and host.password" in str(error.value)
    assert "wrong-pw-42" not in str(error.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refuses(url: str) -> bool:
    """The host's port refuses connections."""
    parsed = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # reset while the port closes: not refusing yet
        return False
    return False


def test_a_refusing_host_fails_fast_and_is_backed_off(sim_lab):
    lab = sim_lab()
    clock = FakeClock()
    pool = SessionPool(lab.host(), clock=clock)
    lab.control().host_down("refuse")
    wait_for(lambda: refuses(lab.host().url), timeout=5)  # the port closes just after the control call answers
    with pytest.raises(HostUnreachable, match="connection refused"), pool.session():
        pass
    # while backing off, callers are told at once, without another connection attempt
    calls_before = lab.lab.nodes[0].calls
    with pytest.raises(HostUnreachable, match="next attempt in"), pool.session():
        pass
    assert pool.backing_off
    lab.control().host_up()
    clock.now += 1.5  # past the first backoff step
    with pool.session() as xapi:
        assert xapi.host.get_all()
    assert lab.lab.nodes[0].calls > calls_before
    assert not pool.backing_off


def test_a_hung_host_cannot_hang_a_caller(sim_lab):
    lab = sim_lab()
    pool = SessionPool(lab.host(), timeout=0.5)
    with pool.session() as xapi:
        xapi.VM.get_all()
        lab.control().host_down("hang")
        started = time.monotonic()
        with pytest.raises(HostUnreachable, match="timed out"), pool.session() as other:
            other.VM.get_all()
        assert time.monotonic() - started < 5
    lab.control().host_up()


def test_tls_with_the_hosts_certificate_and_without_verification(sim_lab):
    lab = sim_lab(tls=True)
    host = lab.host()
    assert host.url.startswith("https://")
    with SessionPool(host).session() as xapi:  # host.tls.ca_file from the config
        assert xapi.host.get_all()
    unverified = dataclasses.replace(host, tls_ca_file=None, tls_verify=False)
    with SessionPool(unverified).session() as xapi:
        assert xapi.host.get_all()
    default = dataclasses.replace(host, tls_ca_file=None, tls_verify=True)
    with pytest.raises(HostUnreachable, match=r"host\.tls\.ca_file"), SessionPool(default).session():
        pass


def test_the_master_url_keeps_the_members_scheme_and_port_unless_the_address_has_one():
    assert master_url("https://xen2.lab", "10.0.0.1") == "https://10.0.0.1"
    assert master_url("https://xen2.lab:8443", "10.0.0.1") == "https://10.0.0.1:8443"
    assert master_url("http://127.0.0.1:4001", "127.0.0.1:4000") == "http://127.0.0.1:4000"
    assert master_url("https://xen2.lab", "fd00::1") == "https://[fd00::1]"
    assert master_url("https://xen2.lab", "[fd00::1]:443") == "https://[fd00::1]:443"


def test_a_session_on_a_pool_member_is_opened_on_its_master(sim_lab):
    lab = sim_lab(pool_size=2)
    member = dataclasses.replace(lab.host(), url=lab.lab.members[1][0].url)
    pool = SessionPool(member)
    with pool.session() as xapi:
        assert len(xapi.host.get_all()) == 2
        [pool_ref] = xapi.pool.get_all()
        assert xapi.host.get_name_label(xapi.pool.get_master(pool_ref)) == "sim-xen-01"
    pool.close()
