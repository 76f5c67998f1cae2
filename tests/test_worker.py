"""qworker end to end: a real broker, real `python -m qworker` subprocesses.

Workers run with `cwd=tests/` so `--module tasks_worker` imports tests/tasks_worker.py.
Every wait is a condition with a deadline; tasks that must run a known number of times
append a line to a file we count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient
from qworker import Worker
from qworker.pools.processes import RESPAWN_BACKOFF_MAX

from tests import tasks_worker
from tests.conftest import BrokerProcess, child_env

TESTS_DIR = Path(__file__).resolve().parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def lines(path: Path, word: str) -> list[str]:
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.split()[0] == word]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class WorkerProc:
    """One `python -m qworker` subprocess logging JSON lines to a file."""

    def __init__(self, url: str, log_path: Path, args: tuple[str, ...]) -> None:
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "qworker", "--url", url, "--module", "tasks_worker",
            "--log-format", "json", *args,
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=TESTS_DIR, env=child_env(), stdout=log, stderr=log
            )

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if event is None or record.get("event") == event:
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
def start_worker(
    tmp_path: Path, broker: BrokerProcess
) -> Iterator[Callable[..., WorkerProc]]:
    made: list[WorkerProc] = []

    def start(*args: str) -> WorkerProc:
        w = WorkerProc(broker.url, tmp_path / f"worker{len(made)}.log", args)
        made.append(w)
        return w

    yield start
    for w in made:  # the broker and its data are thrown away: no need to be graceful
        w.kill()


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[qclient.Client]:
    with qclient.Client(broker.url, timeout=10) as c:
        yield c


@pytest.fixture
def default_client(broker: BrokerProcess) -> Iterator[None]:
    """Point qclient's module-level client (what `.delay()` uses) at the test broker."""
    qclient.configure(broker.url)
    yield
    qclient.configure()  # back to the environment's default for other tests


@pytest.mark.usefixtures("default_client")
def test_send_email_example_runs_end_to_end(
    start_worker: Callable[..., WorkerProc],
) -> None:
    job = tasks_worker.send_email.delay(name="x")
    worker = start_worker("--queue", "send_email", "--concurrency", "8", "--burst")
    assert worker.wait(30) == 0
    assert job.result(timeout=10) == "success"
    record = job.info()
    assert (record.queue, record.task, record.attempts) == (
        "send_email",
        "send_email",
        1,
    )
    assert (record.max_retries, record.timeout) == (3, 60)  # from @task(...)
    [finished] = worker.events("job.finished")
    assert finished["outcome"] == "succeeded"
    assert finished["job_id"] == job.id
    assert {"task", "queue", "attempt", "duration"} <= finished.keys()
    assert "name" not in finished  # never the job's arguments


