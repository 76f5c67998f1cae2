"""The key-value store's statements (`/v1/kv/*`).

Each function is one unit: the writes run on the writer thread inside its SAVEPOINT
(writer.py), `get` on a reader's connection; `now` is a parameter; only errors.py
errors leave. The table is in schema.py (`_KV`).

A key past its `expires_at` reads as absent; each write drops a few such keys
(EXPIRED_PER_WRITE), so the table does not grow with keys nobody reads again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec
from qclient.wire import KVItem

from qbroker import errors
from qbroker.store.sqlite.schema import translate_errors

EXPIRED_PER_WRITE = 16  #: expired keys each write drops (more than one: they catch up)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def _pack(value: Any) -> bytes:
    try:
        return _encode(value)
    except OverflowError as exc:
        raise errors.InvalidField(
            "integers must lie within -2**63 .. 2**64-1", field="value"
        ) from exc


def _drop_expired(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(
        "DELETE FROM kv WHERE version IN (SELECT version FROM kv"
        " WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?)",
        (now, EXPIRED_PER_WRITE),
    )


def _put(
    conn: sqlite3.Connection, key: str, blob: bytes, expires_at: float | None
) -> int:
    row = conn.execute(
        "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
        " RETURNING version",
        (key, blob, expires_at),
    ).fetchone()
    return int(row[0])


def set_value(
    conn: sqlite3.Connection, key: str, value: Any, ttl: float | None, now: float
) -> int:
    """Store `value` under `key`, kept `ttl` seconds (None: kept). Returns its version."""
    blob = _pack(value)
    with translate_errors():
        _drop_expired(conn, now)
        return _put(conn, key, blob, None if ttl is None else now + ttl)


def incr(
    conn: sqlite3.Connection, key: str, by: int, ttl: float | None, now: float
) -> tuple[int, int]:
    """Add `by` to the integer under `key` (absent or expired: 0); a `ttl` sets the
    expiry, None keeps the key's own. Returns (the new value, the new version).

    Raises:
        errors.InvalidField: the key holds something other than an integer.
    """
    with translate_errors():
        _drop_expired(conn, now)
        row = conn.execute(
            "SELECT value, expires_at FROM kv WHERE key = ?"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (key, now),
        ).fetchone()
        current, expires_at = (0, None) if row is None else (_decode(row[0]), row[1])
        if not isinstance(current, int) or isinstance(current, bool):
            raise errors.InvalidField(
                f"key {key} does not hold an integer", field="key"
            )
        value = current + by
        if ttl is not None:
            expires_at = now + ttl
        return value, _put(conn, key, _pack(value), expires_at)


def expire(conn: sqlite3.Connection, key: str, ttl: float | None, now: float) -> int:
    """Set a key's expiry to `ttl` seconds from now (None: never); its value and
    version stay. Returns 1 if the key exists, else 0."""
    with translate_errors():
        cur = conn.execute(
            "UPDATE kv SET expires_at = ? WHERE key = ?"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (None if ttl is None else now + ttl, key, now),
        )
        return cur.rowcount


def delete(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> int:
    """Drop keys; returns how many existed (unexpired)."""
    marks = ",".join("?" * len(keys))
    with translate_errors():
        cur = conn.execute(
            f"DELETE FROM kv WHERE key IN ({marks}) RETURNING expires_at", list(keys)
        )
        return sum(1 for (at,) in cur.fetchall() if at is None or at > now)


def get(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> list[KVItem]:
    """One item per key, in order; an absent key has version 0."""
    unique = list(dict.fromkeys(keys))
    marks = ",".join("?" * len(unique))
    with translate_errors():
        rows = conn.execute(
            f"SELECT key, value, version FROM kv WHERE key IN ({marks})"
            " AND (expires_at IS NULL OR expires_at > ?)",
            [*unique, now],
        ).fetchall()
    found = {k: KVItem(key=k, value=_decode(v), version=n) for k, v, n in rows}
    return [found.get(k) or KVItem(key=k) for k in keys]
