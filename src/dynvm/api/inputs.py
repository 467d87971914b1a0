"""Input no database column can hold, refused before any route sees it: a control character
(NUL and the rest of U+0000–U+001F, and U+007F) in the path or in a query value. SQLite
stores a NUL where PostgreSQL refuses it mid-statement; a newline in a name is a log
line forged. Refusing them here answers every API the same way on every backend: 400,
with the sentence the API's errors use (``errors.render``).

A body is the routes' own to check (the v1 models' patterns refuse them there).
"""

from __future__ import annotations

import re
import urllib.parse

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import render

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unstorable(scope: Scope) -> str | None:
    """Why this request's path or query cannot be taken, or None."""
    path = scope.get("path", "")
    if CONTROL.search(path):
        return "the path holds a control character (such as NUL or a newline), which no name or id can"
    query = scope.get("query_string", b"").decode("latin-1")
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="replace"):
        if CONTROL.search(key) or CONTROL.search(value):
            return f"the query parameter {key!r} holds a control character (such as NUL or a newline)"
    return None


class RefuseUnstorableInput:
    """Plain ASGI: the answer comes before any route, dependency or database session."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = unstorable(scope)
            if why is not None:
                await render(scope.get("path", ""), 400, why)(scope, receive, send)
                return
        await self.app(scope, receive, send)
