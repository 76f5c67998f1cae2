"""The dashboard's reads: the broker's own API, called in-process.

A page asks for what it shows through the same routes, handlers and token check as a
client over HTTP (`GET /v1/queues`, `GET /v1/jobs?...`), so what the dashboard shows
is what the documented API says, an endpoint the broker lacks shows as a message, and
each page can list the curl commands that fetch the same data.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import msgspec

from qbroker import errors, protocol
from qbroker.clock import Clock
from qbroker.config import Config

_decode = msgspec.json.Decoder().decode


class Broker(Protocol):
    """What the dashboard needs of app.Broker (which imports this package)."""

    config: Config
    clock: Clock

    @property
    def needs_token(self) -> bool: ...

    def authorize(self, req: protocol.Request) -> None: ...

    def start(self, req: protocol.Request) -> Awaitable[protocol.Response]: ...


class ApiError(Exception):
    """An error reply of an in-process call: its status and ErrorBody fields."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def target(path: str, query: dict[str, str] | None = None) -> str:
    return path + ("?" + urlencode(query, quote_via=quote) if query else "")


class Api:
    """In-process calls made with one browser request's credentials.

    Args:
        broker: the running broker.
        authorization: the Authorization header to send (None: none).
    """

    def __init__(self, broker: Broker, authorization: bytes | None) -> None:
        self._broker = broker
        self.authorization = authorization
        self.calls: list[tuple[str, str, str | None]] = []  #: (method, target, body)

    async def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        """The decoded JSON reply of `GET path?query`.

        Raises:
            ApiError: the broker answered with an error (4xx/5xx).
        """
        tgt = target(path, query)
        self.calls.append(("GET", tgt, None))
        headers = {b"accept": b"application/json"}
        if self.authorization is not None:
            headers[b"authorization"] = self.authorization
        req = protocol.Request.from_target("GET", tgt, headers)
        try:
            self._broker.authorize(req)
            protocol.route(req)
            resp = await self._broker.start(req)
        except errors.QBrokerError as exc:
            raise ApiError(exc.status, exc.reason, exc.message) from None
        body = _decode(resp.body) if resp.body else None
        if resp.status >= 400:
            body = body if isinstance(body, dict) else {}
            raise ApiError(
                resp.status, str(body.get("error")), str(body.get("message"))
            )
        return body

    async def try_get(
        self, path: str, query: dict[str, str] | None = None
    ) -> tuple[Any, ApiError | None]:
        """`get`, with its error returned instead of raised (None, error)."""
        try:
            return await self.get(path, query), None
        except ApiError as exc:
            if exc.status == 401:
                raise
            return None, exc
