"""FastAPI dependencies shared by the routers (``Annotated`` aliases).

They are ``async``: FastAPI runs a plain ``def`` dependency on a worker thread, and two
thread hops per request cost more than the work itself when a burst of requests arrives.
Only a token check, which reads the database, leaves the event loop.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Header, Request

from ..auth import caller_from_header
from ..model import Caller
from ..runtime import Services


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_caller(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    required = services.current_settings().auth.required
    if not authorization:
        return caller_from_header(None, services.tokens, required)  # no token: nothing to look up
    return await anyio.to_thread.run_sync(caller_from_header, authorization, services.tokens, required)


CallerDep = Annotated[Caller, Depends(get_caller)]
