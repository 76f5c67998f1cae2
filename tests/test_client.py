"""The blocking client against a real broker, plus its pure pieces."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import qclient
from qclient import _api, _errors, _http, _retry
from qclient.wire import CROCKFORD, JobState, crockford26, new_job_id, new_job_ids

from .conftest import BrokerFactory, BrokerProcess, child_env
from .lossyproxy import LossyProxy, unanswered_address
from .wirehttp import read_message

DEADLINE = 10.0  #: seconds any single wait in these tests may take


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[qclient.Client]:
    with qclient.Client(broker.url) as c:
        yield c


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def lease_one(client: qclient.Client, queue: str) -> qclient.LeasedJob:
    jobs = client.lease([queue], wait=DEADLINE, worker="test")
    assert len(jobs) == 1
    return jobs[0]


# ---------------------------------------------------------------- producer


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_send_stores_job_and_info_reports_it(
    broker: BrokerProcess, encoding: Any
) -> None:
    with qclient.Client(broker.url, encoding=encoding) as client:
        job = client.send("emails", {"to": "a@b.c"}, priority=5, headers={"h": 1})
        assert len(job.id) == 26
        assert job.queue == "emails"
        assert job.client is client
        record = job.info()
        assert record.id == job.id
        assert record.queue == "emails"
        assert record.task == "emails"
        assert record.kwargs == {"to": "a@b.c"}
        assert record.args == []
        assert record.priority == 5
        assert record.headers == {"h": 1}
        assert job.status() is JobState.QUEUED
        assert client.get_job(job.id) == record


def test_payload_becomes_args_kwargs_or_one_argument(client: qclient.Client) -> None:
    assert client.send("p", [1, "two"]).info().args == [1, "two"]
    assert client.send("p", (3,)).info().args == [3]
    assert client.send("p", "solo").info().args == ["solo"]
    record = client.send("p", task="other", args=[1], kwargs={"k": 2}).info()
    assert (record.task, record.args, record.kwargs) == ("other", [1], {"k": 2})
    with pytest.raises(TypeError):
        client.send("p", {"a": 1}, args=[1])


def test_send_with_own_id_twice_raises_duplicate_job(client: qclient.Client) -> None:
    job = client.send("dup", job_id="my-id-1")
    assert job.id == "my-id-1"
    with pytest.raises(qclient.DuplicateJob) as info:
        client.send("dup", job_id="my-id-1")
    assert info.value.status == 409
    assert info.value.reason == "duplicate_id"


def test_invalid_value_raises_invalid_request_naming_the_field(
    client: qclient.Client,
) -> None:
    with pytest.raises(qclient.InvalidRequest) as info:
        client.send("bad", priority=10**9)
    assert info.value.status == 422
    assert info.value.field == "priority"


def test_send_many_stores_every_job_in_order(client: qclient.Client) -> None:
    items: list[Any] = [[i] for i in range(2400)]  # three requests
    items.append(qclient.JobSpec(args=["spec"], id="own-batch-id"))
    jobs = client.send_many("bulk", items)
    assert len(jobs) == 2401
    assert len({job.id for job in jobs}) == 2401
    assert jobs[-1].id == "own-batch-id"
    assert client.queue("bulk").counts["queued"] == 2401
    assert jobs[1234].info().args == [1234]
    assert jobs[-1].info().args == ["spec"]
    assert client.send_many("bulk", []) == []


def test_body_over_the_limit_is_invalid_and_send_many_splits_it(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory(args=("--max-body", "4000")).start()
    with qclient.Client(broker.url) as client:
        for size in (5000, 20_000_000):  # the big one meets a reset mid-write
            with pytest.raises(qclient.InvalidRequest) as info:
                client.send("limit", "x" * size)
            assert (info.value.status, info.value.reason) == (413, "body_too_large")
        jobs = client.send_many("limit", [["y" * 100] for _ in range(100)])
        assert len(jobs) == 100
        assert client.queue("limit").counts["queued"] == 100


def test_cancel_makes_result_raise_job_cancelled(client: qclient.Client) -> None:
    job = client.send("cancel-me")
    assert job.cancel() is JobState.CANCELLED
    with pytest.raises(qclient.JobCancelled) as info:
        job.result(timeout=DEADLINE)
    assert info.value.job_id == job.id
    assert isinstance(info.value, qclient.JobNotSucceeded)


def test_queues_and_health(client: qclient.Client) -> None:
    client.send("stats-q")
    stats = client.queue("stats-q")
    assert stats.queue == "stats-q"
    assert stats.counts["queued"] == 1
    assert "stats-q" in {q.queue for q in client.queues()}
    assert client.queue("never-used").counts["queued"] == 0
    assert client.health().status == "ok"


# ---------------------------------------------------------------- results


def test_result_returns_value_acked_by_a_worker(client: qclient.Client) -> None:
    job = client.send("work", {"n": 2})
    leased = lease_one(client, "work")
    assert leased.id == job.id
    assert leased.kwargs == {"n": 2}
    assert leased.attempt == 1
    client.ack(leased.id, leased.lease, {"answer": 4})
    assert job.result(timeout=DEADLINE) == {"answer": 4}
    assert job.status() is JobState.SUCCEEDED


def test_result_long_poll_wakes_when_job_finishes(client: qclient.Client) -> None:
    job = client.send("wake")
    leased = lease_one(client, "wake")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(job.result(timeout=DEADLINE)))
    waiter.start()
    client.ack(leased.id, leased.lease, 42)
    waiter.join(DEADLINE)
    assert got == [42]


def test_result_raises_task_failed_with_traceback(client: qclient.Client) -> None:
    job = client.send("boom")
    leased = lease_one(client, "boom")
    tb = 'Traceback (most recent call last):\n  File "t.py"\nValueError: bad input'
    state = client.fail(leased.id, leased.lease, "ValueError: bad input", tb)
    assert state == "failed"
    with pytest.raises(qclient.TaskFailed) as info:
        job.result(timeout=DEADLINE)
    error = info.value
    assert (error.job_id, error.state) == (job.id, "failed")
    assert (error.exc_type, error.message) == ("ValueError", "bad input")
    assert error.traceback == tb
    assert isinstance(error, qclient.JobNotSucceeded)


def test_results_returns_every_result_in_order(client: qclient.Client) -> None:
    """`Client.results()` waits for jobs spread over more than one request's 1,000
    ids while a worker thread finishes them, and raises the first failure."""
    jobs = client.send_many("gather", [[i] for i in range(1200)])

    def work() -> None:
        left = len(jobs)
        while left:
            leased = client.lease(["gather"], max=100, wait=DEADLINE)
            items = [qclient.AckItem(j.id, j.lease, j.args[0] * 2) for j in leased]
            failing = [i for i in items if i.result == 2 * 700]
            if failing:
                client.fail(failing[0].id, failing[0].lease, "ValueError: 700")
                items.remove(failing[0])
            client.ack_many(items)
            left -= len(leased)

    worker = threading.Thread(target=work)
    worker.start()
    got = client.results(jobs, timeout=DEADLINE * 3, return_exceptions=True)
    worker.join(DEADLINE)
    assert len(got) == 1200
    assert isinstance(got[700], qclient.TaskFailed) and got[700].message == "700"
    assert got[:700] + got[701:] == [2 * i for i in range(1200) if i != 700]
    with pytest.raises(qclient.TaskFailed):
        client.results([j.id for j in jobs])
    with qclient.Client(client.url, encoding="msgpack") as other:
        assert other.results(jobs[:3]) == [0, 2, 4]
    assert client.results([]) == []
    records = client.final_records([jobs[700].id, "no-such-job", jobs[1]])
    assert records[0] is not None and records[0].state is JobState.FAILED
    assert records[1] is None
    assert records[2] is not None and records[2].result == 2
    missing = client.results(["no-such-job"], return_exceptions=True)
    assert isinstance(missing[0], qclient.JobNotFound)


def test_results_times_out_when_some_job_is_unfinished(client: qclient.Client) -> None:
    jobs = [client.send("gather-idle") for _ in range(2)]
    leased = lease_one(client, "gather-idle")
    client.ack(leased.id, leased.lease, "one")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 2 jobs"):
        client.results(jobs, timeout=0.3)
    assert 0.25 < time.monotonic() - start < 5.0


def test_fail_with_retry_in_schedules_the_job(client: qclient.Client) -> None:
    client.send("retry-q")
    leased = lease_one(client, "retry-q")
    assert client.fail(leased.id, leased.lease, "E: x", retry_in=60) == "scheduled"
    assert client.get_job(leased.id).state is JobState.SCHEDULED


def test_result_times_out_when_nobody_works(client: qclient.Client) -> None:
    job = client.send("idle")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0.3)
    assert 0.25 < time.monotonic() - start < 5.0
    with pytest.raises(TimeoutError):
        job.result(timeout=0)


def test_unknown_job_raises_job_not_found(client: qclient.Client) -> None:
    with pytest.raises(qclient.JobNotFound) as info:
        client.get_job("no-such-job")
    assert (info.value.status, info.value.reason) == (404, "job_not_found")
    with pytest.raises(qclient.JobNotFound):
        client.job("no-such-job").result(timeout=1)
    with pytest.raises(qclient.JobNotFound):
        client.cancel("no-such-job")


# ---------------------------------------------------------------- worker


def test_ack_after_release_raises_stale_lease(client: qclient.Client) -> None:
    client.send("stale")
    leased = lease_one(client, "stale")
    client.release(leased.id, leased.lease)
    with pytest.raises(qclient.StaleLease) as info:
        client.ack(leased.id, leased.lease, 1)
    assert (info.value.status, info.value.reason) == (409, "stale_lease")
    again = lease_one(client, "stale")
    assert again.id == leased.id
    assert again.attempt == 1  # a release does not count the attempt
    with pytest.raises(qclient.StaleLease):
        client.extend(again.id, leased.lease)
    with pytest.raises(qclient.StaleLease):
        client.fail(again.id, "not-a-lease")


def test_extend_and_cancel_tell_the_worker_to_stop(client: qclient.Client) -> None:
    job = client.send("ext")
    leased = lease_one(client, "ext")
    reply = client.extend(leased.id, leased.lease, 120)
    assert not reply.cancelled
    assert reply.lease_expires_at > time.time() + 100
    assert job.cancel() is JobState.CANCELLED
    assert client.extend(leased.id, leased.lease).cancelled


def test_ack_many_and_fail_many_report_each_item(client: qclient.Client) -> None:
    client.send_many("batch", [[i] for i in range(4)])
    leased = client.lease(["batch"], max=4, wait=DEADLINE)
    assert len(leased) == 4
    acks = [
        qclient.AckItem(id=j.id, lease=j.lease, result=j.args[0]) for j in leased[:2]
    ]
    acks.append(qclient.AckItem(id=leased[2].id, lease="wrong"))
    results = client.ack_many(acks)
    assert [(r.id, r.ok, r.error) for r in results] == [
        (leased[0].id, True, None),
        (leased[1].id, True, None),
        (leased[2].id, False, "stale_lease"),
    ]
    fails = [
        qclient.FailItem(id=j.id, lease=j.lease, error="E: no") for j in leased[2:]
    ]
    assert all(r.ok for r in client.fail_many(fails))
    assert client.job(leased[1].id).result(timeout=DEADLINE) == leased[1].args[0]
    with pytest.raises(qclient.TaskFailed):
        client.job(leased[3].id).result(timeout=DEADLINE)


# ---------------------------------------------------------------- resilience


def test_send_survives_broker_restart_and_stores_job_once(
    broker: BrokerProcess,
) -> None:
    with qclient.Client(broker.url, retries=10) as client:
        client.send("warm-up")  # leaves a pooled keep-alive socket to die
        broker.kill()
        jobs: list[qclient.Job] = []
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                jobs.append(client.send("restart", {"n": 1}))
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=produce)
        sender.start()  # it meets refused connections and backs off ...
        broker.start()  # ... until the broker is back on the same port
        sender.join(DEADLINE + 10)
        assert not errors
        assert len(jobs) == 1
        assert jobs[0].status() is JobState.QUEUED
        assert client.queue("restart").counts["queued"] == 1


def test_twenty_threads_share_one_client(client: qclient.Client) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def produce(n: int) -> None:
        try:
            for i in range(50):
                job = client.send("threads", {"thread": n, "i": i})
                with lock:
                    ids.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 6)
    assert not errors
    assert len(set(ids)) == 1000
    assert client.queue("threads").counts["queued"] == 1000
    assert client.get_job(ids[-1]).queue == "threads"


def test_connection_closed_by_idle_broker_is_replaced(
    broker_factory: BrokerFactory,
) -> None:
    broker = broker_factory(args=("--idle-timeout", "0.2")).start()
    with qclient.Client(broker.url, retries=0) as client:
        client.send("idle-close")
        [conn] = client._pool.idle
        wait_until(lambda: _http.readable_now(conn.sock.fileno()))  # broker hung up
        client.send("idle-close")  # retries=0: it must not even try the dead socket
        assert client._pool.idle[0] is not conn
        assert client.queue("idle-close").counts["queued"] == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_opens_its_own_connections(client: qclient.Client) -> None:
    client.send("fork")  # the parent now has a pooled socket
    parent_socket = client._pool.idle[0].sock
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            client.send("fork")
            code = 0 if client._pool.idle[0].sock is not parent_socket else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    client.send("fork")  # the parent's socket still works
    assert client._pool.idle[0].sock is parent_socket
    assert client.queue("fork").counts["queued"] == 3


def test_unreachable_broker_raises_protocol_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with qclient.Client(f"http://127.0.0.1:{port}", retries=2) as client:
        start = time.monotonic()
        with pytest.raises(qclient.ProtocolError) as info:
            client.send("nowhere")
        assert time.monotonic() - start < 2.0
        assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_a_call_ends_within_its_timeout_when_connects_hang() -> None:
    listener, filling = unanswered_address()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        with (
            qclient.Client(url, timeout=1) as client,
            pytest.raises(qclient.ProtocolError),
        ):
            client.health()  # each of its 10 retries used to wait the whole second
        assert time.monotonic() - start < 3
    finally:
        for s in (listener, *filling):
            s.close()


@pytest.fixture
def proxy(broker: BrokerProcess) -> Iterator[LossyProxy]:
    """A proxy in front of the broker that can lose a request or a reply."""
    p = LossyProxy(broker.port)
    yield p
    p.close()


def test_a_resent_enqueue_is_success_only_if_its_own_jobs_are_stored(
    proxy: LossyProxy,
) -> None:
    with qclient.Client(proxy.url, timeout=10) as client:
        # The reply lost after the commit: the resend's 409 is the first attempt's
        # success, and nothing is stored twice.
        proxy.lose_replies(1)
        jobs = client.send_many("lossy", [[i] for i in range(5)])
        assert [client.get_job(j.id).args for j in jobs] == [[i] for i in range(5)]
        proxy.lose_replies(1)
        assert client.send("lossy", [5], job_id="mine-1").id == "mine-1"
        # The request lost before the broker saw it, and an id of the batch meets
        # a stored job: the resend's 409 is that clash, and nothing was stored.
        client.send("lossy", ["old"], job_id="taken")
        proxy.swallow(1)
        with pytest.raises(qclient.DuplicateJob):
            client.send_many("lossy", [[7], qclient.spec(["new"], job_id="taken")])
        proxy.swallow(1)
        with pytest.raises(qclient.DuplicateJob):
            client.send("lossy", ["new"], job_id="taken")
        assert client.get_job("taken").args == ["old"]
        assert client.queue("lossy").counts["queued"] == 7


def test_a_protocol_error_from_send_carries_the_ids_to_send_again_with(
    proxy: LossyProxy,
) -> None:
    with qclient.Client(proxy.url, retries=0) as client:
        proxy.lose_replies(1)  # stored, its reply lost
        with pytest.raises(qclient.ProtocolError) as lost:
            client.send("ids", [1])
        [stored] = lost.value.job_ids
        assert client.get_job(stored).args == [1]
        with pytest.raises(qclient.DuplicateJob):  # sent again: not twice
            client.send("ids", [1], job_id=stored)
        proxy.swallow(2)  # never reached the broker (2: the free keep-alive resend)
        with pytest.raises(qclient.ProtocolError) as unsent:
            client.send_many("ids", [[2], [3]])
        ids = unsent.value.job_ids
        assert len(ids) == 2
        again = client.send_many(
            "ids",
            [qclient.spec([n], job_id=i) for i, n in zip(ids, (2, 3), strict=True)],
        )
        assert [j.id for j in again] == ids
        assert client.queue("ids").counts["queued"] == 3


def test_a_lease_whose_reply_was_lost_is_resent_safely(proxy: LossyProxy) -> None:
    # The first lease is committed and its reply lost; the resend must hand back that
    # job, not lease another and leave the first active with an attempt counted (a
    # job allowed no retries would end dead without ever running).
    with qclient.Client(proxy.url, timeout=5) as client:
        first, second, _ = client.send_many("once", [qclient.spec(max_retries=0)] * 3)
        proxy.lose_replies(1)
        [job] = client.lease(["once"], wait=1, timeout=30)
        assert (job.id, job.attempt) == (first.id, 1)
        counts = client.queue("once").counts
        assert (counts["active"], counts["queued"]) == (1, 2)
        # a worker's form: the ack carried by the next lease, both resent
        proxy.lose_replies(1)
        reply = client.settle_and_lease(
            ["once"], [qclient.AckItem(id=job.id, lease=job.lease, result="ran")]
        )
        assert [r.ok for r in reply.results] == [True]
        assert [(j.id, j.attempt) for j in reply.jobs] == [(second.id, 1)]
        counts = client.queue("once").counts
        done = (counts["succeeded"], counts["active"], counts["queued"])
        assert done == (1, 1, 1)
        assert first.result(timeout=5) == "ran"


def test_a_long_poll_resent_after_a_lost_reply_waits_only_what_is_left(
    proxy: LossyProxy,
) -> None:
    # The broker answers each long-poll after its whole wait and the reply is lost:
    # the resend must wait only what is left (it used to wait the whole wait again).
    with qclient.Client(proxy.url, timeout=5) as client:
        job = client.send("never-run")
        waits: dict[str, Callable[[], object]] = {
            "result": lambda: job.result(timeout=1.5),
            "results": lambda: client.results([job], timeout=1.5),
        }
        for name, call in waits.items():
            proxy.lose_replies(1)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                call()
            assert 1.4 < time.monotonic() - start < 2.5, name
        proxy.lose_replies(1)
        start = time.monotonic()
        assert client.lease(["empty-queue"], wait=1.5) == []
        assert 1.4 < time.monotonic() - start < 2.5


class ScriptedServer:
    """A one-thread HTTP server that answers each request with the next scripted
    reply, or drops the connection (None) after reading the request."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = list(script)
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.script:
            conn, _ = self.listener.accept()
            with conn:
                while self.script:
                    request = read_message(conn)
                    if request is None:
                        break
                    self.requests.append(request)
                    reply = self.script.pop(0)
                    if reply is None:
                        break
                    conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def reply(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


def test_first_duplicate_id_without_resend_is_an_error() -> None:
    dup = b'{"error": "duplicate_id", "message": "stored", "field": "id"}'
    server = ScriptedServer([reply(409, dup)])
    try:
        with (
            qclient.Client(server.url, encoding="json") as client,
            pytest.raises(qclient.DuplicateJob),
        ):
            client.send("q", job_id="chosen-id")
    finally:
        server.close()


def test_503_and_429_are_retried_then_surface() -> None:
    down = b'{"error": "shutting_down", "message": "bye"}'
    ok = b'{"status": "ok", "version": "x"}'
    server = ScriptedServer([reply(503, down), reply(429, down), reply(200, ok)])
    try:
        with qclient.Client(server.url, encoding="json") as client:
            assert client.health().status == "ok"
        assert len(server.requests) == 3
    finally:
        server.close()
    server = ScriptedServer([reply(503, down)] * 3)
    try:
        with qclient.Client(server.url, retries=2) as client:
            with pytest.raises(qclient.BrokerError) as info:
                client.health()
            assert (info.value.status, info.value.reason) == (503, "shutting_down")
    finally:
        server.close()


def test_error_body_that_is_not_error_body_still_raises_broker_error() -> None:
    server = ScriptedServer([reply(502, b"<html>bad gateway</html>", b"text/html")])
    try:
        with (
            qclient.Client(server.url) as client,
            pytest.raises(qclient.BrokerError) as info,
        ):
            client.health()
        assert info.value.status == 502
        assert "bad gateway" in info.value.message
    finally:
        server.close()


def test_token_is_sent_as_bearer_authorization(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(args=("--token", "s3cret")).start()
    with qclient.Client(broker.url, token="s3cret") as client:
        assert client.send("auth").status() is JobState.QUEUED
    with qclient.Client(broker.url, token="") as client:
        with pytest.raises(qclient.BrokerError) as info:
            client.send("auth")
        assert (info.value.status, info.value.reason) == (401, "unauthorized")


# ---------------------------------------------------------------- module level


@pytest.fixture
def default_client_reset() -> Iterator[None]:
    yield
    with _api._lock:
        old, _api._default = _api._default, None
        _api._configured = None  # configure()'s settings go too
    if old is not None:
        old.close()


@pytest.mark.usefixtures("default_client_reset")
def test_module_functions_use_the_configured_default_client(
    broker: BrokerProcess,
) -> None:
    client = qclient.configure(url=broker.url)
    assert qclient.default_client() is client
    job = qclient.send("module", [1])
    assert qclient.get_job(job.id).args == [1]
    assert qclient.job(job.id).status() is JobState.QUEUED
    jobs = qclient.send_many("module", [[2]])
    assert jobs[0].info().args == [2]


@pytest.mark.usefixtures("default_client_reset")
def test_default_client_reads_the_environment(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QBROKER_URL", broker.url)
    monkeypatch.setenv("QBROKER_TOKEN", "secret")
    client = qclient.default_client()
    assert client.url == broker.url
    assert b"Bearer secret" in b"".join(v for _, v in client._codec._get_headers)


# ---------------------------------------------------------------- async from sync


def test_async_client_works_under_asyncio(broker: BrokerProcess) -> None:
    async def main() -> None:
        async with qclient.AsyncClient(broker.url) as client:
            job = await client.send("aio", {"x": 1})
            assert await job.status() is JobState.QUEUED
            [leased] = await client.lease(["aio"], wait=DEADLINE)
            waiter = asyncio.ensure_future(job.result(timeout=DEADLINE))
            await client.ack(leased.id, leased.lease, "ok")
            assert await waiter == "ok"
            jobs = await asyncio.gather(
                *(client.send("aio-many", i) for i in range(50))
            )
            assert len({j.id for j in jobs}) == 50
            assert (await client.queue("aio-many")).counts["queued"] == 50
            with pytest.raises(qclient.JobNotFound):
                await client.get_job("nope")
            with pytest.raises(TimeoutError):
                await jobs[0].result(timeout=0.2)
            with pytest.raises(qclient.InvalidRequest):  # 413, read after a reset
                await client.send("aio", "x" * 20_000_000)
            assert (await client.health()).status == "ok"

    asyncio.run(main())
    asyncio.run(main_twice_same_client(broker.url))


async def main_twice_same_client(url: str) -> None:
    client = qclient.AsyncClient(url)
    assert (await client.health()).status == "ok"
    await client.aclose()
    with pytest.raises(RuntimeError):
        await client.health()


def test_one_async_client_moves_between_trio_and_asyncio(broker: BrokerProcess) -> None:
    # Each run's pooled connections are never used by another run; one left by a
    # trio run is closed without trio when the client is next used from asyncio.
    import trio  # type: ignore[import-untyped, unused-ignore]  # trio 0.22: no py.typed

    client = qclient.AsyncClient(broker.url)

    async def health() -> str:
        return (await client.health()).status

    assert trio.run(health) == "ok"
    assert asyncio.run(health()) == "ok"
    assert trio.run(health) == "ok"
    assert asyncio.run(health()) == "ok"
    asyncio.run(client.aclose())


# ---------------------------------------------------------------- pure pieces


def test_new_job_ids_are_ulids_that_sort_by_time() -> None:
    first = new_job_id()
    time.sleep(0.002)
    second = new_job_id()
    assert len(first) == 26
    assert set(first) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert first < second
    ms = int(time.time() * 1000)
    decoded = 0
    for char in second[:10]:
        decoded = decoded * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert abs(decoded - ms) < 5000
    assert len({new_job_id() for _ in range(10000)}) == 10000


def test_new_job_ids_count_up_in_batch_order_across_carries() -> None:
    stamp = new_job_id(1234.5)[:10]
    for _ in range(50):  # random starts: some batches carry past a 10-bit group
        ids = new_job_ids(3000, 1234.5)
        assert len(set(ids)) == 3000
        assert ids == sorted(ids)
        assert all(len(i) == 26 and i[:10] >= stamp for i in ids)
        decoded = [int("".join(f"{CROCKFORD.index(c):05b}" for c in i), 2) for i in ids]
        assert decoded == list(range(decoded[0], decoded[0] + 3000))
    assert new_job_ids(0) == []


def test_crockford26_spells_a_number_as_ulid_text() -> None:
    for number in (0, 1, 31, 32, 2**128 - 1, 0x0123456789ABCDEF_FEDCBA9876543210):
        # The reference: long division, 26 digits base 32, most significant first.
        digits, rest = [], number
        for _ in range(26):
            rest, digit = divmod(rest, 32)
            digits.append(CROCKFORD[digit])
        assert crockford26(number) == "".join(reversed(digits))
    assert crockford26(2**128 - 1) == "7" + "Z" * 25


def test_split_error_finds_the_exception_type() -> None:
    split = _errors.split_error
    assert split("ValueError: bad: worse") == ("ValueError", "bad: worse")
    assert split("mod.sub.MyError: x") == ("mod.sub.MyError", "x")
    assert split("KeyboardInterrupt") == ("KeyboardInterrupt", "")
    assert split("it broke: badly") == ("", "it broke: badly")
    assert split("") == ("", "")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempt in range(12):
        delay = min(_retry.BACKOFF_MAX, _retry.BACKOFF_INITIAL * 2**attempt)
        for _ in range(20):
            assert delay / 2 <= _retry.backoff(attempt) <= delay


def test_errors_pickle_with_their_attributes() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(qclient.TaskFailed("j", "dead", "E", "m", "tb")))
    assert (error.job_id, error.state, error.exc_type, error.traceback) == (
        "j",
        "dead",
        "E",
        "tb",
    )
    broker_error = pickle.loads(pickle.dumps(qclient.StaleLease(409, "stale_lease")))
    assert isinstance(broker_error, qclient.StaleLease)
    assert broker_error.status == 409


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(qclient).items()
        if not name.startswith("_") and not isinstance(value, type(qclient))
    }
    assert public == set(qclient.__all__)
    assert qclient.__all__ == sorted(qclient.__all__)
    for name in qclient.__all__:
        assert getattr(qclient, name) is not None


def test_import_loads_no_sqlite3_trio_or_asyncio() -> None:
    code = (
        "import sys, qclient\n"
        "mods = ('sqlite3', 'trio', 'asyncio', 'qbroker')\n"
        "bad = [m for m in mods if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=child_env(), check=True, timeout=60
    )
