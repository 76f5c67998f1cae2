"""A kombu virtual transport over qbroker's v1 endpoints: Celery's worker on qbroker.

Theory of operation. kombu's virtual transport keeps exchanges and bindings in memory
and asks its channel for five things: put a message on a queue, get messages, ack,
reject, and count or purge a queue. Here each kombu message is one qbroker job:

- `_put` enqueues the kombu envelope untouched in the job's headers (`kombu`), with the
  Celery task name as the job's `task`, the envelope's `eta` as the job's `eta` (a
  countdown waits in the broker, not in a worker's memory), its `expires` and priority.
  The Celery task id goes in the `celery_id` header; the job id is the broker's own, as
  Celery reuses task ids on `retry()` and `replace()`.
- `_get_many` is one long-poll lease of as many jobs as the channel's prefetch has room
  for. The lease token becomes the message's delivery tag, so `basic_ack` acks the job,
  and a reject or a restore releases it: the job goes back to its queue, never a copy.
- While Celery holds a message unacked (`acks_late`, or a prefetched one waiting for a
  pool slot), a thread extends its lease; a worker that dies stops extending and the
  job goes to another worker when the lease runs out.
- A job on a consumed queue that carries no kombu envelope (sent by qclient or curl) is
  failed at once with the reason, so it never reaches Celery and never loops.

Not thread-safe beyond what kombu asks: the consuming thread gets; acks, rejects and
lease extensions may come from other threads (qclient.Client is thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Iterable
from datetime import datetime
from queue import Empty
from time import time
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual

from qclient import Client, JobNotFound, LeasedJob, ProtocolError, StaleLease
from qclient._errors import BrokerError
from qclient.celery._rest import Rest, queue_path
from qclient.wire import NAME_PATTERN, PurgeReply, ReleaseItem

__all__ = ["Channel", "Transport"]

log = logging.getLogger("qclient.celery")

DEFAULT_PORT = 7733  #: the broker's port when the URL names none
LEASE_SECONDS = 60.0  #: seconds a delivered message's lease lasts between extensions
MAX_PREFETCH = 100  #: jobs one lease takes when Celery sets no prefetch limit
LONG_POLL = 10.0  #: seconds one lease waits for a job when kombu gives no timeout
CONNECT_TIMEOUT = 5.0  #: seconds the connection check at start waits for the broker
POLLING_INTERVAL = 0.1  #: seconds kombu sleeps when the prefetch is full
ENVELOPE = "kombu"  #: the job header holding the kombu message
CELERY_ID = "celery_id"  #: the job header holding Celery's task id
#: the result an early or late Celery ack stores on the job: the job was delivered;
#: how the task ended is in the result backend
DELIVERED = {"celery": "acked"}
_NAME = re.compile(NAME_PATTERN)


def _unix(value: Any) -> float | None:
    """An ISO 8601 time (Celery's `eta`/`expires` headers) as unix seconds."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class QoS(virtual.QoS):
    """Rejects go to the broker: requeue releases the job, no requeue fails it."""

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        channel: Channel = self.channel
        if requeue:
            channel.release(delivery_tag)
        else:
            channel.fail(delivery_tag, "Rejected: Celery rejected the message")
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Release every unacked message (at channel close: a warm shutdown)."""
        self._flush()
        channel: Channel = self.channel
        tags = list(self._delivered)
        self._delivered.clear()
        channel.release_many(tags)
        return []


class Channel(virtual.Channel):
    """One kombu channel over the Transport's qclient.Client."""

    QoS = QoS
    do_restore = True
    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment]  # kombu's is narrower
        *virtual.Channel.from_transport_options,
        "lease_timeout",
        "max_retries",
    )
    lease_timeout = LEASE_SECONDS
    #: lease expiries a job survives before it is dead (None: the broker's default)
    max_retries: int | None = None

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.client: Client = connection.qclient
        self.worker = connection.worker_name
        self._held: dict[str, str] = {}  #: delivery tag (lease token) -> job id
        self._noack_queues: set[str] = set()
        self._stop = threading.Event()
        self._extender: threading.Thread | None = None

    # ------------------------------------------------------------ put

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers") or {}
        props = message.get("properties") or {}
        task = headers.get("task")
        eta = _unix(headers.get("eta"))
        expires_at = _unix(headers.get("expires"))
        now = time()
        expires = None
        if expires_at is not None:
            # a deadline already passed still gets the smallest wait the broker takes
            expires = max(expires_at - now, 0.001)
        meta: dict[str, Any] = {ENVELOPE: message}
        if headers.get("id") is not None:
            meta[CELERY_ID] = str(headers["id"])
        priority = props.get("priority")
        self.client.send(
            queue,
            # a Celery name the broker can't take leaves the job named by its queue
            task=task if isinstance(task, str) and _NAME.match(task) else None,
            eta=eta if eta is not None and eta > now else None,
            expires=expires,
            priority=int(priority) if isinstance(priority, int) else 0,
            headers=meta,
            max_retries=self.max_retries,
            timeout=self.lease_timeout,
        )

    # ------------------------------------------------------------ get

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._noack_queues.discard(queue)
        return super().basic_cancel(consumer_tag)

    def _lease(
        self, queues: list[str], n: int, wait: float
    ) -> list[tuple[str, dict[str, Any]]]:
        """Lease up to `n` jobs; return their queues and envelopes, delivery tags set."""
        jobs = self.client.lease(
            queues, max=n, wait=wait, timeout=self.lease_timeout, worker=self.worker
        )
        messages = []
        for job in jobs:
            message = self._envelope(job)
            if message is None:
                continue
            tag = job.lease
            message["properties"]["delivery_tag"] = tag
            if job.queue in self._noack_queues:
                self._settle(job.id, tag)  # at most once: the consumer asked for it
            else:
                self._held[tag] = job.id
            messages.append((job.queue, message))
        if self._held:
            self._start_extender()
        return messages

    def _envelope(self, job: LeasedJob) -> dict[str, Any] | None:
        """The job's kombu message; a job that has none is failed with the reason."""
        message = job.headers.get(ENVELOPE)
        if (
            isinstance(message, dict)
            and isinstance(message.get("properties"), dict)
            and "body" in message
        ):
            headers = message.get("headers")
            if isinstance(headers, dict) and headers.get("eta") is not None:
                # The broker held the job until its eta. Left in, Celery would
                # schedule it again on its timer thread, which wakes only every
                # second or two: a countdown of 1 s would run up to 2 s late.
                eta = _unix(headers["eta"])
                if eta is not None and eta <= time():
                    headers["eta"] = None
            return message
        reason = (
            f"NotACeleryMessage: job {job.id} on queue {job.queue!r} has no kombu"
            f" envelope in headers[{ENVELOPE!r}]; it was not sent by Celery"
        )
        log.error("qbroker: %s; failed it", reason)
        # if the broker is away, the lease runs out and the next lease fails it
        with contextlib.suppress(BrokerError, ProtocolError):
            self.client.fail(job.id, job.lease, error=reason, retry_in=None)
        return None

    def _get_many(self, queues: list[str], timeout: float | None = None) -> None:
        """Lease what the prefetch has room for from `queues`, waiting up to
        `timeout` seconds, and hand each message to kombu. Raises Empty if none."""
        room = self.qos.can_consume_max_estimate()
        n = MAX_PREFETCH if room is None else min(room, MAX_PREFETCH)
        if n <= 0 or not queues:
            raise Empty()
        wait = LONG_POLL if timeout is None else max(0.0, min(timeout, 300.0))
        messages = self._lease(list(dict.fromkeys(queues)), n, wait)
        if not messages:
            raise Empty()
        for queue, message in messages:
            self.connection._deliver(message, queue)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        messages = self._lease([queue], 1, 0.0)
        if not messages:
            raise Empty()
        return messages[0][1]

    # ------------------------------------------------------------ settle

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        job_id = self._held.pop(delivery_tag, None)
        if job_id is not None:
            self._settle(job_id, delivery_tag)
        super().basic_ack(delivery_tag)

    def _settle(self, job_id: str, tag: str) -> None:
        try:
            self.client.ack(job_id, tag, DELIVERED)
        except (StaleLease, JobNotFound) as exc:
            # the lease ran out (a broker down longer than it): another worker has it
            log.warning("qbroker: ack of job %s came too late: %s", job_id, exc)

    def release(self, tag: str) -> None:
        """Give the job back to its queue (a reject with requeue, a restore)."""
        self.release_many([tag])

    def release_many(self, tags: Iterable[str]) -> None:
        """Release jobs in one request; one that moved on already is left alone."""
        items = [
            ReleaseItem(id=job_id, lease=tag)
            for tag in tags
            if (job_id := self._held.pop(tag, None)) is not None
        ]
        if not items:
            return
        try:
            self.client.release_many(items)
        except (ProtocolError, BrokerError) as exc:
            # the broker is away: the leases run out there and the jobs come back
            log.warning("qbroker: could not release %d jobs: %s", len(items), exc)

    def fail(self, tag: str, reason: str) -> None:
        """End the job as failed, without retry (a reject without requeue)."""
        job_id = self._held.pop(tag, None)
        if job_id is None:
            return
        with contextlib.suppress(StaleLease, JobNotFound):
            self.client.fail(job_id, tag, error=reason, retry_in=None)

    def _restore(self, message: Any) -> None:
        self.release(message.delivery_tag)

    def _restore_at_beginning(self, message: Any) -> None:
        self.release(message.delivery_tag)

    # ------------------------------------------------------------ leases

    def _start_extender(self) -> None:
        if self._extender is None or not self._extender.is_alive():
            self._extender = threading.Thread(
                target=self._extend_loop, name="qbroker-lease-extender", daemon=True
            )
            self._extender.start()

    def _extend_loop(self) -> None:
        """Renew held leases every third of their length, until the channel closes."""
        while not self._stop.wait(self.lease_timeout / 3):
            for tag, job_id in list(self._held.items()):
                try:
                    self.client.extend(job_id, tag, self.lease_timeout)
                except (StaleLease, JobNotFound):
                    self._held.pop(tag, None)
                except (ProtocolError, BrokerError) as exc:
                    log.warning("qbroker: lease extension failed: %s", exc)
                    break  # the broker is away; try all again next round

    # ------------------------------------------------------------ queues

    def _size(self, queue: str) -> int:
        counts = self.client.queue(queue).counts
        return int(counts.get("queued", 0)) + int(counts.get("scheduled", 0))

    def _purge(self, queue: str) -> int:
        path = f"/v1/queues/{queue_path(queue)}/purge"
        rest: Rest = self.connection.rest
        return rest.post(path, None, PurgeReply).deleted

    def _lookup(
        self, exchange: str, routing_key: str, default: str | None = None
    ) -> list[str]:
        # kombu keeps bindings in this process's memory: a process that publishes
        # before it declared the exchange (a prefork child after a reconnect) would
        # drop the message; Celery's queues are named by their routing key
        found: list[str] = super()._lookup(exchange, routing_key, default)
        return found or [routing_key or exchange]

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        """kombu deletes auto-delete queues (reply queues); a qbroker queue is
        only a name, and purging here would drop another process's work."""

    def close(self) -> None:
        self._stop.set()
        super().close()


