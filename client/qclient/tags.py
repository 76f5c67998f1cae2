"""Tagged values: the Python types JSON lacks, carried through the wire and back.

A job's `args`, `kwargs` and `result` travel as JSON-like data (JSON or msgpack). Left
alone, a `datetime` would arrive in the task as a `str` and a `set` as a list, without
a word. So the client tags such values before it sends them, and the worker untags
them before it calls the task (and the other way round for a task's result), as
kombu's JSON serializer does since kombu 5.3. A tagged value is an object with
exactly these two keys (protocol.md, "Tagged values"):

    {"__type__": "datetime", "__value__": "2025-01-31T12:00:00+00:00"}

| `__type__`  | Python type        | `__value__`                                  |
|-------------|--------------------|----------------------------------------------|
| datetime    | datetime.datetime  | ISO 8601 text, its offset if it has one      |
| date        | datetime.date      | ISO 8601 text, "2025-01-31"                  |
| time        | datetime.time      | ISO 8601 text, "12:00:00"                    |
| decimal     | decimal.Decimal    | its text, "1.10"                             |
| uuid        | uuid.UUID          | {"hex": "<32 hex digits>"}                   |
| base64      | bytes, bytearray   | standard base64 text                         |
| set         | set                | an array of the (tagged) members             |
| frozenset   | frozenset          | an array of the (tagged) members             |

The first six are kombu's own markers, so a Celery producer's JSON arguments read the
same; `set` and `frozenset` are qbroker's. Tuples become arrays (lists), as in any JSON.
Values inside other objects (dataclasses, msgspec Structs) are left to msgspec, which
writes them as plain JSON. This module needs only the standard library.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final

__all__ = ["TYPE_KEY", "VALUE_KEY", "tag", "untag"]

TYPE_KEY: Final = "__type__"
VALUE_KEY: Final = "__value__"

#: Types JSON and msgpack carry as they are; `tag` returns them untouched.
_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


def _members(value: set[Any] | frozenset[Any]) -> list[Any]:
    return [tag(member) for member in value]


#: Exact type -> (marker, encoder). datetime is a subclass of date, so lookups are
#: by exact type first; a subclass falls back to the isinstance scan in `_encoder`.
_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], Any]]]] = {
    datetime: ("datetime", datetime.isoformat),
    date: ("date", date.isoformat),
    time: ("time", time.isoformat),
    Decimal: ("decimal", str),
    uuid.UUID: ("uuid", lambda u: {"hex": u.hex}),
    bytes: ("base64", lambda b: base64.b64encode(b).decode("ascii")),
    bytearray: ("base64", lambda b: base64.b64encode(b).decode("ascii")),
    set: ("set", _members),
    frozenset: ("frozenset", _members),
}

_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]),
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
    "bytes": lambda v: v.encode("utf-8"),  # kombu's marker for bytes of UTF-8 text
    "set": lambda v: {untag(m) for m in v},
    "frozenset": lambda v: frozenset(untag(m) for m in v),
}


def _encoder(value: Any) -> tuple[str, Callable[[Any], Any]] | None:
    found = _ENCODERS.get(type(value))
    if found is None:
        for cls, pair in _ENCODERS.items():
            if isinstance(value, cls):
                return pair
    return found


def tag(value: Any) -> Any:
    """`value` with every datetime, date, time, Decimal, UUID, bytes, set and
    frozenset in it (at any depth of lists, tuples and dicts) replaced by its tagged
    object. Tagging a tagged value changes nothing.

    Args:
        value: an argument list, a kwargs dict, a result: anything msgspec encodes.

    Returns:
        A value of the same shape that JSON and msgpack carry faithfully; other
        objects (dataclasses, Structs, enums) are left for msgspec to encode.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    plain = _PLAIN  # the checks inline: most arguments are plain, calls cost
    if kind is list or kind is tuple:
        return [item if type(item) in plain else tag(item) for item in value]
    if kind is dict:
        return {
            key: item if type(item) in plain else tag(item)
            for key, item in value.items()
        }
    found = _encoder(value)
    if found is not None:
        marker, encode = found
        return {TYPE_KEY: marker, VALUE_KEY: encode(value)}
    if isinstance(value, list | tuple):  # subclasses: namedtuples and the like
        return [tag(item) for item in value]
    if isinstance(value, dict):
        return {key: tag(item) for key, item in value.items()}
    return value


def untag(value: Any) -> Any:
    """`value` with every tagged object in it turned back into its Python value:
    what the worker does to a job's arguments, and `Job.result()` to a result.

    Raises:
        ValueError: a tagged object names a type this version does not know, or its
            value is malformed (say, a datetime that is not ISO 8601).
    """
    kind = type(value)
    if kind is list:
        return [untag(item) for item in value]
    if kind is not dict:
        return value
    if len(value) == 2 and TYPE_KEY in value and VALUE_KEY in value:
        marker = value[TYPE_KEY]
        decode = _DECODERS.get(marker) if isinstance(marker, str) else None
        if decode is None:
            raise ValueError(f"unknown tagged value type {marker!r}")
        try:
            return decode(value[VALUE_KEY])
        except (
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            ArithmeticError,
        ) as exc:
            raise ValueError(f"malformed tagged {marker}: {exc}") from exc
    return {key: untag(item) for key, item in value.items()}
