"""API tokens: ``dynvm token create USER [--admin]`` prints a token once; only its SHA-256
digest is stored. Requests carry it as ``Authorization: Bearer <token>`` (never in a URL).

With ``[auth] required=false`` (the default) a request without a token is anonymous, so
existing Jenkins jobs keep working; a request with a token is that user's. With
``required=true`` every route but ``/healthz`` needs a valid token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update

from .model import ANONYMOUS, Caller, Unauthorized
from .store.db import Database
from .store.tables import tokens

TOKEN_PREFIX = "dvm_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    admin: bool
    created_at: float
    last_used_at: float | None


class TokenStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def create(self, user: str, admin: bool = False) -> str:
        """A new token for ``user``; the caller shows it once, dynvm keeps only its digest."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.write() as conn:
            conn.execute(
                insert(tokens).values(
                    id=str(uuid.uuid4()), user=user, digest=digest(token), admin=admin, created_at=self.clock()
                )
            )
        return token

    def verify(self, token: str) -> Caller | None:
        wanted = digest(token)
        with self.db.read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.digest == wanted)).first()
        if row is None or not hmac.compare_digest(row.digest, wanted):
            return None
        with self.db.write() as conn:
            conn.execute(update(tokens).where(tokens.c.id == row.id).values(last_used_at=self.clock()))
        return Caller(user=row.user, admin=row.admin)

    def list(self) -> list[TokenInfo]:
        with self.db.read() as conn:
            return [
                TokenInfo(r.id, r.user, r.admin, r.created_at, r.last_used_at)
                for r in conn.execute(select(tokens).order_by(tokens.c.user, tokens.c.created_at))
            ]

    def revoke(self, token_id: str) -> bool:
        with self.db.write() as conn:
            return conn.execute(delete(tokens).where(tokens.c.id == token_id)).rowcount > 0


def caller_from_header(authorization: str | None, store: TokenStore, required: bool) -> Caller:
    """The caller a request's ``Authorization`` header names (``Unauthorized`` if wrong)."""
    if not authorization:
        if required:
            raise Unauthorized(
                "this dynvm needs a token: send 'Authorization: Bearer <token>' "
                "(an admin makes one with 'dynvm token create USER')"
            )
        return ANONYMOUS
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    caller = store.verify(token.strip())
    if caller is None:
        raise Unauthorized("that token is not valid (revoked, mistyped, or from another dynvm)")
    return caller
