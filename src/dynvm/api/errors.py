"""One way to answer an error per API: the legacy routes answer ``Error: <sentence>`` as
plain text (SPEC.md §1); ``/api/v1`` answers RFC 9457 problem details in JSON."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model import DynvmError, LeaseError

log = logging.getLogger(__name__)

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    502: "Xen host failure",
    503: "Unavailable",
}


DATABASE_DOWN = "dynvm's database does not answer; try again in a moment (the service log says why)"


def database_unreachable(error: Exception) -> bool:
    """The database is down or unreachable (not a bug in a query): the caller may retry."""
    return isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and error.connection_invalidated)


def status_of(error: Exception) -> int:
    if isinstance(error, LeaseError):
        return error.status
    if isinstance(error, DynvmError):
        return 502
    return 500


def render(request_path: str, status: int, detail: str, title: str | None = None) -> Response:
    if request_path.startswith("/api/"):
        title = title or TITLES.get(status, "Error")
        return JSONResponse(
            {"type": "about:blank", "title": title, "status": status, "detail": detail},
            status_code=status,
            media_type="application/problem+json",
        )
    return PlainTextResponse(f"Error: {detail}\n", status_code=status)


def render_exception(request_path: str, error: Exception) -> Response:
    if database_unreachable(error):
        log.error("the database does not answer: %s", str(error).splitlines()[0])
        return render(request_path, 503, DATABASE_DOWN)
    status = status_of(error)
    if status == 500:
        log.exception("unexpected error", exc_info=error)
        return render(request_path, 500, "internal error; the service log has the details")
    return render(request_path, status, str(error), getattr(error, "title", None))


def install(app: FastAPI) -> None:
    @app.exception_handler(DynvmError)
    async def dynvm_error(request: Request, error: DynvmError) -> Response:
        return render_exception(request.url.path, error)

    # Its own handler, not the catch-all below: what reaches the catch-all is answered, then
    # re-raised to the server, which logs a traceback and closes the connection.
    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, error: DBAPIError) -> Response:
        return render_exception(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'request'}: {e['msg']}" for e in error.errors()
        )
        return render(request.url.path, 422, problems or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return render(request.url.path, error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        return render_exception(request.url.path, error)
