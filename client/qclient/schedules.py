"""Blocking calls for a broker's schedules (protocol.md, "Schedules").

    from qclient.schedules import Schedules, ScheduleSpec

    with Schedules("http://broker:7733") as s:
        s.put("add-every-10s", ScheduleSpec(task="add", every=10, args=[3, 4]))
        for record in s.list():
            print(record.name, record.next_run_at, record.words)

Schedule calls are rare admin calls (a worker's start, a deploy script, the CLI), so
this speaks JSON over one plain `http.client` connection instead of the producer
`Client`'s pool.
"""

from __future__ import annotations

import builtins
import http.client
import os
import time
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import msgspec

from qclient._errors import ProtocolError, broker_error
from qclient._tls import client_context, is_certificate_error
from qclient.wire import (
    EnqueueReply,
    ErrorBody,
    JobRecord,
    ScheduledJobList,
    ScheduleList,
    ScheduleRecord,
    ScheduleSpec,
)

__all__ = ["ScheduleRecord", "ScheduleSpec", "Schedules"]

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:7733"
RETRIES = 3  #: resends of an idempotent call after connection trouble
_encode = msgspec.json.Encoder().encode


class Schedules:
    """Read and change a broker's schedules. Not thread-safe: one per thread.

    Args:
        url: the broker's base URL; default: env QBROKER_URL, else
            http://127.0.0.1:7733.
        token: a bearer token; default: env QBROKER_TOKEN.
        timeout: seconds to connect and for each reply.
        retries: resends of an idempotent call (all but `run`) after connection
            trouble, with a growing pause.
        ca: for an https URL, the PEM file of the CA that signed the broker's
            certificate; default: env QBROKER_CA, else the system's CAs.

    Raises:
        ValueError: the URL is not `http(s)://host[:port]`, or the CA file is unusable.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = RETRIES,
        ca: str | None = None,
    ) -> None:
        self.url = url or os.environ.get("QBROKER_URL") or DEFAULT_URL
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"the broker URL must be http(s)://host[:port], not {self.url!r}"
            )
        self._tls = client_context(ca) if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or 7733
        self._prefix = parts.path.rstrip("/")
        token = token if token is not None else os.environ.get("QBROKER_TOKEN")
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self.retries = retries
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Schedules:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def put(self, name: str, spec: ScheduleSpec) -> ScheduleRecord:
        """Create or replace a schedule; a same timing keeps its next run.

        Raises:
            qclient.InvalidRequest: 422 naming the field (bad cron, zone, every, name).
        """
        return self._call("PUT", _path(name), ScheduleRecord, _encode(spec))

    def get(self, name: str) -> ScheduleRecord:
        """Raises: qclient.BrokerError 404 `schedule_not_found`."""
        return self._call("GET", _path(name), ScheduleRecord)

    def list(self) -> list[ScheduleRecord]:
        """Every schedule, by name."""
        return self._call("GET", "/v1/schedules", ScheduleList).schedules

    def delete(self, name: str) -> None:
        """Raises: qclient.BrokerError 404 `schedule_not_found`."""
        self._call("DELETE", _path(name), dict[str, Any])

    def pause(self, name: str) -> ScheduleRecord:
        return self._call("POST", _path(name) + "/pause", ScheduleRecord)

    def resume(self, name: str) -> ScheduleRecord:
        """Missed ticks then follow the schedule's catch_up."""
        return self._call("POST", _path(name) + "/resume", ScheduleRecord)

    def run(self, name: str) -> str:
        """Make one job of the schedule now; returns its id (never resent)."""
        reply = self._call("POST", _path(name) + "/run", EnqueueReply, retry=False)
        return reply.id

    def jobs(self, name: str, limit: int = 100) -> builtins.list[JobRecord]:
        """The schedule's jobs still stored, newest first."""
        path = f"/v1/jobs?schedule={quote(name, safe='')}&limit={limit}"
        return self._call("GET", path, ScheduledJobList).jobs

    def _call(
        self,
        method: str,
        path: str,
        type_: type[T],
        body: bytes | None = None,
        *,
        retry: bool = True,
    ) -> T:
        attempt = 0
        while True:
            if self._conn is None:
                self._conn = (
                    http.client.HTTPSConnection(
                        self._host, self._port, timeout=self.timeout, context=self._tls
                    )
                    if self._tls is not None
                    else http.client.HTTPConnection(
                        self._host, self._port, timeout=self.timeout
                    )
                )
            try:
                self._conn.request(method, self._prefix + path, body, self._headers)
                reply = self._conn.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if not retry or attempt >= self.retries or is_certificate_error(exc):
                    raise ProtocolError(
                        f"{method} {path} to {self.url}: {exc!r}"
                    ) from exc
                time.sleep(0.1 * 2**attempt)
                attempt += 1
                continue
            if reply.status >= 400:
                try:
                    err = msgspec.json.decode(data, type=ErrorBody)
                except msgspec.DecodeError:
                    text = data[:200].decode("utf-8", "replace")
                    raise broker_error(
                        reply.status, f"http_{reply.status}", text
                    ) from None
                raise broker_error(reply.status, err.error, err.message, err.field)
            try:
                return msgspec.json.decode(data, type=type_)
            except msgspec.DecodeError as exc:
                raise ProtocolError(
                    f"undecodable reply to {method} {path}: {exc}"
                ) from exc


def _path(name: str) -> str:
    return "/v1/schedules/" + quote(name, safe="")