class Transport(virtual.Transport):
    """`broker_transport = "qclient.celery:Transport"`, `broker_url = "qbroker://host:7733"`.

    The URL's password, if any, is the broker's bearer token
    (`qbroker://:TOKEN@host:7733`); else QBROKER_TOKEN is used. Transport options
    (`broker_transport_options`): `lease_timeout` (seconds, default 60),
    `max_retries` (lease expiries a job survives; default the broker's).
    """

    Channel = Channel
    default_port = DEFAULT_PORT  # type: ignore[assignment]  # kombu types it as None
    polling_interval = POLLING_INTERVAL
    driver_type = "qbroker"
    driver_name = "qclient"
    connection_errors = (  # type: ignore[assignment]  # kombu types it as one item
        *virtual.Transport.connection_errors,
        ProtocolError,
        ConnectionError,
        socket.timeout,
    )
    channel_errors = (  # type: ignore[assignment]  # as connection_errors
        *virtual.Transport.channel_errors,
        BrokerError,
    )
    #: direct and topic routing only: no fanout, so no remote control or broadcast
    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic"]),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.state = _STATE
        host = client.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.url = f"http://{host}:{client.port or DEFAULT_PORT}"
        self.token = client.password or os.environ.get("QBROKER_TOKEN") or None
        self.qclient = Client(self.url, self.token)
        self.rest = Rest(self.url, self.token)
        self.worker_name = f"celery@{socket.gethostname()}"

    def establish_connection(self) -> Any:
        # A broker that is down raises here, at once, so kombu's and Celery's
        # connection retry settings apply, with their log lines.
        with Client(self.url, self.token, retries=0, timeout=CONNECT_TIMEOUT) as probe:
            probe.health()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        self.qclient.close()
        self.rest.close()

    def driver_version(self) -> str:
        from qclient import __version__

        return __version__


#: exchanges and bindings, shared by the process's connections (as kombu's memory
#: transport does): a reconnect must not forget what Celery declared once
_STATE = virtual.BrokerState()

TRANSPORT_ALIASES.setdefault("qbroker", "qclient.celery:Transport")
