"""``HostNode``: one simulated pool on the wire: its state, its xapi message table and one
endpoint per member. Calls to ``sim.*`` go to the control interface; every other call pays
the configured latency (and the member's own, when it is slow) and goes to xapi's
message table.

As in a real pool, the members answer on addresses of their own and one port: member N
(0 first) listens on ``127.0.0.(N+1)`` at the pool's port. Whichever member is the
master now (``pool.master``: it moves with ``pool.designate_new_master`` and
``pool.emergency_transition_to_master``) serves logins. Another member refuses a login
with ``HOST_IS_SLAVE [master address]``, the bare address as xapi sends it (xen-api
xapi_session.ml, ``login_with_password``: only the master hands out sessions), and
forwards every other call, made with a session the master gave, to the master, as a
member's xapi does. A member names the master it believes in (``SimHost.master_of``):
after ``pool.designate_new_master`` every member names the new one; after an emergency
transition only the member it ran on knows, until ``pool.recover_slaves`` tells the
others (xen-api xapi_pool.ml). A member that cannot forward (its master is gone, or is
master no more) answers ``HOST_IS_SLAVE`` too, where a real one restarts its toolstack and
answers an emergency-mode error meanwhile.

``MemberNode``: a handle on one member's endpoint (its URL, its outages) for tests and
the lab's config file.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from .api import XapiApi
from .errors import XapiError
from .host import SimHost, member_address
from .server import Endpoint, Reply

log = logging.getLogger(__name__)

# Messages a member answers itself, with no session from the master: the emergency ones
# an admin runs on a member whose master is gone (xe pool-emergency-transition-to-master).
MEMBER_LOCAL = {"pool.emergency_transition_to_master", "session.slave_local_login_with_password"}


def success(value: object) -> dict[str, object]:
    return {"Status": "Success", "Value": value}


def failure(description: list[str]) -> dict[str, object]:
    return {"Status": "Failure", "ErrorDescription": description}


class HostNode:
    def __init__(
        self,
        host: SimHost,
        control: Callable[[str, tuple[object, ...]], Reply],
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        member_tls: Callable[[int], ssl.SSLContext | None] | None = None,
    ) -> None:
        """``tls``: the master's context; ``member_tls(position)``: each other member's (a
        real pool's hosts have a certificate each)."""
        self.host = host
        self.api = XapiApi(host)
        self._control = control
        contexts = [tls] + [member_tls(p) if member_tls else tls for p in range(1, host.spec.pool_size)]
        self.endpoints = [
            Endpoint(self._router(position), port, contexts[position], bind=member_address(position))
            for position in range(host.spec.pool_size)
        ]
        self.endpoint = self.endpoints[0]  # the first member's (the master it starts with)
        self.calls = 0  # xapi calls answered (not sim.*): lets tests prove a cache made none

    @property
    def url(self) -> str:
        return self.endpoint.url

    def start(self) -> None:
        """Start every member's endpoint on one port: the first member's picks it."""
        self.endpoint.start()
        for endpoint in self.endpoints[1:]:
            endpoint.port = self.endpoint.port
            endpoint.start()

    def stop_endpoints(self) -> list[Endpoint]:
        return list(self.endpoints)

    def master_position(self) -> int:
        return self.host.master_position()

    def _router(self, position: int) -> Callable[[str, tuple[object, ...]], Reply]:
        return lambda method, params: self.route_at(position, method, params)

    def route(self, method: str, params: tuple[object, ...]) -> Reply:
        """A call as the current master answers it."""
        return self.route_at(self.master_position(), method, params)

    def route_at(self, position: int, method: str, params: tuple[object, ...]) -> Reply:
        if method.startswith("sim."):
            return self._control(method, params)
        if method in MEMBER_LOCAL or position == self.master_position():
            return self._answer(method, params, position)
        named = self.host.master_of(position)
        if method == "session.login_with_password" or self.endpoints[named].down or named != self.master_position():
            # a login, or a call it cannot forward (its master is gone, or is no master now)
            self.calls += 1
            return Reply.of(failure(["HOST_IS_SLAVE", member_address(named)]))
        return self._answer(method, params, position)

    def _answer(self, method: str, params: tuple[object, ...], position: int) -> Reply:
        self.calls += 1
        latency = self.host.timing.latency + self.host.member_latency(position)
        if latency > 0:
            time.sleep(latency)
        try:
            response = success(self.api.dispatch(method, params, position))
        except XapiError as e:
            response = failure(e.description)
        except Exception as e:  # a simulator bug must look like xapi's INTERNAL_ERROR, not a dead socket
            log.exception("%s failed", method)
            response = failure(["INTERNAL_ERROR", repr(e)])
        return Reply.of(response)


class MemberNode:
    """One member of a pool, other than its first (``position`` 1 and on)."""

    def __init__(self, pool: HostNode, position: int) -> None:
        self.master = pool  # the pool it belongs to (named for its first master)
        self.position = position
        self.endpoint = pool.endpoints[position]

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def address(self) -> str:
        return member_address(self.position)
