"""``create_app(services)``: the FastAPI application. No work happens at import time; the
lifespan starts the services and stops them cleanly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..dashboard.routes import install_dashboard
from ..runtime import Services
from . import errors, legacy, v1
from .deps import CallerDep
from .docs import install_docs
from .inputs import RefuseUnstorableInput


def create_app(services: Services, manage_services: bool = True) -> FastAPI:
    """``manage_services=False`` leaves starting and stopping to the caller (tests that
    drive the services themselves)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_services:
            await anyio.to_thread.run_sync(services.start)
        try:
            yield
        finally:
            if manage_services:
                await anyio.to_thread.run_sync(services.stop)

    app = FastAPI(title="dynvm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_docs(app)
    app.state.services = services
    errors.install(app)
    app.include_router(legacy.router)
    app.include_router(v1.router)
    install_dashboard(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(detail: bool = False) -> Response:
        """``ok``; with ``?detail=true`` also which installation this is (the id in the
        marker of every VM it makes), its version, whether this replica leads, and the time
        on its clock (Unix seconds; a live replay's compressed time, ``clock.py``). 503 once
        another dynvm is known to act for this installation (``engine/claim.py``): a load
        balancer takes this one out."""
        contested = services.engine.claim.contested
        if not detail:
            return PlainTextResponse(
                f"contested: {contested}" if contested else "ok", status_code=503 if contested else 200
            )
        installation = await anyio.to_thread.run_sync(lambda: services.engine.installation)
        leading = await anyio.to_thread.run_sync(services.leadership.is_leader)
        return JSONResponse(
            {
                "status": "contested" if contested else "ok",
                "contested": contested,
                "installation": installation,
                "version": __version__,
                "leader": leading,
                "time": services.engine.clock(),
            },
            status_code=503 if contested else 200,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics(_: CallerDep) -> Response:
        body = await anyio.to_thread.run_sync(services.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RefuseUnstorableInput)  # inside the counter: refusals are counted too
    app.add_middleware(RequestCounter, count=lambda path, status: services.metrics.requests.labels(path, status).inc())
    return app


class RequestCounter:
    """Counts answers by route template and status. Plain ASGI, not ``@app.middleware``:
    Starlette's ``BaseHTTPMiddleware`` hides a client's hang-up from the route, and a
    legacy request waiting in the queue must see it (to cancel itself)."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if status:
                route = scope.get("route")
                self.count(getattr(route, "path", "unmatched"), str(status[0]))  # templates: few label values
