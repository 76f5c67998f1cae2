"""qworker end to end, a real broker and real worker processes: the job context,
which failures are retried, a refused token, an unreachable broker with --burst, a
task's own lease time, and when `job.finished` lines leave.

Workers run with `cwd=tests/` and `--module tasks_behaviour` (tests/tasks_behaviour.py).
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient
from qworker import current_job

from tests import tasks_behaviour
from tests.conftest import BrokerFactory, BrokerProcess, child_env
from tests.test_worker import TESTS_DIR, lines, wait_for


class Proc:
    """A worker subprocess logging JSON lines to a file."""

    def __init__(self, cmd: list[str], log_path: Path, **env: str) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=TESTS_DIR, env=child_env(**env), stdout=log, stderr=log
            )

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        p.kill()


@pytest.fixture
def start(
    tmp_path: Path, broker: BrokerProcess, procs: list[Proc]
) -> Callable[..., Proc]:
    def start(*args: str, url: str | None = None, **env: str) -> Proc:
        cmd = [
            sys.executable, "-m", "qworker", "--url", url or broker.url,
            "--module", "tasks_behaviour", "--log-format", "json", *args,
        ]  # fmt: skip
        p = Proc(cmd, tmp_path / f"worker{len(procs)}.log", **env)
        procs.append(p)
        return p

    return start


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[qclient.Client]:
    with qclient.Client(broker.url, timeout=10) as c:
        yield c


# ------------------------------------------------------------------ job context


def test_current_job_is_none_outside_a_run() -> None:
    assert current_job() is None
    assert tasks_behaviour.wb_quick(5) == 5  # a task called here is a plain function


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_a_task_sees_its_job_through_current_job(
    pool: str, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    jobs = [
        client.send("wb_ctx", task=name, headers={"trace": "t-1"})
        for name in ("wb_context", "wb_context_async")
    ]
    assert start("-q", "wb_ctx", "--pool", pool, "--burst").wait(60) == 0
    for job, name in zip(jobs, ("wb_context", "wb_context_async"), strict=True):
        seen = job.result(timeout=10)
        assert seen["id"] == job.id
        assert (seen["queue"], seen["task"], seen["attempt"]) == ("wb_ctx", name, 1)
        assert seen["headers"] == {"trace": "t-1"}
        assert seen["progress"] == [0.5, "half way"]
        assert seen["cancelled"] is False


def test_a_cancelled_job_tells_its_running_task(
    tmp_path: Path, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    # The threads pool cannot kill the thread: the task learns it should stop.
    notes = tmp_path / "notes"
    job = client.send(
        "wb_cancel", task="wb_until_cancelled", args=[str(notes)], timeout=1.5
    )
    worker = start("-q", "wb_cancel", "-c", "1")
    wait_for(lambda: lines(notes, "start"), 30, "the task to start")
    client.cancel(job.id)
    # the next heartbeat (a third of the 1.5 s lease) learns of it
    wait_for(lambda: lines(notes, "cancelled"), 30, "the task to see cancelled")
    [finished] = worker.events("job.finished")
    assert (finished["job_id"], finished["outcome"]) == (job.id, "cancelled")
    assert client.get_job(job.id).state == "cancelled"


# ------------------------------------------------------------------ retries


def test_arguments_that_do_not_fit_the_task_fail_at_once(
    tmp_path: Path, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    # The README's old example: {"to": ...} sent to send_email(name).
    wrong = client.send("wb_args", {"to": "a@b.c"}, task="wb_send_email")
    missing = client.send("wb_args", task="wb_send_email")
    right = client.send("wb_args", {"name": "ann"}, task="wb_send_email")
    # A TypeError the task raises itself is an ordinary failure, and retried.
    runs = tmp_path / "runs"
    own = client.send("wb_args", task="wb_own_type_error", args=[str(runs)])
    assert start("-q", "wb_args", "--burst").wait(60) == 0
    assert right.result(timeout=10) == "sent to ann"
    for job, why in ((wrong, "unexpected keyword argument 'to'"), (missing, "name")):
        record = client.get_job(job.id)
        assert (record.state, record.attempts) == ("failed", 1), record
        assert record.error is not None
        assert record.error.startswith("InvalidArguments: the job's arguments do not")
        assert "wb_send_email(name)" in record.error and why in record.error
    wait_for(lambda: client.get_job(own.id).state == "failed", 30, "the retry")
    assert (client.get_job(own.id).attempts, len(lines(runs, "run"))) == (2, 2)


def test_a_time_limit_is_not_retried_unless_the_task_asks(
    tmp_path: Path, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    once, twice = tmp_path / "once", tmp_path / "twice"
    limited = client.send("wb_lim", task="wb_limited", args=[str(once)])
    retried = client.send("wb_lim", task="wb_limited_retried", args=[str(twice)])
    worker = start("-q", "wb_lim", "-c", "2")

    def failed(job: qclient.Job) -> bool:
        return client.get_job(job.id).state == "failed"

    for job, attempts in ((limited, 1), (retried, 2)):
        wait_for(functools.partial(failed, job), 60, "the job to fail")
        record = client.get_job(job.id)
        assert record.attempts == attempts
        assert record.error is not None
        assert record.error.startswith("TimeLimitExceeded")
    assert (len(lines(once, "run")), len(lines(twice, "run"))) == (1, 2)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0


# ------------------------------------------------------------------ the broker says no


def test_a_refused_token_stops_the_worker_with_one_clear_line(
    tmp_path: Path, broker_factory: BrokerFactory, start: Callable[..., Proc]
) -> None:
    secure = broker_factory(name="auth", args=("--token", "s3cret")).start()
    with qclient.Client(secure.url, token="s3cret") as c:
        jobs = [c.send("wb_auth", task="wb_quick", args=[i]) for i in range(3)]
        wrong = start("-q", "wb_auth", url=secure.url, QBROKER_TOKEN="nope")
        assert wrong.wait(60) == 1
        [line] = wrong.events("worker.unauthorized")
        assert line["level"] == "error" and line["status"] == 401
        assert "--token" in line["fix"]
        assert "Traceback" not in wrong.output()
        # the flag, and the environment variable, both work
        by_flag = start("-q", "wb_auth", "--token", "s3cret", "--burst", url=secure.url)
        assert by_flag.wait(60) == 0
        assert c.results(jobs, timeout=10) == [0, 1, 2]
        more = c.send("wb_auth", task="wb_quick", args=[3])
        by_env = start(
            "-q", "wb_auth", "--burst", url=secure.url, QBROKER_TOKEN="s3cret"
        )
        assert by_env.wait(60) == 0
        assert more.result(timeout=10) == 3


def test_burst_gives_up_on_a_broker_it_cannot_reach(
    start: Callable[..., Proc],
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    worker = start("-q", "wb_gone", "--burst", url=url)
    assert worker.wait(90) == 1  # the client's timeout (10 s) and a backoff
    [gave_up] = worker.events("worker.gave_up")
    assert gave_up["level"] == "error" and gave_up["url"] == url
    assert gave_up["unreachable_for"] >= 10


# ------------------------------------------------------------------ lease time


def test_a_job_sent_without_a_lease_time_gets_its_tasks_own(
    tmp_path: Path, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    # @task(timeout=2), sent by name without one: the broker grants its default
    # 30 s; the worker shortens it to the task's 2 s on receipt, so when the worker
    # dies the job is back in about 2 s, not 30.
    marks = tmp_path / "marks"
    job = client.send("wb_lease", task="wb_short_lease", args=[str(marks), 60])
    assert client.get_job(job.id).timeout == 30
    worker = start("-q", "wb_lease", "-c", "1", "--log-level", "debug")
    wait_for(lambda: lines(marks, "start"), 30, "the task to start")
    [extended] = wait_for(lambda: worker.events("job.extended"), 30, "the extend")
    assert (extended["job_id"], extended["timeout"]) == (job.id, 2)
    killed = time.monotonic()
    worker.proc.kill()
    worker.proc.wait(10)
    wait_for(lambda: client.get_job(job.id).state == "queued", 20, "the job back")
    assert time.monotonic() - killed < 20  # the 30 s lease would still hold it


# ------------------------------------------------------------------ log lines


def test_job_finished_leaves_when_the_job_finishes_not_with_the_next_poll(
    tmp_path: Path, broker: BrokerProcess, client: qclient.Client, procs: list[Proc]
) -> None:
    # A worker whose lease long-polls 60 s: the outcome rides on that lease, and its
    # job.finished line used to wait for the lease's reply.
    code = (
        "import sys\n"
        "from qworker._logs import configure\n"
        "from qworker import Worker\n"
        "configure('info', 'json')\n"
        f"w = Worker(['wb_log'], modules=['tasks_behaviour'], url={broker.url!r},"
        " concurrency=1, lease_wait=60.0)\n"
        "sys.exit(w.run())\n"
    )
    worker = Proc([sys.executable, "-c", code], tmp_path / "w.log")
    procs.append(worker)
    wait_for(lambda: worker.events("worker.started"), 30, "the worker to start")

    def finished(job: qclient.Job) -> list[dict[str, Any]]:
        return [e for e in worker.events("job.finished") if e["job_id"] == job.id]

    for i in range(3):
        job = client.send("wb_log", task="wb_quick", args=[i])
        assert job.result(timeout=30) == i
        # within the deadline, not the lease's 60 s
        wait_for(functools.partial(finished, job), 20, "the job.finished line")
