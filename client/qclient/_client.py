"""What `Client` and `AsyncClient` share: their settings, and the sans-IO steps of
driving an operation; and what `Job` and `AsyncJob` share.

A driver runs an operation (`_ops`) like this, with its own I/O in the two places
marked:

    op = operation(codec, ...)
    step = advance(op, None)
    while isinstance(step, Request):
        retry = client._retry(step)
        while isinstance(pause := retry.decide(<one attempt>, now), float):
            <sleep pause>
        step = advance(op, pause)        # the reply, or the error to raise in op
    return step.value
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Concatenate, Generic, ParamSpec, TypeVar

from qclient._errors import QClientError
from qclient._http import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Codec,
    Encoding,
    Response,
)
from qclient._retry import Request, Retry
from qclient._tls import client_context

if TYPE_CHECKING:
    import ssl

__all__ = ["ClientBase", "Done", "HandleBase", "Op", "Operation", "advance"]

T = TypeVar("T")
C = TypeVar("C")
P = ParamSpec("P")

#: An operation: yields the requests it needs answered, gets each reply sent back
#: (or its error thrown in), and returns the call's value.
Op = Generator[Request, Response, T]
#: A function of `_ops`: a codec and the call's arguments make an operation.
Operation = Callable[Concatenate[Codec, P], Op[T]]


class Done(Generic[T]):
    """An operation's return value."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


def advance(op: Op[T], reply: Response | QClientError | None) -> Request | Done[T]:
    """Run `op` to its next request, handing it `reply` (None to start it; an error
    is raised inside it, where it may add to it, as `send()` adds the job ids).

    Raises:
        Whatever the operation raises.
    """
    try:
        if reply is None:
            return next(op)
        if isinstance(reply, Response):
            return op.send(reply)
        return op.throw(reply)
    except StopIteration as stop:
        return Done(stop.value)


class ClientBase:
    """The settings of a client; see `Client` for the arguments. A subclass opens
    its transport in `_open()`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        encoding: Encoding = "msgpack",
        ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.url: str = url or os.environ.get("QBROKER_URL") or DEFAULT_URL
        if token is None:
            token = os.environ.get("QBROKER_TOKEN")
        self.timeout = timeout
        self.retries = retries
        self.encoding: Encoding = encoding
        self._codec = Codec(self.url, token, encoding)
        #: how an https:// client verifies the broker (None: plain http)
        self._tls: ssl.SSLContext | None = (
            client_context(ca) if self._codec.tls else None
        )
        self._open()

    def _open(self) -> None:
        """Set up the connection pool (no connection is made yet)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<qclient.{type(self).__name__} {self.url} {self.encoding}>"

    def _retry(self, request: Request) -> Retry:
        """The retry policy of one request, starting now."""
        return Retry(
            self._codec,
            request,
            url=self.url,
            timeout=self.timeout,
            retries=self.retries,
            now=time.monotonic(),
        )


class HandleBase(Generic[C]):
    """A handle on one job: its id, and the client it talks through. Cheap to make,
    it holds no state beyond its id; every method asks the broker.

    Attributes:
        id: the job's id.
        queue: its queue, or None when the handle was made from an id alone.
        client: the client it talks through.
    """

    __slots__ = ("client", "id", "queue")

    def __init__(self, id: str, queue: str | None, client: C) -> None:
        self.id = id
        self.queue = queue
        self.client = client

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} queue={self.queue!r}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and getattr(other, "id", None) == self.id

    def __hash__(self) -> int:
        return hash(self.id)
