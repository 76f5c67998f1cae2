"""Sans-IO protocol pieces: requests, routing (by routes.py), body decoding, reply
encoding. No trio, no sockets.

Charter:
  Rule 1: this module turns bytes into typed requests and typed replies into bytes; it
          never touches the store or waits.
  Rule 2: every decoding failure becomes an errors.py error carrying the field it names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
from qclient.wire import ErrorBody, JobState

from qbroker import errors, routes
from qbroker.routes import EnqueueBody as EnqueueBody

T = TypeVar("T")

JSON = b"application/json"
MSGPACK = b"application/msgpack"
_MSGPACK_TYPES = (
    b"application/msgpack",
    b"application/x-msgpack",
    b"application/vnd.msgpack",
)


def _always() -> bool:
    return True


@dataclass(slots=True)
class Request:
    """One HTTP request as the core sees it."""

    method: str
    path: str
    headers: dict[bytes, bytes]  #: lower-cased names; a repeated name keeps the last
    body: bytes = b""
    query: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  #: path parameters
    route: str = "unmatched"
    role: str = ""  #: the token's role (auth.py), set by `Broker.authorize`
    #: whether the client still has its end of the connection open (the server sets
    #: it; a long-poll asks before it takes jobs for a client that may have gone)
    peer_alive: Callable[[], bool] = _always

    @classmethod
    def from_target(
        cls, method: str, target: str, headers: dict[bytes, bytes], body: bytes = b""
    ) -> Request:
        path, _, qs = target.partition("?")
        return cls(method, path, headers, body, dict(parse_qsl(qs)) if qs else {})

    @property
    def content_type(self) -> bytes:
        """The body's media type, lower-cased, without parameters (b"" when none)."""
        return self.headers.get(b"content-type", b"").split(b";")[0].strip().lower()

    @property
    def body_is_msgpack(self) -> bool:
        return self.content_type in _MSGPACK_TYPES

    @property
    def wants_msgpack(self) -> bool:
        accept = self.headers.get(b"accept")
        if accept is None:
            return self.body_is_msgpack
        if b"q=" not in accept:
            return any(t in accept for t in _MSGPACK_TYPES)
        return _accepts_msgpack(accept)


def _accepts_msgpack(accept: bytes) -> bool:
    """Whether an Accept header with q-values names a msgpack type with q > 0."""
    for media_range in accept.split(b","):
        kind, *params = media_range.split(b";")
        if kind.strip().lower() not in _MSGPACK_TYPES:
            continue
        for param in params:
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    close: bool = False  #: close the connection after this reply
    headers: tuple[tuple[bytes, bytes], ...] = ()  #: more header fields for the reply


UI_PATH = "/ui"  #: the dashboard's pages and assets are under this path


def is_ui_path(path: str) -> bool:
    return path == UI_PATH or path.startswith(UI_PATH + "/")


def route(req: Request) -> None:
    """Fill `req.route` and `req.params` from the route table (routes.py).

    Raises:
        errors.NotFound: no route has this path.
        errors.MethodNotAllowed: a route has this path with another method.
    """
    if is_ui_path(req.path):
        if req.method not in ("GET", "HEAD"):
            raise errors.MethodNotAllowed(
                f"{req.method} is not allowed on the dashboard", allow=("GET", "HEAD")
            )
        req.route = "ui"  # the dashboard routes its own pages (ui/)
        return
    name, param, value = routes.match(req.method, req.path)
    req.route = name
    if param is not None and value is not None:
        req.params[param] = value


_json_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_msgpack_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")


def _field_of(message: str) -> str | None:
    """The field a msgspec error names: "... - at `$.jobs[0].priority`" -> "jobs[0].priority"."""
    found = _FIELD_RE.search(message)
    if found is not None:
        return found.group(1) or None
    found = re.search(r"required field `([^`]+)`", message)
    return found.group(1) if found else None


