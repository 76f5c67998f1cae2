"""The beat thread: keeps this worker in the broker's workers registry.

It registers the worker at start (its first beat), then beats every `interval` seconds
with the jobs it runs now, and sends a last beat saying `stopped` on a clean shutdown.
The broker marks a worker `lost` after it misses 3 beats (a SIGKILL, a hang, a cut
network). A failed beat is only logged: the jobs' own heartbeats (extend) are what keep
their leases, so the registry never stops a worker. A broker without the registry
(404) is not asked again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence

import msgspec
from qclient import BrokerError, ProtocolError
from qclient.wire import WorkerBeat

from qworker import __version__
from qworker._core import Core

__all__ = ["BEAT_INTERVAL", "Beater"]

BEAT_INTERVAL = 10.0  #: seconds between a worker's beats


class Beater:
    """Beats for one worker from its own thread: `start()`, then `stop()` once.

    Args:
        core: the worker's shared state (its client, book and log).
        name, queues, pool, concurrency: what the registry shows of the worker.
        interval: seconds between beats.
    """

    def __init__(
        self,
        core: Core,
        *,
        name: str,
        queues: Sequence[str],
        pool: str,
        concurrency: int,
        interval: float = BEAT_INTERVAL,
    ) -> None:
        self._core = core
        self._interval = interval
        self._base = WorkerBeat(
            name=name,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(queues),
            pool=pool,
            concurrency=concurrency,
            version=__version__,
            started_at=time.time(),
            interval=interval,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="qworker-beat", daemon=True
        )
        self._gone = False  #: the broker has no registry: beat no more

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the beats, and say goodbye (one try: the registry would mark the
        worker `lost` anyway)."""
        self._stop.set()
        self._thread.join(self._interval + 15.0)
        self._send(stopped=True)

    def _run(self) -> None:
        while True:
            self._send(stopped=False)
            if self._stop.wait(self._interval):
                return

    def _send(self, *, stopped: bool) -> None:
        if self._gone:
            return
        core = self._core
        with core.lock:
            jobs = [] if stopped else list(core.book.running)
        beat = msgspec.structs.replace(self._base, jobs=jobs, stopped=stopped)
        try:
            core.client.beat(beat)
        except BrokerError as exc:
            if exc.status == 404:
                self._gone = True
                core.log.info("worker.registry_missing")
            else:
                core.log.warning("worker.beat_failed", error=str(exc))
        except ProtocolError as exc:
            core.log.warning("worker.beat_failed", error=str(exc))
