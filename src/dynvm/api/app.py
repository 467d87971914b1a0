"""``create_app(services)``: the FastAPI application. No work happens at import time; the
lifespan starts the services and stops them cleanly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from ..runtime import Services
from . import errors, legacy, v1


def create_app(services: Services, manage_services: bool = True) -> FastAPI:
    """``manage_services=False`` leaves starting and stopping to the caller (tests that
    drive the services themselves)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio

        if manage_services:
            await anyio.to_thread.run_sync(services.start)
        try:
            yield
        finally:
            if manage_services:
                await anyio.to_thread.run_sync(services.stop)

    app = FastAPI(title="dynvm", version="0.1", lifespan=lifespan, docs_url="/docs", openapi_url="/openapi.json")
    app.state.services = services
    errors.install(app)
    app.include_router(legacy.router)
    app.include_router(v1.router)

    @app.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    async def healthz() -> str:
        return "ok"

    return app
