"""The real HTTP service (uvicorn on a 127.0.0.1 port) over dynvm's services and a
simulated lab."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from dynvm.api.app import create_app
from dynvm.runtime import Services


class RunningService:
    def __init__(self, services: Services, lab) -> None:  # type: ignore[no-untyped-def]
        self.services = services
        self.lab = lab
        # the services are started by the fixture; the app must not start them twice
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(services, manage_services=False), host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        # room for a hundred requests waiting at once, plus the ones a test makes meanwhile
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=50)
        self.http = httpx.Client(base_url=self.url, timeout=60, limits=limits)

    def get(self, path: str, **params: object) -> httpx.Response:
        return self.http.get(path, params=params or None)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve(make_services) -> Iterator[Callable[..., RunningService]]:
    running: list[RunningService] = []

    def start(**options: object) -> RunningService:
        services, lab = make_services(**options)
        service = RunningService(services, lab)
        running.append(service)
        return service

    yield start
    for service in running:
        service.stop()