def test_busy_worker_reports_each_outcome_with_its_next_lease(
    broker: BrokerProcess,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    """With a backlog, a slot's outcome rides along with the lease that refills the
    slot: about one request per job, not a lease and an ack each."""
    items = [
        qclient.JobSpec(task="send_email", kwargs={"name": str(i)}) for i in range(30)
    ]
    jobs = client.send_many("wt_busy", items)
    worker = start_worker("--queue", "wt_busy", "--concurrency", "1", "--burst")
    assert worker.wait(30) == 0
    assert client.results(jobs, timeout=10) == ["success"] * 30
    finished = worker.events("job.finished")
    assert sorted(f["job_id"] for f in finished) == sorted(j.id for j in jobs)
    assert {f["outcome"] for f in finished} == {"succeeded"}
    with urllib.request.urlopen(broker.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    requests = {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^qbroker_http_requests_total\{route="(\w+)",status="200"\} (\S+)',
            text,
            re.M,
        )
    }
    assert requests.get("ack_many", 0) + requests.get("fail_many", 0) <= 2, requests
    assert requests["lease"] <= 34, requests
    assert 'qbroker_jobs_finished_total{queue="wt_busy",state="succeeded"} 30.0' in text


def test_quick_task_in_the_lease_thread_hands_leasing_on_when_a_run_lasts(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    """A threads worker whose runs are quick runs the job a lease brought alone in
    the lease thread itself. When such a run turns out long, another thread takes
    over leasing, so a free slot still gets the next job at once."""
    worker = start_worker("--queue", "wt_mix", "--pool", "threads", "-c", "2")
    for i in range(10):  # quick runs: the worker's mean run is well under SHORT_RUN
        assert (
            client.send("wt_mix", task="wt_echo", args=[i]).result(timeout=10)[0] == i
        )
    notes = tmp_path / "notes"
    slow = client.send("wt_mix", task="wt_slow", args=[str(notes), 3.0])
    wait_for(lambda: lines(notes, "start"), 10, "the slow task to start")
    started = time.monotonic()
    quick = client.send("wt_mix", task="wt_echo", args=[99])
    assert quick.result(timeout=2.5)[0] == 99  # not after the slow one's 3 s
    assert time.monotonic() - started < 2.0
    assert not lines(notes, "end")
    [replaced] = worker.events("worker.lease_thread_replaced")
    assert replaced["job_id"] == slow.id, worker.output()
    assert slow.result(timeout=10) == "slept"
    for i in range(3):  # the new lease thread goes on as the old one did
        assert (
            client.send("wt_mix", task="wt_echo", args=[i]).result(timeout=10)[0] == i
        )
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert len(lines(notes, "start")) == 1 and client.get_job(slow.id).attempts == 1


def _http_requests(url: str) -> dict[str, float]:
    """`qbroker_http_requests_total` answered 200, by route, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^qbroker_http_requests_total\{route="(\w+)",status="200"\} (\S+)',
            text,
            re.M,
        )
    }


def test_one_job_at_a_time_rides_each_outcome_on_the_next_lease(
    broker: BrokerProcess,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    """Send, wait for the result, send again: each lease brings the one job there is,
    with a slot still free. Its outcome rides on the next lease (one request a job),
    at any concurrency: no separate ack, and none held back for a lease in flight."""
    for concurrency in ("1", "2", "8"):
        queue = f"wt_seq{concurrency}"
        worker = start_worker("--queue", queue, "-c", concurrency)
        before = _http_requests(broker.url)
        for i in range(12):
            job = client.send(queue, task="wt_echo", args=[i])
            assert job.result(timeout=10)[0] == i
        used = {k: v - before.get(k, 0) for k, v in _http_requests(broker.url).items()}
        assert used.get("ack_many", 0) + used.get("ack", 0) <= 1, (concurrency, used)
        worker.kill()


def test_waiting_short_jobs_refill_several_free_slots_with_one_lease(
    broker: BrokerProcess,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    """Pure pull, a backlog of quick jobs, process slots (whose runs end at different
    moments): when one slot frees up while the others' runs are about to end, the
    worker waits that moment and refills them all with one lease, not a lease per
    slot (which made 401 leases for 400 jobs on two slots). It still holds no job it
    is not running: a lease asks for the free slots only."""
    for concurrency in (2, 4):
        queue = f"wt_gather{concurrency}"
        jobs = client.send_many(
            queue, [qclient.JobSpec(task="wt_echo", args=[i]) for i in range(400)]
        )
        before = _http_requests(broker.url)
        worker = start_worker(
            "--queue", queue, "--pool", "processes", "-c", str(concurrency), "--burst"
        )  # fmt: skip
        assert worker.wait(60) == 0, worker.output()
        used = {k: v - before.get(k, 0) for k, v in _http_requests(broker.url).items()}
        assert [r[0] for r in client.results(jobs, timeout=10)] == list(range(400))
        assert {client.get_job(j.id).attempts for j in jobs[::20]} == {1}
        assert used["lease"] <= 1.5 * 400 / concurrency, (concurrency, used)


def test_prefetch_leases_short_jobs_in_batches(
    broker: BrokerProcess,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    """Two slots and 300 quick jobs: pure pull makes a request per job or two; with
    --prefetch the worker holds up to 100 and leases them in batches."""
    items = [
        qclient.JobSpec(task="send_email", kwargs={"name": str(i)}) for i in range(300)
    ]
    jobs = client.send_many("wt_prefetch", items)
    worker = start_worker(
        "--queue", "wt_prefetch", "-c", "2", "--prefetch", "100", "--burst"
    )
    assert worker.wait(30) == 0
    assert client.results(jobs, timeout=10) == ["success"] * 300
    assert [client.get_job(j.id).attempts for j in jobs[:5]] == [1] * 5
    finished = worker.events("job.finished")
    assert sorted(f["job_id"] for f in finished) == sorted(j.id for j in jobs)
    requests = _http_requests(broker.url)
    sent = requests["lease"] + requests.get("ack_many", 0) + requests.get("ack", 0)
    assert sent <= 30, requests


def test_process_pool_sends_quick_prefetched_jobs_to_a_child_in_runs(
    client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    """With --prefetch, a process slot sends its child runs of quick jobs in one
    message; each job still gets its own result."""
    jobs = client.send_many(
        "wt_echo", [qclient.JobSpec(task="wt_echo", args=[i]) for i in range(400)]
    )
    worker = start_worker(
        "--queue", "wt_echo", "--pool", "processes", "-c", "2", "--prefetch", "200",
        "--burst", "--log-level", "debug",
    )  # fmt: skip
    assert worker.wait(60) == 0
    results = client.results(jobs, timeout=10)
    assert [r[0] for r in results] == list(range(400))
    assert worker.proc.pid not in {r[1] for r in results}
    runs = [e["jobs"] for e in worker.events("pool.run")]
    assert runs and max(runs) > 1, worker.output()
    assert {client.get_job(j.id).attempts for j in jobs[::40]} == {1}


def test_child_dying_mid_run_fails_only_the_job_it_was_running(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    """The child dies in one job of a run: that job fails with WorkerLost; the rest of
    the run goes again in a new child and succeeds, in the same lease."""
    notes = str(tmp_path / "notes")
    items = [
        qclient.JobSpec(task="wt_die_once", args=[notes, i, i == 150], max_retries=0)
        for i in range(300)
    ]
    jobs = client.send_many("wt_die_once", items)
    worker = start_worker(
        "--queue", "wt_die_once", "--pool", "processes", "-c", "1",
        "--prefetch", "300", "--burst", "--log-level", "debug",
    )  # fmt: skip
    assert worker.wait(60) == 0
    assert worker.events("pool.run"), worker.output()
    with pytest.raises(qclient.TaskFailed) as info:
        jobs[150].result(timeout=5)
    assert info.value.exc_type == "WorkerLost"
    rest = jobs[:150] + jobs[151:]
    assert client.results(rest, timeout=10) == [*range(150), *range(151, 300)]
    assert {client.get_job(j.id).attempts for j in rest} == {1}
    ran = lines(Path(notes), "ran")
    # Each ran once, but for the run-mates that had finished before the death: their
    # outcomes died with the child, so they ran again.
    assert 299 <= len(ran) < 299 + 64


def test_prefetched_jobs_go_back_when_a_long_task_holds_the_slot(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    """A prefetching worker with its one slot in a long run hands the jobs it holds
    back within about a second, uncounted, and another worker runs them meanwhile."""
    marks = tmp_path / "marks"
    holder = start_worker("--queue", "wt_slow", "-c", "1", "--prefetch", "20")
    warm = [tasks_worker.wt_slow.send(args=[str(marks), 0.01], client=client)]
    warm += [tasks_worker.wt_slow.send(args=[str(marks), 0.01], client=client)]
    assert client.results(warm, timeout=20) == ["slept", "slept"]  # runs are short
    items = [qclient.JobSpec(task="wt_slow", args=[str(marks), 6])]
    items += [qclient.JobSpec(task="wt_slow", args=[str(marks), 0.01])] * 10
    long_job, *quick = client.send_many("wt_slow", items)
    wait_for(lambda: holder.events("worker.prefetch_returned"), 10, "held jobs back")
    # job.released is logged once the hand-back request has been answered
    wait_for(lambda: holder.events("job.released"), 10, "the hand-back")
    released = {e["job_id"] for e in holder.events("job.released")}
    assert {e["reason"] for e in holder.events("job.released")} == {"held_too_long"}
    assert released and released <= {j.id for j in quick}
    helper = start_worker("--queue", "wt_slow", "-c", "2", "--burst")
    assert helper.wait(30) == 0
    assert client.results(quick, timeout=10) == ["slept"] * 10
    records = [client.get_job(j.id) for j in quick]
    assert {r.attempts for r in records} == {1}  # the hand-back was not counted
    assert long_job.result(timeout=20) == "slept"
    ran_by_helper = {e["job_id"] for e in helper.events("job.finished")}
    assert released <= ran_by_helper
    last_quick = max(r.finished_at or 0.0 for r in records)
    assert last_quick < (long_job.info().finished_at or 0.0)


def test_sigterm_hands_back_prefetched_jobs_uncounted(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    worker = start_worker("--queue", "wt_slow", "-c", "1", "--prefetch", "20")
    warm = [tasks_worker.wt_slow.send(args=[str(marks), 0.01], client=client)]
    warm += [tasks_worker.wt_slow.send(args=[str(marks), 0.01], client=client)]
    assert client.results(warm, timeout=20) == ["slept", "slept"]
    items = [qclient.JobSpec(task="wt_slow", args=[str(marks), 1.5])]
    items += [qclient.JobSpec(task="wt_slow", args=[str(marks), 0.01])] * 5
    long_job, *held = client.send_many("wt_slow", items)
    wait_for(
        lambda: all(client.get_job(j.id).state == "active" for j in held),
        10,
        "the worker to hold the quick jobs",
    )
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert long_job.result(timeout=5) == "slept"  # the running one finished
    records = [client.get_job(j.id) for j in held]
    assert {(r.state, r.attempts) for r in records} == {("queued", 0)}
    released = worker.events("job.released")
    assert sorted(e["job_id"] for e in released) == sorted(j.id for j in held)
    assert {e["reason"] for e in released} == {"not_started"}


def test_failing_task_retries_with_backoff_then_fails(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    runs = tmp_path / "runs"
    job = tasks_worker.wt_flaky.send(args=[str(runs)], client=client)
    worker = start_worker("--queue", "wt_flaky")
    with pytest.raises(qclient.TaskFailed) as info:
        job.result(timeout=30)
    assert info.value.state == "failed"
    assert info.value.exc_type == "ValueError"
    assert info.value.message == "flaky failed"
    assert job.info().attempts == 3  # max_retries=2: three runs in all
    times = [float(line.split()[1]) for line in lines(runs, "run")]
    assert len(times) == 3
    # retry_backoff=0.2 without jitter: 0.2 s, then 0.4 s
    assert times[1] - times[0] >= 0.2 * 0.9
    assert times[2] - times[1] >= 0.4 * 0.9
    outcomes = wait_for(
        lambda: (
            len(worker.events("job.finished")) == 3 and worker.events("job.finished")
        ),
        10,
        "three job.finished lines",
    )
    assert [e["outcome"] for e in outcomes] == ["retry", "retry", "failed"]
    assert [e["retry_in"] for e in outcomes[:2]] == [0.2, 0.4]


def test_failed_task_traceback_reaches_job_result(
    client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    job = tasks_worker.wt_boom.send(args=["the-key"], client=client)
    assert start_worker("--queue", "wt_boom", "--burst").wait(30) == 0
    with pytest.raises(qclient.TaskFailed) as info:
        job.result(timeout=10)
    failed = info.value
    assert failed.exc_type == "KeyError"
    assert "the-key" in failed.message
    assert failed.traceback is not None
    assert "in wt_boom" in failed.traceback
    assert "raise KeyError(key)" in failed.traceback


def test_killed_worker_job_is_redelivered_and_completes(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    job = tasks_worker.wt_slow.send(args=[str(marks), 1.0], timeout=2, client=client)
    first = start_worker("--queue", "wt_slow", "--concurrency", "1")
    wait_for(lambda: lines(marks, "start"), 20, "the task to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    # The dead worker's lease (2 s) runs out and the broker puts the job back.
    wait_for(
        lambda: client.get_job(job.id).state == "queued", 15, "the job to come back"
    )
    assert start_worker("--queue", "wt_slow", "--burst").wait(30) == 0
    assert job.result(timeout=10) == "slept"
    assert job.info().attempts == 2
    assert len(lines(marks, "start")) == 2
    assert len(lines(marks, "end")) == 1


def test_task_longer_than_its_lease_runs_exactly_once(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    job = tasks_worker.wt_slow.send(args=[str(marks), 4.5], timeout=1.5, client=client)
    # Two slots and --burst: were the lease to lapse, this worker would lease it again.
    worker = start_worker("--queue", "wt_slow", "--concurrency", "2", "--burst")
    assert worker.wait(30) == 0
    assert job.result(timeout=5) == "slept"
    assert job.info().attempts == 1
    assert len(lines(marks, "start")) == 1
    assert not worker.events("job.lease_lost")


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_task_over_its_time_limit_fails_with_time_limit_exceeded(
    pool: str, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    job = tasks_worker.wt_limited.send(args=[60], client=client)
    ok = tasks_worker.wt_async.send(args=[1], client=client)  # the pool goes on working
    started = time.monotonic()
    worker = start_worker(
        "--queue", "wt_limited", "--queue", "wt_async", "--pool", pool, "--burst"
    )
    assert worker.wait(30) == 0
    assert time.monotonic() - started < 30  # not the task's 60 s
    with pytest.raises(qclient.TaskFailed) as info:
        job.result(timeout=5)
    assert info.value.exc_type == "TimeLimitExceeded"
    assert ok.result(timeout=5) == 2


def test_sigterm_lets_the_running_task_finish_and_exits_0(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    job = tasks_worker.wt_slow.send(args=[str(marks), 1.5], client=client)
    worker = start_worker("--queue", "wt_slow", "--concurrency", "1")
    wait_for(lambda: lines(marks, "start"), 20, "the task to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert len(lines(marks, "end")) == 1
    record = client.get_job(job.id)
    assert record.state == "succeeded"
    assert record.result == "slept"
    assert worker.events("worker.stopping")


def test_worker_keeps_consuming_after_broker_restart(
    broker: BrokerProcess,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    worker = start_worker("--queue", "send_email")
    first = tasks_worker.send_email.send(kwargs={"name": "a"}, client=client)
    assert first.result(timeout=20) == "success"
    broker.kill()
    wait_for(lambda: worker.events("broker.unreachable"), 20, "broker.unreachable")
    broker.start()
    second = tasks_worker.send_email.send(kwargs={"name": "b"}, client=client)
    assert second.result(timeout=30) == "success"
    assert worker.events("broker.reconnected")
    assert worker.proc.poll() is None


def test_a_task_whose_error_or_result_cannot_be_described_fails_without_losing_its_slot(
    client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    # With one slot, a run that killed its thread would leave the job active for good
    # and the jobs behind it queued.
    bad = [client.send("wt_odd", task=t) for t in ("wt_unprintable", "wt_too_deep")]
    ok = client.send("wt_odd", task="wt_echo", args=[5])
    worker = start_worker(
        "--queue", "wt_odd", "--concurrency", "1", "--pool", "threads"
    )
    assert ok.result(timeout=30)[0] == 5  # [x, the pid that ran it]
    unprintable, too_deep = (client.get_job(j.id) for j in bad)
    assert (unprintable.state, unprintable.error) == (
        "failed",
        "_Unprintable: <unprintable>",
    )
    assert too_deep.state == "failed"
    assert too_deep.error is not None
    assert too_deep.error.startswith("UnserializableResult: RecursionError"), (
        too_deep.error
    )
    worker.kill()


def test_the_tasks_max_retries_bounds_a_job_sent_without_it(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    # @task(max_retries=0) on a job sent by name, which carries the broker's default
    # of 3: the task's own bound wins; a task without one keeps the job's.
    runs = tmp_path / "runs"
    job = client.send("wt_no_retries", task="wt_no_retries", args=[str(runs)])
    assert client.get_job(job.id).max_retries == 3
    assert start_worker("--queue", "wt_no_retries", "--burst").wait(30) == 0
    record = client.get_job(job.id)
    assert (record.state, record.attempts) == ("failed", 1)
    assert len(lines(runs, "run")) == 1


def test_the_tasks_max_retries_bounds_deliveries_after_a_lease_ran_out(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    # The broker requeues the job (its own max_retries is 3); the task allows one run.
    runs = tmp_path / "runs"
    job = client.send("wt_no_retries", task="wt_no_retries", args=[str(runs)])
    assert len(client.lease(["wt_no_retries"], timeout=1.0)) == 1  # never reported
    deadline = time.monotonic() + 10
    while client.get_job(job.id).state != "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert start_worker("--queue", "wt_no_retries", "--burst").wait(30) == 0
    record = client.get_job(job.id)
    assert (record.state, record.attempts) == ("failed", 2)
    assert record.error == (
        "TooManyAttempts: attempt 2, but the task allows 1 (max_retries=0)"
    )
    assert not runs.exists()


def test_a_retry_asked_for_beyond_ten_years_is_scheduled_at_ten_years(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    runs = tmp_path / "runs"
    job = tasks_worker.wt_retry_far.send(args=[str(runs)], client=client)
    assert start_worker("--queue", "wt_retry_far", "--burst").wait(30) == 0
    record = client.get_job(job.id)
    assert (record.state, record.attempts) == ("scheduled", 1)
    assert len(lines(runs, "run")) == 1


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_a_task_may_start_stop_and_fork_processes(
    pool: str,
    tmp_path: Path,
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
) -> None:
    # A program a task starts stops on SIGTERM (pool children used to ignore SIGTERM,
    # and so did every program they started). A fork of the task that calls
    # sys.exit() ends there: it used to go on as a copy of the worker.
    runs = tmp_path / "runs"
    stop = tasks_worker.wt_stop_a_program.send(client=client)
    fork = tasks_worker.wt_fork_exit.send(args=[str(runs)], client=client)
    after = [tasks_worker.wt_echo.send(args=[i], client=client) for i in range(4)]
    worker = start_worker(
        "--queue", "wt_stop_a_program", "--queue", "wt_fork_exit", "--queue", "wt_echo",
        "--pool", pool, "-c", "1", "--burst",
    )  # fmt: skip
    assert worker.wait(60) == 0
    assert stop.result(timeout=5) == -signal.SIGTERM
    assert fork.result(timeout=5) == 3
    assert [j.result(timeout=5)[0] for j in after] == [0, 1, 2, 3]
    assert len(lines(runs, "run")) == 1
    assert [client.get_job(j.id).attempts for j in (stop, fork, *after)] == [1] * 6


def test_a_pool_whose_children_cannot_start_fails_without_leasing(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    job = client.send("wt_childfail")
    worker = start_worker(
        "--queue", "wt_childfail", "--module", "tasks_childfail", "--pool", "processes",
    )  # fmt: skip
    assert worker.wait(60) == 2
    [failed] = worker.events("worker.pool_failed")
    assert "no pool child could start" in failed["error"]
    record = client.get_job(job.id)
    assert (record.state, record.attempts) == ("queued", 0)


@pytest.mark.timeout(400)
def test_a_pool_whose_children_stop_starting_holds_no_jobs(
    client: qclient.Client,
    start_worker: Callable[..., WorkerProc],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Mid-run, no child can start any more: the worker must not hold jobs it cannot
    # run (leased, their leases extended for good), and it runs them once children
    # start again. On a loaded machine each start may take seconds, and a slot's
    # backoff between tries grows to RESPAWN_BACKOFF_MAX: the deadlines allow both.
    broken = tmp_path / "broken"
    monkeypatch.setenv("QW_BREAK_FILE", str(broken))
    breaker = client.send("wt_break")
    worker = start_worker(
        "--queue", "wt_break", "--module", "tasks_childbreak", "--pool", "processes",
        "-c", "1", "--max-tasks-per-child", "1",
    )  # fmt: skip

    def failures() -> int:
        return len(worker.events("pool.child_failed"))

    wait_for(lambda: failures() >= 2, 90, "children failing to start")
    final = ("succeeded", "failed")  # it ran once, and never runs again
    wait_for(lambda: client.get_job(breaker.id).state in final, 30, "wt_break's end")
    after = client.send("wt_break", task="wt_after")
    wait_for(lambda: failures() >= 4, 120, "two more failed starts")
    record = client.get_job(after.id)
    assert (record.state, record.attempts) == ("queued", 0), worker.output()
    broken.unlink()
    assert after.result(timeout=RESPAWN_BACKOFF_MAX + 90) == "ran", worker.output()
    assert worker.proc.poll() is None


def test_unregistered_task_fails_clearly_without_retry(
    client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    job = client.send("wt_orphans", task="wt_missing", max_retries=3)
    assert start_worker("--queue", "wt_orphans", "--burst").wait(30) == 0
    record = client.get_job(job.id)
    assert record.state == "failed"
    assert record.attempts == 1
    assert record.error == (
        "NotRegistered: no task named 'wt_missing' in modules ['tasks_worker']"
    )


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_async_task_runs_on_an_event_loop(
    pool: str, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    jobs = [tasks_worker.wt_async.send(args=[i], client=client) for i in range(5)]
    worker = start_worker("--queue", "wt_async", "--pool", pool, "-c", "2", "--burst")
    assert worker.wait(30) == 0
    assert [j.result(timeout=5) for j in jobs] == [0, 2, 4, 6, 8]


def test_burst_exits_at_once_on_an_empty_queue(
    start_worker: Callable[..., WorkerProc],
) -> None:
    worker = start_worker("--queue", "send_email", "--burst")
    assert worker.wait(20) == 0
    assert worker.events("worker.drained")


def test_worker_runs_in_process_with_run_burst(
    broker: BrokerProcess, client: qclient.Client
) -> None:
    jobs = [
        tasks_worker.send_email.send(kwargs={"name": str(i)}, client=client)
        for i in range(3)
    ]
    worker = Worker(["send_email"], url=broker.url, concurrency=2)
    assert worker.run(burst=True, handle_signals=False) == 0
    assert [j.result(timeout=5) for j in jobs] == ["success"] * 3


def test_worker_stop_from_another_thread_and_retry_on_purpose(
    tmp_path: Path, broker: BrokerProcess, client: qclient.Client
) -> None:
    runs = tmp_path / "runs"
    again = tasks_worker.wt_retry_on_purpose.send(args=[str(runs)], client=client)
    bad = tasks_worker.wt_unserializable.send(client=client)
    worker = Worker(
        ["wt_retry_on_purpose", "wt_unserializable"], url=broker.url, lease_wait=1.0
    )
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(worker.run(handle_signals=False))
    )
    thread.start()
    try:
        assert again.result(timeout=20) == 3  # two Retry(delay=0.05), then success
        with pytest.raises(qclient.TaskFailed) as info:
            bad.result(timeout=10)
        assert info.value.exc_type == "UnserializableResult"
    finally:
        worker.stop()
        thread.join(15)
    assert codes == [0]


def test_max_tasks_per_child_replaces_children(
    client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    jobs = [tasks_worker.wt_pid.send(client=client) for _ in range(6)]
    worker = start_worker(
        "--queue", "wt_pid", "--pool", "processes", "-c", "1",
        "--max-tasks-per-child", "2", "--burst",
    )  # fmt: skip
    assert worker.wait(30) == 0
    pids = [j.result(timeout=5) for j in jobs]
    assert len(set(pids)) == 3
    assert worker.proc.pid not in pids


def test_grace_expiry_releases_the_running_job_uncounted(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    job = tasks_worker.wt_slow.send(args=[str(marks), 60], client=client)
    worker = start_worker("--queue", "wt_slow", "--grace", "0.5", "-c", "1")
    wait_for(lambda: lines(marks, "start"), 20, "the task to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    record = client.get_job(job.id)
    assert (record.state, record.attempts) == ("queued", 0)  # back, attempt not counted
    [released] = worker.events("job.released")
    assert (released["job_id"], released["reason"]) == (job.id, "grace_expired")
    [finished] = worker.events("job.finished")  # every delivery ends with one
    assert (finished["job_id"], finished["outcome"]) == (job.id, "abandoned")


def test_cancel_kills_the_running_child(
    tmp_path: Path, client: qclient.Client, start_worker: Callable[..., WorkerProc]
) -> None:
    marks = tmp_path / "marks"
    job = tasks_worker.wt_slow.send(args=[str(marks), 60], timeout=1.5, client=client)
    worker = start_worker("--queue", "wt_slow", "--pool", "processes", "-c", "1")
    [start] = wait_for(lambda: lines(marks, "start"), 20, "the task to start")
    child = int(start.split()[2])
    client.cancel(job.id)
    # The next heartbeat (a third of the 1.5 s lease) learns it; the child is killed.
    [finished] = wait_for(lambda: worker.events("job.finished"), 10, "job.finished")
    assert (finished["job_id"], finished["outcome"]) == (job.id, "cancelled")
    wait_for(lambda: not alive(child), 10, "the child to be killed (and reaped)")
    assert client.get_job(job.id).state == "cancelled"
    assert not lines(marks, "end")


def test_result_too_large_for_the_broker_fails_the_job_alone(
    tmp_path: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    small = broker_factory(args=("--max-body", "4096")).start()
    with qclient.Client(small.url) as c:
        big = tasks_worker.wt_big.send(args=[10_000], client=c)
        fine = tasks_worker.wt_big.send(args=[10], client=c)
        worker = WorkerProc(small.url, tmp_path / "w.log", ("-q", "wt_big", "--burst"))
        try:
            assert worker.wait(30) == 0
        finally:
            worker.kill()
        assert fine.result(timeout=5) == "x" * 10
        with pytest.raises(qclient.TaskFailed) as info:
            big.result(timeout=5)
        assert info.value.exc_type == "InvalidResult"  # no retry: it would fail again
        assert big.info().attempts == 1
