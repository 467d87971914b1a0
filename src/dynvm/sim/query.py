"""The filter language of ``<class>.get_all_records_where``.

xapi evaluates expressions over its database rows, e.g.
``field "power_state" = "Running" and not (field "is_a_template" = "true")``.
Row values are strings there (booleans are "true"/"false"); database column names put
``__`` where a field name has a namespace separator (``name__label``), so both spellings
are accepted here.

Errors as xapi gives them (xen-api db_filter.ml, db_cache_types.ml, exnHelper.ml): an
expression that does not parse is ``INVALID_VALUE [expr, why]``; a field the class does
not have is ``INTERNAL_ERROR ["missing field", field, ""]``, raised when a row is read, so
a table with no rows answers ``{}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import XapiError

Predicate = Callable[[dict[str, object]], bool]

_TOKEN = re.compile(r'\s*(?:(\()|(\))|(<>|=)|"((?:[^"\\]|\\.)*)"|([A-Za-z_]+))')


def _db_string(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise XapiError("INVALID_VALUE", text, f"cannot parse at {text[pos:]!r}")
        lpar, rpar, op, string, word = m.groups()
        if lpar:
            out.append(("(", "("))
        elif rpar:
            out.append((")", ")"))
        elif op:
            out.append(("op", op))
        elif string is not None:
            out.append(("str", string.replace('\\"', '"')))
        else:
            out.append(("word", word.lower()))
        pos = m.end()
    return out


def parse(text: str) -> Predicate:
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        tok = peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            raise XapiError("INVALID_VALUE", text, "cannot parse the expression")
        pos += 1
        return tok[1]

    def operand() -> Callable[[dict[str, object]], str]:
        tok = peek()
        if tok == ("word", "field"):
            take("word")
            name = take("str")
            plain = name.replace("__", "_")

            def get(row: dict[str, object]) -> str:
                if name in row:
                    return _db_string(row[name])
                if plain in row:
                    return _db_string(row[plain])
                raise XapiError("INTERNAL_ERROR", "missing field", name, "")

            return get
        literal = take("str")
        return lambda row: literal

    def unary() -> Predicate:
        tok = peek()
        if tok == ("word", "not"):
            take("word")
            inner = unary()
            return lambda row: not inner(row)
        if tok == ("(", "("):
            take("(")
            inner = disjunction()
            take(")")
            return inner
        if tok in (("word", "true"), ("word", "false")):
            take("word")
            result = tok[1] == "true"
            return lambda row: result
        left = operand()
        op = take("op")
        right = operand()
        if op == "=":
            return lambda row: left(row) == right(row)
        return lambda row: left(row) != right(row)

    def conjunction() -> Predicate:
        parts = [unary()]
        while peek() == ("word", "and"):
            take("word")
            parts.append(unary())
        return lambda row: all(p(row) for p in parts)

    def disjunction() -> Predicate:
        parts = [conjunction()]
        while peek() == ("word", "or"):
            take("word")
            parts.append(conjunction())
        return lambda row: any(p(row) for p in parts)

    if not tokens:
        return lambda row: True
    predicate = disjunction()
    if peek() is not None:
        raise XapiError("INVALID_VALUE", text, "cannot parse the expression")
    return predicate