def decode(req: Request, type_: type[T]) -> T:
    """Decode the body as `type_`, as JSON or msgpack by its Content-Type.

    Raises:
        errors.UnsupportedMediaType, errors.MalformedBody, errors.InvalidField
    """
    ctype = req.content_type
    msgpack = ctype in _MSGPACK_TYPES
    try:
        if msgpack:
            dec: Any = _msgpack_decoders.get(type_)
            if dec is None:
                dec = _msgpack_decoders[type_] = msgspec.msgpack.Decoder(type_)
        elif ctype in (b"", JSON, b"application/x-www-form-urlencoded", b"text/plain"):
            # curl -d sends application/x-www-form-urlencoded unless told otherwise
            dec = _json_decoders.get(type_)
            if dec is None:
                dec = _json_decoders[type_] = msgspec.json.Decoder(type_)
        else:
            raise errors.UnsupportedMediaType(
                f"Content-Type {ctype.decode(errors='replace')!r}: use JSON or msgpack"
            )
        if len(req.body) > BIG_BODY:
            _check_lengths(req.body, msgpack, type_)
        result: T = dec.decode(req.body)
        if msgpack:
            _check_json_safe(result)
        return result
    except msgspec.ValidationError as exc:
        raise errors.InvalidField(str(exc), field=_field_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise errors.MalformedBody(f"the body is not valid: {exc}") from exc
    except UnicodeDecodeError as exc:  # msgspec raises it for a string's bad UTF-8
        raise errors.MalformedBody(f"the body is not valid UTF-8: {exc}") from exc
    except RecursionError as exc:
        raise errors.MalformedBody("the body nests too deeply") from exc


#: bytes past which `decode` counts a body's bounded lists before it decodes their
#: items (and the enqueue handler decodes off the loop)
BIG_BODY = 64 * 1024
#: per struct type: its lists that have a max_length, and a struct that decodes only
#: them, as raw items (None: it has none)
_list_shapes: dict[Any, tuple[type, dict[str, int]] | None] = {}


def _list_shape(type_: Any) -> tuple[type, dict[str, int]] | None:
    shape = _list_shapes.get(type_, ...)
    if shape is not ...:
        return shape
    limits: dict[str, int] = {}
    info = msgspec.inspect.type_info(type_)
    for f in getattr(info, "fields", ()):
        kinds = (
            f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else [f.type]
        )
        for kind in kinds:
            if (
                isinstance(kind, msgspec.inspect.ListType)
                and kind.max_length is not None
            ):
                limits[f.encode_name] = kind.max_length
    shape = None
    if limits:
        fields = [(name, list[msgspec.Raw] | None, None) for name in limits]
        shape = (msgspec.defstruct(f"{type_.__name__}Lengths", fields), limits)
    _list_shapes[type_] = shape
    return shape


def _check_lengths(body: bytes, msgpack: bool, type_: Any) -> None:
    """Refuse a list over its max_length before decoding a single item of it.

    Raw items are not tracked by Python's garbage collector; structs are. Decoding
    300,000 tiny jobs as structs only to refuse them took a second, mostly in
    collections that hold the GIL (and so stall every other client); counting them
    as raw items took 30 ms. Anything else wrong with the body: `decode` says what.

    Raises:
        errors.InvalidField
    """
    shape = _list_shape(type_)
    if shape is None:
        return
    struct, limits = shape
    try:
        lengths = (msgspec.msgpack if msgpack else msgspec.json).decode(
            body, type=struct
        )
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return
    for name, limit in limits.items():
        items = getattr(lengths, name)
        if items is not None and len(items) > limit:
            raise errors.InvalidField(
                f"Expected `array` of length <= {limit} - at `$.{name}`", field=name
            )


def _check_json_safe(value: Any) -> None:
    """Refuse msgpack values that a JSON reply could not carry: ext types and map keys
    that are not strings or numbers. Stored, they would make every JSON read or lease
    of the job fail (500) long after the enqueue was acknowledged.

    Raises:
        errors.InvalidField
    """
    try:
        _json_encoder.encode(value)
    except TypeError as exc:
        raise errors.InvalidField(
            f"a value JSON cannot carry ({exc}); use no msgpack ext types, and only"
            " string or number map keys"
        ) from exc


_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z", re.ASCII)


def query_float(
    req: Request, name: str, *, default: float, low: float, high: float
) -> float:
    """A float query parameter within [low, high].

    Raises:
        errors.InvalidField: not a number, or out of range.
    """
    raw = req.query.get(name)
    if raw is None:
        return default
    if _DECIMAL_RE.match(raw) is None:  # float() alone would take "1_0" and " nan"
        raise errors.InvalidField(f"{name} must be a number", field=name)
    value = float(raw)
    if not low <= value <= high:
        raise errors.InvalidField(f"{name} must be within [{low}, {high}]", field=name)
    return value


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def encode(req: Request | None, obj: Any, status: int = 200) -> Response:
    """Encode a reply as msgpack when the request asks for it, else JSON."""
    if req is not None and req.wants_msgpack:
        return Response(status, _msgpack_encoder.encode(obj), MSGPACK)
    return Response(status, _json_encoder.encode(obj), JSON)


# errors after which the connection cannot (or should not) carry another request
_CLOSING_REASONS = frozenset(
    {"bad_request", "request_timeout", "body_too_large", "too_many_connections",
     "headers_too_large", "internal_error", "shutting_down", "unauthorized"}
)  # fmt: skip


def error_response(req: Request | None, exc: errors.QBrokerError) -> Response:
    """The reply for an error: its status and an ErrorBody."""
    roles = list(exc.roles) if isinstance(exc, errors.Forbidden) else None
    state = JobState(exc.state) if isinstance(exc, errors.InvalidState) else None
    body = ErrorBody(
        error=exc.reason, message=exc.message, field=exc.field, roles=roles, state=state
    )
    resp = encode(req, body, exc.status)
    resp.close = exc.reason in _CLOSING_REASONS
    if isinstance(exc, errors.MethodNotAllowed):
        resp.headers = ((b"allow", ", ".join(exc.allow).encode()),)
    return resp
