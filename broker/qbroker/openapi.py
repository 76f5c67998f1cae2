"""The OpenAPI 3.1 document, generated from the wire structs (`GET /v1/openapi.json`)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from qclient import wire

from qbroker import __version__

_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": wire.NAME_PATTERN},
}
_QUEUE = {**_ID, "name": "queue"}
_WAIT = {"name": "wait", "in": "query", "required": False,
         "schema": {"type": "number", "minimum": 0, "maximum": 300}}  # fmt: skip
_EMPTY = {"type": "object", "maxProperties": 0}
_FAIL_REPLY = {
    "type": "object",
    "properties": {"state": {"enum": ["scheduled", "failed"]}},
    "required": ["state"],
}
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
_CONFLICTS = {"enqueue", "ack", "fail", "extend", "release"}  #: ops that can get 409

# path -> method -> (operationId, params, request struct, reply struct or schema, status)
_OPERATIONS: dict[str, dict[str, tuple[str, list[Any], Any, Any, str]]] = {
    "/v1/queues/{queue}/jobs": {
        "post": ("enqueue", [_QUEUE], "enqueue", "enqueue", "201")
    },
    "/v1/lease": {"post": ("lease", [], wire.LeaseRequest, wire.LeaseReply, "200")},
    "/v1/jobs/{id}/ack": {"post": ("ack", [_ID], wire.AckRequest, _EMPTY, "200")},
    "/v1/jobs/{id}/fail": {
        "post": ("fail", [_ID], wire.FailRequest, _FAIL_REPLY, "200")
    },
    "/v1/jobs/{id}/extend": {
        "post": ("extend", [_ID], wire.ExtendRequest, wire.ExtendReply, "200")
    },
    "/v1/jobs/{id}/release": {
        "post": ("release", [_ID], wire.ReleaseRequest, _EMPTY, "200")
    },
    "/v1/jobs/{id}/cancel": {"post": ("cancel", [_ID], None, wire.CancelReply, "200")},
    "/v1/ack": {"post": ("ack_many", [], wire.AckManyRequest, wire.BatchReply, "200")},
    "/v1/fail": {
        "post": ("fail_many", [], wire.FailManyRequest, wire.BatchReply, "200")
    },
    "/v1/release": {
        "post": ("release_many", [], wire.ReleaseManyRequest, wire.BatchReply, "200")
    },
    "/v1/jobs/{id}": {"get": ("get_job", [_ID], None, wire.JobRecord, "200")},
    "/v1/jobs/{id}/result": {
        "get": ("job_result", [_ID, _WAIT], None, wire.JobRecord, "200")
    },
    "/v1/results": {
        "post": ("results", [], wire.ResultsRequest, wire.ResultsReply, "200")
    },
    "/v1/queues": {"get": ("queues", [], None, wire.QueueList, "200")},
    "/v1/queues/{queue}": {"get": ("queue", [_QUEUE], None, wire.QueueStats, "200")},
    "/healthz": {"get": ("healthz", [], None, wire.Health, "200")},
}

_STRUCTS: list[Any] = [
    wire.JobSpec, wire.EnqueueManyRequest, wire.EnqueueReply, wire.EnqueueManyReply,
    wire.LeaseRequest, wire.LeaseReply, wire.AckRequest, wire.FailRequest,
    wire.ExtendRequest, wire.ExtendReply, wire.ReleaseRequest, wire.CancelReply,
    wire.ReleaseItem, wire.ReleaseManyRequest,
    wire.AckManyRequest, wire.FailManyRequest, wire.BatchReply, wire.JobRecord,
    wire.QueueList, wire.QueueStats, wire.Health, wire.ErrorBody,
    wire.ResultsRequest, wire.ResultsReply,
]  # fmt: skip


def _ref(t: Any) -> dict[str, Any]:
    if isinstance(t, dict):
        return t
    if t == "enqueue":
        return {"oneOf": [_ref(wire.JobSpec), _ref(wire.EnqueueManyRequest)]}
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {t: {"schema": schema} for t in ("application/json", "application/msgpack")}


def document() -> dict[str, Any]:
    """The whole OpenAPI document as a dict."""
    _, components = msgspec.json.schema_components(
        _STRUCTS, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, Any] = {}
    for path, methods in _OPERATIONS.items():
        paths[path] = {}
        for method, (op_id, params, request, reply, status) in methods.items():
            reply_schema = (
                {"oneOf": [_ref(wire.EnqueueReply), _ref(wire.EnqueueManyReply)]}
                if reply == "enqueue"
                else _ref(reply)
            )
            responses: dict[str, Any] = {
                status: {"description": "success", "content": _content(reply_schema)}
            }
            codes = dict(_ERRORS)
            if request is not None or op_id == "job_result":  # a body, or ?wait=
                codes.update(_BODY_ERRORS)
            if op_id in _CONFLICTS:
                codes["409"] = "stale lease or duplicate"
            if method == "post":
                codes["507"] = "disk full, or (enqueue) under --min-free-disk"
            for code, text in sorted(codes.items()):
                responses[code] = {
                    "description": text,
                    "content": _content(_ref(wire.ErrorBody)),
                }
            op: dict[str, Any] = {
                "operationId": op_id,
                "parameters": params,
                "responses": responses,
            }
            if request is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": _content(_ref(request)),
                }
            paths[path][method] = op
    for path, op_id, ctype in (
        ("/metrics", "metrics", "text/plain"),
        ("/v1/openapi.json", "openapi", "application/json"),
    ):
        paths[path] = {
            "get": {
                "operationId": op_id,
                "responses": {
                    "200": {"description": "success", "content": {ctype: {}}},
                    "401": {"description": "token missing or wrong"},
                    "403": {"description": "the token's role may not (read needed)"},
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "qbroker", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())
