"""Handlers of the key-value routes (`/v1/kv/*`), mixed into
app.Broker (the route table binds `on_<name>`).

The key-value store holds Celery's results (qclient.celery): a task's state and
result, a group's members, a chord's counter. `POST /v1/kv/get` long-polls like a
result wait: it parks on the broker's job waiters under "kv <key>" (a space is in no
job id, so the two never meet) and is woken by the write that changes one of its keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from qclient.wire import (
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

from qbroker import errors
from qbroker.protocol import Request, Response, encode

if TYPE_CHECKING:
    from qbroker.clock import Clock
    from qbroker.store import Store
    from qbroker.transitions import Effects
    from qbroker.waiters import Waiters

_PREFIX = "kv "  #: waiter keys of the key-value store (see the module docstring)


class KVHandlers:
    """The handlers; app.Broker provides the attributes."""

    store: Store
    clock: Clock
    job_waiters: Waiters
    effects: Effects
    closing: bool

    def _changed(self, keys: list[str]) -> None:
        for key in keys:
            self.job_waiters.notify(_PREFIX + key)

    async def on_kv_get(self, req: Request, body: KVGetRequest) -> Response:
        versions = body.versions or [0] * len(body.keys)
        if len(versions) != len(body.keys):
            raise errors.InvalidField(
                "versions must have one entry per key", field="versions"
            )
        req.body = b""  # a parked wait holds its keys, not the bytes
        deadline = trio.current_time() + body.wait
        waits = [_PREFIX + k for k in dict.fromkeys(body.keys)]
        while True:
            # registered before the read, so a write between the two still wakes us
            with self.job_waiters.register(waits, many=True) as slot:
                items = await self.store.kv_get(body.keys, now=self.clock.now())
                changed = any(
                    i.version != v for i, v in zip(items, versions, strict=True)
                )
                if changed or self.closing or trio.current_time() >= deadline:
                    return encode(req, KVGetReply(items=items))
                del items
                with trio.move_on_at(deadline):
                    await slot.event.wait()

    async def on_kv_set(self, req: Request, body: KVSetRequest) -> Response:
        version = await self.store.kv_set(
            body.key, body.value, body.ttl, now=self.clock.now()
        )
        self._changed([body.key])
        return encode(req, KVVersionReply(version=version))

    async def on_kv_incr(self, req: Request, body: KVIncrRequest) -> Response:
        value, version = await self.store.kv_incr(
            body.key, body.by, body.ttl, now=self.clock.now()
        )
        self._changed([body.key])
        return encode(req, KVIncrReply(value=value, version=version))

    async def on_kv_expire(self, req: Request, body: KVExpireRequest) -> Response:
        found = await self.store.kv_expire(body.key, body.ttl, now=self.clock.now())
        return encode(req, CountReply(count=found))

    async def on_kv_delete(self, req: Request, body: KVDeleteRequest) -> Response:
        count = await self.store.kv_delete(body.keys, now=self.clock.now())
        self._changed(body.keys)
        return encode(req, CountReply(count=count))
