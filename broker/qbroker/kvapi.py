"""Handlers of the key-value endpoints (`/v1/kv/*`) and of a queue purge.

The key-value store holds small values with a TTL for the Celery result backend
(qclient.celery): a task's state and result, a group's members, a chord's counter.
`POST /v1/kv/get` long-polls like a result wait: it parks on the broker's job waiters
under "kv <key>" (a space is in no job id, so the two never meet) and is woken by the
write that changes one of its keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from qclient.wire import (
    CountReply,
    KVDeleteRequest,
    KVExpireRequest,
    KVGetReply,
    KVGetRequest,
    KVIncrReply,
    KVIncrRequest,
    KVItem,
    KVSetRequest,
    KVVersionReply,
)

from qbroker import errors, kvstore, metrics
from qbroker.protocol import Request, Response, decode, encode

if TYPE_CHECKING:
    from qbroker.app import Broker

Handler = Callable[[Request], Awaitable[Response]]
_PREFIX = "kv "  #: waiter keys of the key-value store (see the module docstring)


class KVHandlers:
    """The handlers, over one Broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._created = False

    def table(self) -> dict[str, Handler]:
        return {
            "kv_get": self.on_get,
            "kv_set": self.on_set,
            "kv_incr": self.on_incr,
            "kv_expire": self.on_expire,
            "kv_delete": self.on_delete,
            "purge": self.on_purge,
        }

    async def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await self._create()
        return await self.broker.writer.call(
            fn, self.broker.store.conn, *args, **kwargs
        )

    async def _create(self) -> None:
        if not self._created:
            await self.broker.writer.call(kvstore.create, self.broker.store.conn)
            self._created = True

    def _changed(self, keys: list[str]) -> None:
        for key in keys:
            self.broker.job_waiters.notify(_PREFIX + key)

    async def on_get(self, req: Request) -> Response:
        body = decode(req, KVGetRequest)
        versions = body.versions or [0] * len(body.keys)
        if len(versions) != len(body.keys):
            raise errors.InvalidField(
                "versions must have one entry per key", field="versions"
            )
        await self._create()
        broker = self.broker
        path = broker.store.path
        deadline = trio.current_time() + body.wait
        while True:
            # registered before the read, so a write between the two still wakes us
            keys = [_PREFIX + k for k in dict.fromkeys(body.keys)]
            with broker.job_waiters.register(keys, many=True) as slot:
                items: list[KVItem] = await broker.reads.call(
                    lambda: kvstore.get(path, body.keys, now=broker.clock.now())
                )
                changed = any(
                    i.version != v for i, v in zip(items, versions, strict=True)
                )
                if changed or broker.closing or trio.current_time() >= deadline:
                    return encode(req, KVGetReply(items=items))
                with trio.move_on_at(deadline):
                    await slot.event.wait()

    async def on_set(self, req: Request) -> Response:
        body = decode(req, KVSetRequest)
        version = await self._write(
            kvstore.set_value,
            body.key,
            body.value,
            body.ttl,
            now=self.broker.clock.now(),
        )
        self._changed([body.key])
        return encode(req, KVVersionReply(version=version))

    async def on_incr(self, req: Request) -> Response:
        body = decode(req, KVIncrRequest)
        value, version = await self._write(
            kvstore.incr, body.key, body.by, body.ttl, now=self.broker.clock.now()
        )
        self._changed([body.key])
        return encode(req, KVIncrReply(value=value, version=version))

    async def on_expire(self, req: Request) -> Response:
        body = decode(req, KVExpireRequest)
        found = await self._write(
            kvstore.expire, body.key, body.ttl, now=self.broker.clock.now()
        )
        return encode(req, CountReply(count=found))

    async def on_delete(self, req: Request) -> Response:
        body = decode(req, KVDeleteRequest)
        count = await self._write(
            kvstore.delete, body.keys, now=self.broker.clock.now()
        )
        self._changed(body.keys)
        return encode(req, CountReply(count=count))

    async def on_purge(self, req: Request) -> Response:
        queue = req.params["queue"]
        broker = self.broker
        total = 0
        while True:  # in batches, so other writes get their turn between them
            ids: list[str] = await broker.writer.call(
                kvstore.purge_queue, broker.store.conn, queue, now=broker.clock.now()
            )
            total += len(ids)
            broker.finished(ids)
            if ids:
                metrics.count_finished(Counter({(queue, "cancelled"): len(ids)}))
            if len(ids) < kvstore.PURGE_BATCH:
                return encode(req, CountReply(count=total))
