"""A Celery result backend that keeps results in the broker: `result_backend = "qbroker://host:7733"`.

Celery's key-value backend base does the work (task meta, groups, chords counted with
`incr`, so no `chord_unlock` polling task); this class maps its six calls onto the
broker's `/v1/kv/*` endpoints and replaces its polling waits with long-polls:
`AsyncResult.get()` returns as soon as the worker stores the result, not at the next
half-second poll.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError

from qclient import ProtocolError
from qclient.celery._rest import Rest
from qclient.wire import (
    MAX_KEYS,
    CountReply,
    KVDeleteRequest,
    KVExpireRequest,
    KVGetReply,
    KVGetRequest,
    KVIncrReply,
    KVIncrRequest,
    KVSetRequest,
    KVVersionReply,
)

__all__ = ["ResultBackend", "broker_url"]

LONG_POLL = 30.0  #: seconds of one result long-poll when the caller sets no timeout
DEFAULT_PORT = 7733
GATHER = 0.05  #: seconds get_many waits between rounds, to gather results as they come


def broker_url(url: str | None) -> tuple[str, str | None]:
    """`qbroker://[:TOKEN@]host[:port]` -> ("http://host:port", TOKEN or None).

    A URL without a host means the broker of QBROKER_URL (else 127.0.0.1:7733).
    """
    if not url:
        return "", None
    parts = urlsplit(url)
    if not parts.hostname:
        return "", unquote(parts.password) if parts.password else None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    token = unquote(parts.password) if parts.password else None
    return f"http://{host}:{parts.port or DEFAULT_PORT}", token


class ResultBackend(KeyValueStoreBackend):  # type: ignore[misc]  # celery is untyped
    """Results in the broker's key-value store, kept `result_expires` seconds."""

    supports_native_join = True
    supports_autoexpire = True
    implements_incr = True
    key_t = str

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        base, token = broker_url(url)
        self.rest = Rest(
            base or os.environ.get("QBROKER_URL") or f"http://127.0.0.1:{DEFAULT_PORT}",
            token or os.environ.get("QBROKER_TOKEN"),
        )

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    # ------------------------------------------------------------ the six calls

    def _ttl(self, seconds: Any) -> float | None:
        return float(seconds) if seconds else None

    def get(self, key: str) -> Any:
        return self._items([key], [0], 0.0)[0].value

    def mget(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        out: list[Any] = []
        for start in range(0, len(keys), MAX_KEYS):
            chunk = keys[start : start + MAX_KEYS]
            out += [i.value for i in self._items(chunk, [0] * len(chunk), 0.0)]
        return out

    def set(self, key: str, value: Any) -> None:
        request = KVSetRequest(key=key, value=value, ttl=self._ttl(self.expires))
        self.rest.post("/v1/kv/set", request, KVVersionReply)

    def delete(self, key: str) -> None:
        self.rest.post("/v1/kv/delete", KVDeleteRequest(keys=[key]), CountReply)

    def incr(self, key: str) -> int:
        request = KVIncrRequest(key=key, by=1, ttl=self._ttl(self.chord_expires))
        # not resent after a lost reply: a second +1 would skip the chord's count
        reply = self.rest.post("/v1/kv/incr", request, KVIncrReply, resend=False)
        return reply.value

    def expire(self, key: str, value: Any) -> None:
        request = KVExpireRequest(key=key, ttl=self._ttl(value))
        self.rest.post("/v1/kv/expire", request, CountReply)

    def _items(self, keys: list[str], versions: list[int], wait: float) -> list[Any]:
        request = KVGetRequest(keys=keys, versions=versions, wait=wait)
        return self.rest.post("/v1/kv/get", request, KVGetReply, wait).items

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, ProtocolError)

    # ------------------------------------------------------------ long-poll waits

    def _meta(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {"status": states.PENDING, "result": None}
        meta: dict[str, Any] = self.decode_result(value)
        return meta

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> dict[str, Any]:
        """Wait for a task's result by long-polls (`interval` is not needed).

        Raises:
            celery.exceptions.TimeoutError: not ready after `timeout` seconds.
        """
        self._ensure_not_eager()
        key = self.get_key_for_task(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        version = 0
        while True:
            wait = _wait_left(deadline)
            item = self._items([key], [version], wait)[0]
            version = item.version
            meta = self._meta(item.value)
            if meta["status"] in states.READY_STATES:
                self._cache[task_id] = meta
                return meta
            if on_interval:
                on_interval()
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeoutError("The operation timed out.")

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,  # Celery's name
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (task id, meta) as each task is ready, by long-polls over all of them."""
        pending: dict[str, int] = {}  #: task id -> version last seen
        for task_id in dict.fromkeys(str(t) for t in task_ids):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                yield task_id, cached
            else:
                pending[task_id] = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        iterations = 0
        while pending:
            ids = list(pending)[:MAX_KEYS]
            keys = [self.get_key_for_task(t) for t in ids]
            wait = _wait_left(deadline)
            items = self._items(keys, [pending[t] for t in ids], wait)
            for task_id, item in zip(ids, items, strict=True):
                pending[task_id] = item.version
                meta = self._meta(item.value)
                if meta["status"] in READY_STATES:
                    del pending[task_id]
                    self._cache[task_id] = meta
                    if on_message is not None:
                        on_message(meta)
                    yield task_id, meta
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            if len(items) > 1:
                # Results of a group trickle in one by one; each wakes the long-poll,
                # which reads every pending key again. A short pause lets the next
                # round carry a batch of them instead (1,000 results: 1,000 rounds).
                time.sleep(GATHER)
            iterations += 1
            if max_iterations and iterations >= max_iterations:
                break


def _wait_left(deadline: float | None) -> float:
    if deadline is None:
        return LONG_POLL
    return max(0.0, min(LONG_POLL, deadline - time.monotonic()))
