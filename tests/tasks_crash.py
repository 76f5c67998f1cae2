"""The task of tests/test_crash.py, imported by `qworker --module tasks_crash`.

A worker subprocess runs with `cwd=tests/`, so this file is the top-level module
`tasks_crash` there. Each run appends two lines to a log file named in its arguments,
`start` when it begins and `end` just before it returns, each with O_APPEND (one write,
so lines never interleave) and fsync (so a line survives the SIGKILL of the worker,
or of the pool child, that wrote it):

    start <job_id> <token> <attempt> <state> <label> <pid> <began> <unix time>
    end   <job_id> <token> <attempt> <state> <label> <pid> <began> <unix time>

`token` is new for every run; the run returns `{"token", "attempt", "state"}`, so the
result the broker kept names the one run whose ack it accepted. `attempt` and `state` are
what the broker's job record said when the run began (a job leased to us is `active`
and its `attempts` is our attempt), read with a GET since a task is not told its attempt.
`label` is the environment's QCRASH_WORKER: the test's name for the worker process;
`began` is the unix time the run was called (before the GET, which waits out a broker
restart).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import qclient
from qworker import task

_clients: dict[str, qclient.Client] = {}
_lock = threading.Lock()


def _client(url: str) -> qclient.Client:
    with _lock:
        client = _clients.get(url)
        if client is None:
            # The broker may be down for a moment (it is being killed): keep trying.
            client = _clients[url] = qclient.Client(url, timeout=5, retries=60)
        return client


def _note(path: str, *fields: object) -> None:
    line = " ".join(str(f) for f in fields) + f" {time.time():.6f}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@task(max_retries=50, timeout=2, retry_backoff=0.1, retry_jitter=False)
def crash_job(log: str, job_id: str, url: str, seconds: float) -> dict[str, Any]:
    """Note the start, read our attempt, sleep `seconds`, note the end."""
    began = f"{time.time():.6f}"
    token = uuid.uuid4().hex[:12]
    label = os.environ.get("QCRASH_WORKER", "?")
    try:
        record = _client(url).get_job(job_id)
        attempt, state = record.attempts, str(record.state)
    except qclient.QClientError:
        attempt, state = -1, "unknown"
    fields = (job_id, token, attempt, state, label, os.getpid(), began)
    _note(log, "start", *fields)
    time.sleep(seconds)
    _note(log, "end", *fields)
    return {"token": token, "attempt": attempt, "state": state}
