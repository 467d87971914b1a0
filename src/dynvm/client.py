"""A small client of the v1 API, for the ``dynvm get/release/ls/capacity/extend``
commands. The httpx transport is injectable, so tests can also hand it an ASGI app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:5000"


class ApiError(Exception):
    """The server said no: ``status`` and its problem's sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class DynvmClient:
    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = (server or os.environ.get("DYNVM_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token if token is not None else os.environ.get("DYNVM_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, transport=transport, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach dynvm at {self.server}: {e}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text.strip()
            raise ApiError(response.status_code, str(detail))
        return response

    def request_leases(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        response = self._call("POST", "/api/v1/leases", json=body)
        return response.headers["location"], response.json()

    def follow(
        self, location: str, on_update: Callable[[dict[str, Any]], None], interval: float = 0.5
    ) -> dict[str, Any]:
        """Poll a request until it is done, calling ``on_update`` with each status."""
        while True:
            status = self._call("GET", location, params={"wait": "true", "timeout": interval}).json()
            on_update(status)
            if status["state"] not in ("queued", "creating"):
                return status
            time.sleep(0.05)

    def cancel(self, location: str) -> dict[str, Any]:
        return self._call("DELETE", location).json()

    def leases(self, user: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/leases", params={"user": user} if user else None).json()

    def release(self, name: str) -> list[str]:
        return self._call("DELETE", f"/api/v1/leases/{name}").json()["released"]

    def extend(self, name: str, minutes: float) -> dict[str, Any]:
        return self._call("PATCH", f"/api/v1/leases/{name}", json={"expires_in_minutes": minutes}).json()

    def capacity(self) -> dict[str, int]:
        return self._call("GET", "/api/v1/capacity").json()

    def hosts(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/hosts").json()

    def pools(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/pools").json()
