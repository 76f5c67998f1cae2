"""The OpenAPI 3.1 document (`GET /v1/openapi.json`), generated from the route table
and the wire structs it names."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec
from qclient import wire

from qbroker import __version__
from qbroker.routes import ROUTES, Route

#: query parameters by name (routes.Route.query)
QUERY = {
    "wait": {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 300}},
    "state": {"name": "state", "in": "query", "required": False,
              "schema": {"type": "string", "enum": [s.value for s in wire.JobState]}},
    "queue": {"name": "queue", "in": "query", "required": False,
              "schema": {"type": "string", "pattern": wire.NAME_PATTERN}},
    "task": {"name": "task", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": wire.NAME_PATTERN}},
    "schedule": {"name": "schedule", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": wire.NAME_PATTERN}},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    "cursor": {"name": "cursor", "in": "query", "required": False,
               "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,18}$"}},
}  # fmt: skip
#: the errors any request may get (protocol.md, section 4)
_ERRORS = {
    "400": "malformed request or body",
    "401": "token missing or wrong",
    "403": "the token's role may not make this request (`roles` names those that may)",
    "404": "unknown job or path",
    "405": "method not allowed (see the Allow header)",
    "408": "request timeout",
    "429": "too many connections",
    "431": "headers too large",
    "500": "internal error",
    "503": "shutting down, or the database file is gone",
}
_BODY_ERRORS = {
    "413": "body too large",
    "415": "unsupported media type",
    "422": "invalid field",
}


def _ref(t: Any) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _schema(one: Any, forms: tuple[Any, ...]) -> dict[str, Any]:
    return {"oneOf": [_ref(f) for f in forms]} if forms else _ref(one)


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {t: {"schema": schema} for t in ("application/json", "application/msgpack")}


def _path_params(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "pattern": wire.NAME_PATTERN}}
        for name in re.findall(r"\{(\w+)\}", path)
    ]  # fmt: skip


def _operation(route: Route) -> dict[str, Any]:
    if route.reply is None and not route.reply_forms:  # text, or a document
        return {
            "operationId": route.name,
            "responses": {
                "200": {"description": "success", "content": {route.media: {}}},
                "401": {"description": "token missing or wrong"},
                "403": {"description": "the token's role may not (read needed)"},
            },
        }
    responses: dict[str, Any] = {
        str(route.status): {
            "description": "success",
            "content": _content(_schema(route.reply, route.reply_forms)),
        }
    }
    codes = dict(_ERRORS)
    if route.request is not None or route.query:
        codes.update(_BODY_ERRORS)
    if route.conflict:
        codes["409"] = "stale lease, duplicate, or a job in another state"
    if route.method in ("POST", "PUT", "DELETE"):
        codes["507"] = "disk full, or (enqueue, run) under --min-free-disk"
    for code, text in sorted(codes.items()):
        responses[code] = {
            "description": text,
            "content": _content(_ref(wire.ErrorBody)),
        }
    op: dict[str, Any] = {
        "operationId": route.name,
        "parameters": _path_params(route.path) + [QUERY[q] for q in route.query],
        "responses": responses,
    }
    if route.request is not None:
        op["requestBody"] = {
            "required": not route.optional,
            "content": _content(_schema(route.request, route.request_forms)),
        }
    return op


def document() -> dict[str, Any]:
    """The whole OpenAPI document as a dict."""
    structs: dict[str, Any] = {"ErrorBody": wire.ErrorBody}
    for route in ROUTES:
        # a route with two forms is documented as them (EnqueueBody decodes both)
        request = route.request_forms or (route.request,)
        for t in (*request, *(route.reply_forms or (route.reply,))):
            if t is not None:
                structs[t.__name__] = t
    _, components = msgspec.json.schema_components(
        structs.values(), ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "qbroker", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())
