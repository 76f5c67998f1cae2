"""The key-value store's shapes (protocol.md, section 10)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from qclient.wire._core import (
    MAX_SECONDS,
    Name,
    _Struct,
)

__all__ = [
    "MAX_KEYS",
    "CountReply",
    "KVDeleteRequest",
    "KVExpireRequest",
    "KVGetReply",
    "KVGetRequest",
    "KVIncrReply",
    "KVIncrRequest",
    "KVItem",
    "KVSetRequest",
    "KVVersionReply",
]


# ---------------------------------------------------------------- key-value store
# Small values with a TTL kept in the broker: the Celery result backend's storage
# (qclient.celery). A key is a name (NAME_PATTERN); a value is any JSON/msgpack value.

MAX_KEYS = 1000  #: keys one `POST /v1/kv/get` or `/v1/kv/delete` may name
Ttl = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]


class KVGetRequest(_Struct, frozen=True):
    """`POST /v1/kv/get`: read keys; with `wait`, long-poll until one of them has a
    version other than the one given for it (0, the default: absent)."""

    keys: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_KEYS)]
    versions: Annotated[list[int], msgspec.Meta(max_length=MAX_KEYS)] | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0  #: long-poll seconds


class KVItem(_Struct, frozen=True):
    key: str
    value: Any = None  #: null when absent
    version: int = 0  #: grows with every write of any key; 0: absent


class KVGetReply(_Struct, frozen=True):
    items: list[KVItem]  #: one per asked key, in order


class KVSetRequest(_Struct, frozen=True):
    key: Name
    value: Any
    ttl: Ttl | None = None  #: seconds until the key is dropped; null: kept


class KVVersionReply(_Struct, frozen=True):
    version: int


class KVIncrRequest(_Struct, frozen=True):
    """Add `by` to an integer key (an absent key counts as 0), atomically."""

    key: Name
    by: Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)] = 1
    ttl: Ttl | None = None  #: as for set; null keeps the key's own expiry


class KVIncrReply(_Struct, frozen=True):
    value: int
    version: int


class KVExpireRequest(_Struct, frozen=True):
    key: Name
    ttl: Ttl | None = None  #: null: keep it until deleted


class KVDeleteRequest(_Struct, frozen=True):
    keys: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_KEYS)]


class CountReply(_Struct, frozen=True):
    """How many keys a write found (expire, delete) or jobs a purge cancelled."""

    count: int
