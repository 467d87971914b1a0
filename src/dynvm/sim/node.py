"""``HostNode``: one simulated pool on the wire: its state, its xapi message table and the
port its master listens on. Calls to ``sim.*`` go to the control interface; every other
call pays the configured latency and goes to xapi's message table.

``MemberNode``: the port of a pool member that is not the master. As on a real member, a
login there is refused with ``HOST_IS_SLAVE [master address]`` (xen-api xapi_session.ml,
``login_with_password``: only the master hands out sessions); every other call, made with
a session the master gave, is forwarded to the master (as a member's xapi forwards). The
master address carries the master's port (``127.0.0.1:<port>``): every simulated host
shares 127.0.0.1, where a real pool's members have an address each on one port."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from .api import XapiApi
from .errors import XapiError
from .host import SimHost
from .server import Endpoint, Reply, encode_response

log = logging.getLogger(__name__)


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
    ) -> None:
        self.host = host
        self.api = XapiApi(host)
        self._control = control
        self.endpoint = Endpoint(self.route, port, tls)
        self.calls = 0  # xapi calls answered (not sim.*): lets tests prove a cache made none

    @property
    def url(self) -> str:
        return self.endpoint.url

    def route(self, method: str, params: tuple[object, ...]) -> Reply:
        if method.startswith("sim."):
            return self._control(method, params)
        self.calls += 1
        latency = self.host.timing.latency
        if latency > 0:
            time.sleep(latency)
        try:
            response = success(self.api.dispatch(method, params))
        except XapiError as e:
            response = failure(e.description)
        except Exception as e:  # a simulator bug must look like xapi's INTERNAL_ERROR, not a dead socket
            log.exception("%s failed", method)
            response = failure(["INTERNAL_ERROR", repr(e)])
        return Reply(encode_response(response))


class MemberNode:
    def __init__(
        self,
        master: HostNode,
        position: int,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.master = master
        self.position = position  # in the pool's members (1 and on; 0 is the master)
        self.endpoint = Endpoint(self.route, port, tls)

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def master_address(self) -> str:
        return self.master.url.split("://", 1)[1]

    def route(self, method: str, params: tuple[object, ...]) -> Reply:
        if method == "session.login_with_password":
            self.master.calls += 1
            return Reply(encode_response(failure(["HOST_IS_SLAVE", self.master_address])))
        return self.master.route(method, params)
