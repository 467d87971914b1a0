"""xapi's JSON-RPC endpoint (``POST /jsonrpc``), which XenServer 8's SDKs and Xen Orchestra
speak: the same calls as XML-RPC, positional parameters with the session first, answered
as xapi answers them (xen-api api_server.ml ``jsoncallback``; ocaml-rpc's jsonrpc.ml):

- JSON-RPC 2.0 (a request with ``"jsonrpc": "2.0"``): ``{"jsonrpc": "2.0", "result": R,
  "id": ID}``, or ``"error": {"code": 1, "message": CODE, "data": [params]}`` for a
  failure (code 1 always; ``data`` always present);
- JSON-RPC 1.0 (no ``jsonrpc`` member): ``{"result": R, "error": null, "id": ID}``, or
  ``"result": null`` and ``"error": [CODE, params...]``;
- values as JSON has them: 64-bit ints as numbers (XML-RPC sends decimal strings),
  datetimes as ``YYYYMMDDTHH:MM:SSZ`` strings; an int sent as a number or a string is
  taken either way;
- a request without a method or an id, or that is not JSON, gets no JSON-RPC error
  object: xapi answers it with a bare HTTP 500 (the server's part, ``server.py``).

Which values are ints comes from the schema: a record's fields, a field getter's type,
the events of ``event.from``/``event.next``, and the few messages whose result is an int.
"""

from __future__ import annotations

import json
import xmlrpc.client
from dataclasses import dataclass
from typing import cast

from .schema import FieldType, schema

# explicit messages whose result is an int (xenapi.json "result": ["int", ...])
INT_RESULTS = {"host.compute_free_memory", "host.compute_memory_overhead", "VM.compute_memory_overhead"}


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    params: tuple[object, ...]
    id: int | str
    version: str  # "1.0" or "2.0"


def parse(body: bytes) -> Call:
    """The call a request body makes; ``ValueError`` for one xapi would not read."""
    request = json.loads(body)
    if not isinstance(request, dict):
        raise ValueError("not a JSON-RPC request object")
    method, params, call_id = request.get("method"), request.get("params", []), request.get("id")
    if not isinstance(method, str) or isinstance(call_id, bool) or not isinstance(call_id, int | str):
        raise ValueError("a JSON-RPC request needs a method and an id")
    if not isinstance(params, list):
        raise ValueError("params are positional")
    version = "2.0" if request.get("jsonrpc") == "2.0" else "1.0"
    return Call(method, tuple(params), call_id, version)


def answer(call: Call, envelope: dict[str, object]) -> bytes:
    """The JSON-RPC answer to ``call`` for xapi's ``{Status, Value | ErrorDescription}``."""
    failed = envelope.get("Status") != "Success"
    if failed:
        description = [str(p) for p in cast("list[object]", envelope.get("ErrorDescription", ["INTERNAL_ERROR"]))]
        if call.version == "2.0":
            out: dict[str, object] = {
                "jsonrpc": "2.0",
                "error": {"code": 1, "message": description[0], "data": description[1:]},
                "id": call.id,
            }
        else:
            out = {"result": None, "error": description, "id": call.id}
    elif call.version == "2.0":
        out = {"jsonrpc": "2.0", "result": to_json(envelope.get("Value"), call.method), "id": call.id}
    else:
        out = {"result": to_json(envelope.get("Value"), call.method), "error": None, "id": call.id}
    return json.dumps(out).encode("utf-8")


def to_json(value: object, method: str) -> object:
    """A call's result with the JSON types xapi gives it."""
    name = method.removeprefix("Async.")
    if name != method:
        return value  # a task ref
    cls, _, message = name.partition(".")
    classes = schema()
    if name in INT_RESULTS:
        return _int(value)
    if name == "event.from" and isinstance(value, dict):
        events = [_event(e) for e in value.get("events", [])]
        counts = {k: _int(v) for k, v in dict(value.get("valid_ref_counts", {})).items()}
        return {**value, "events": events, "valid_ref_counts": counts}
    if name == "event.next" and isinstance(value, list):
        return [_event(e) for e in value]
    if cls not in classes:
        return _plain(value)
    fields = classes[cls].fields
    if message == "get_record" and isinstance(value, dict):
        return _record(cls, value)
    if message in ("get_all_records", "get_all_records_where") and isinstance(value, dict):
        return {ref: _record(cls, record) for ref, record in value.items()}
    field = fields.get(message.removeprefix("get_")) if message.startswith("get_") else None
    return _typed(value, field.type) if field is not None else _plain(value)


def _event(event: object) -> object:
    if not isinstance(event, dict) or "snapshot" not in event:
        return _plain(event)
    match = next((c for c in schema() if c.lower() == str(event.get("class", ""))), None)
    snapshot = event["snapshot"]
    return {**event, "snapshot": _record(match, snapshot) if match and isinstance(snapshot, dict) else snapshot}


def _record(cls: str, record: dict[str, object]) -> dict[str, object]:
    fields = schema()[cls].fields
    return {k: _typed(v, fields[k].type) if k in fields else _plain(v) for k, v in record.items()}


def _typed(value: object, kind: FieldType) -> object:
    match kind.kind:
        case "int":
            return _int(value)
        case "set" if isinstance(value, list) and kind.item is not None:
            item = kind.item
            return [_typed(v, item) for v in value]
        case "map" if isinstance(value, dict) and kind.item is not None:
            item = kind.item
            return {k: _typed(v, item) for k, v in value.items()}
    return _plain(value)


def _int(value: object) -> object:
    try:
        return int(str(value))
    except ValueError:
        return value


def _plain(value: object) -> object:
    """Datetimes as xapi's strings, containers through, the rest as they are."""
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
