"""FastAPI dependencies shared by the routers (``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from ..auth import caller_from_header
from ..leases import Caller
from ..runtime import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_caller(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    required = services.current_settings().auth.required
    return caller_from_header(authorization, services.tokens, required)


CallerDep = Annotated[Caller, Depends(get_caller)]
