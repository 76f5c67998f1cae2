"""The control thread: hears at once when a job this worker runs is cancelled.

Heartbeats come a third of the way through a lease (ten seconds into a 30 s one),
far too late for "stop that job now". This thread keeps one long-poll parked at the
broker (`POST /v1/cancels`) naming the worker and the jobs it holds; the broker
answers it the moment one of them, or any job leased under the worker's name since,
is cancelled. The worker then stops the run as it stops any run that no longer counts
(`Core.abandon`): a processes-pool child is killed, an `async def` task is cancelled,
a threads-pool task sees `current_job().cancelled` turn true (a thread cannot be
killed). A broker without the endpoint (404) leaves cancels to the heartbeats.
"""

from __future__ import annotations

import time

from qclient import BrokerError, ProtocolError

from qworker._core import Core, transient
from qworker._execute import describe
from qworker._task import backoff_delay

__all__ = ["CANCEL_WAIT", "control_loop"]

CANCEL_WAIT = 20.0  #: seconds one cancel long-poll stays parked at the broker
RETRY_MIN = 0.2  #: seconds: first backoff after the broker could not be reached
RETRY_MAX = 5.0  #: seconds: the backoff's cap


def control_loop(core: Core, worker: str) -> None:
    """Wait for cancels of this worker's jobs until the worker stops."""
    book = core.book
    failures = 0
    while True:
        with core.lock:
            if book.stopping:
                return
            held = list(book.running)
        try:
            cancelled = core.client.wait_cancels(worker, held, CANCEL_WAIT)
        except RuntimeError:
            return  # the client was closed: the worker has stopped
        except (ProtocolError, BrokerError) as exc:
            if core.refused(exc):
                return
            if isinstance(exc, BrokerError) and exc.status in (404, 405):
                core.log.info("worker.no_live_cancel", error=describe(exc))
                return  # an older broker: heartbeats bring cancels
            failures += 1
            if not transient(exc):
                core.log.warning("worker.cancel_poll_refused", error=describe(exc))
            pause = backoff_delay(failures, base=RETRY_MIN, cap=RETRY_MAX, jitter=True)
            deadline = time.monotonic() + pause
            with core.lock:
                while not book.stopping and (left := deadline - time.monotonic()) > 0:
                    core.cond.wait(left)
            continue
        failures = 0
        for job_id in cancelled:
            with core.lock:
                ex = book.running.get(job_id)
            if ex is not None:
                core.abandon(ex, "cancelled", "cancelled")
