"""The async client under trio (pytest-trio's trio_mode) against a real broker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import qclient
import trio  # type: ignore[import-untyped, unused-ignore]  # trio 0.22: no py.typed
from qclient.wire import JobState

from .conftest import BrokerFactory, BrokerProcess
from .lossyproxy import LossyProxy, unanswered_address

DEADLINE = 10.0  #: seconds any single wait in these tests may take


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[qclient.AsyncClient]:
    async with qclient.AsyncClient(broker.url) as c:
        yield c


async def test_send_info_and_status(client: qclient.AsyncClient) -> None:
    job = await client.send("t-emails", {"to": "a@b.c"}, priority=3)
    assert isinstance(job, qclient.AsyncJob)
    assert job.queue == "t-emails"
    record = await job.info()
    assert (record.id, record.kwargs, record.priority) == (job.id, {"to": "a@b.c"}, 3)
    assert await job.status() is JobState.QUEUED
    assert (await client.health()).status == "ok"
    assert "t-emails" in {q.queue for q in await client.queues()}


async def test_a_resent_enqueue_is_success_only_if_its_own_jobs_are_stored(
    broker: BrokerProcess,
) -> None:
    proxy = LossyProxy(broker.port)  # see test_client.py's test of the same name
    try:
        async with qclient.AsyncClient(proxy.url) as client:
            proxy.lose_replies(1)
            jobs = await client.send_many("lossy", [[i] for i in range(3)])
            assert [(await j.info()).args for j in jobs] == [[0], [1], [2]]
            await client.send("lossy", ["old"], job_id="taken")
            proxy.swallow(1)
            with pytest.raises(qclient.DuplicateJob):
                await client.send_many("lossy", [[7], qclient.spec(job_id="taken")])
            assert (await client.queue("lossy")).counts["queued"] == 4
    finally:
        proxy.close()


async def test_a_long_poll_resent_after_a_lost_reply_waits_only_what_is_left(
    broker: BrokerProcess,
) -> None:
    proxy = LossyProxy(broker.port)  # see test_client.py's test of the same name
    try:
        async with qclient.AsyncClient(proxy.url, timeout=5) as client:
            job = await client.send("never-run")
            proxy.lose_replies(1)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                await job.result(timeout=1.5)
            proxy.lose_replies(1)
            assert await client.lease(["empty-queue"], wait=1.5) == []
            assert 2.8 < time.monotonic() - start < 4.5
    finally:
        proxy.close()


async def test_a_call_ends_within_its_timeout_when_connects_hang() -> None:
    listener, filling = unanswered_address()  # see test_client.py
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        async with qclient.AsyncClient(url, timeout=1) as client:
            with pytest.raises(qclient.ProtocolError):
                await client.health()
        assert time.monotonic() - start < 3
    finally:
        for s in (listener, *filling):
            s.close()


async def test_send_many_and_lease_many(client: qclient.AsyncClient) -> None:
    jobs = await client.send_many("t-bulk", [[i] for i in range(1500)])
    assert len({j.id for j in jobs}) == 1500
    assert (await client.queue("t-bulk")).counts["queued"] == 1500
    leased = await client.lease(["t-bulk"], max=10, wait=DEADLINE)
    assert [j.args for j in leased] == [[i] for i in range(10)]
    items = [qclient.AckItem(id=j.id, lease=j.lease, result=j.args[0]) for j in leased]
    assert all(r.ok for r in await client.ack_many(items))
    assert await jobs[9].result(timeout=DEADLINE) == 9


async def test_result_is_woken_by_ack_from_another_task(
    client: qclient.AsyncClient,
) -> None:
    job = await client.send("t-work", [2, 3])
    results: list[object] = []

    async def wait_for_result() -> None:
        results.append(await job.result(timeout=DEADLINE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_result)
        [leased] = await client.lease(["t-work"], wait=DEADLINE)
        assert leased.args == [2, 3]
        reply = await client.extend(leased.id, leased.lease, 60)
        assert not reply.cancelled
        await client.ack(leased.id, leased.lease, 5)
    assert results == [5]


async def test_results_waits_for_many_jobs(client: qclient.AsyncClient) -> None:
    jobs = await client.send_many("t-gather", [[i] for i in range(5)])
    got: list[object] = []

    async def gather() -> None:
        got.extend(await client.results(jobs, timeout=DEADLINE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gather)
        leased = await client.lease(["t-gather"], max=5, wait=DEADLINE)
        await trio.sleep(0.2)
        assert got == []
        items = [qclient.AckItem(j.id, j.lease, j.args[0] + 1) for j in leased]
        await client.ack_many(items)
    assert got == [1, 2, 3, 4, 5]


async def test_failures_surface_as_exceptions(client: qclient.AsyncClient) -> None:
    job = await client.send("t-boom")
    [leased] = await client.lease(["t-boom"], wait=DEADLINE)
    assert await client.fail(leased.id, leased.lease, "KeyError: 'k'", "tb") == "failed"
    with pytest.raises(qclient.TaskFailed) as info:
        await job.result(timeout=DEADLINE)
    assert (info.value.exc_type, info.value.message) == ("KeyError", "'k'")
    assert info.value.traceback == "tb"
    with pytest.raises(qclient.StaleLease):
        await client.ack(leased.id, leased.lease)
    with pytest.raises(qclient.JobNotFound):
        await client.get_job("t-missing")
    other = await client.send("t-cancel")
    assert await other.cancel() is JobState.CANCELLED
    with pytest.raises(qclient.JobCancelled):
        await other.result(timeout=DEADLINE)


async def test_release_and_fail_many(client: qclient.AsyncClient) -> None:
    await client.send_many("t-rel", [None, None])
    first, second = await client.lease(["t-rel"], max=2, wait=DEADLINE)
    await client.release(first.id, first.lease)
    await client.release(first.id, first.lease)  # a resend: ok, nothing changes
    [again] = await client.lease(["t-rel"], wait=DEADLINE)
    assert (again.id, again.attempt) == (first.id, 1)
    with pytest.raises(qclient.StaleLease):  # that token's delivery is over
        await client.release(first.id, first.lease)
    results = await client.fail_many(
        [qclient.FailItem(id=second.id, lease=second.lease, error="E: x")]
    )
    assert [r.ok for r in results] == [True]


async def test_result_timeout(client: qclient.AsyncClient) -> None:
    job = await client.send("t-idle")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.3)
    assert 0.25 < time.monotonic() - start < 5.0


async def test_concurrent_tasks_share_one_client(client: qclient.AsyncClient) -> None:
    ids: list[str] = []

    async def produce(n: int) -> None:
        for i in range(20):
            ids.append((await client.send("t-conc", {"n": n, "i": i})).id)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(produce, n)
    assert len(set(ids)) == 200
    assert (await client.queue("t-conc")).counts["queued"] == 200


async def test_send_survives_broker_restart(broker: BrokerProcess) -> None:
    async with qclient.AsyncClient(broker.url, retries=10) as client:
        await client.send("t-warm")
        broker.kill()
        jobs: list[qclient.AsyncJob] = []

        async def produce() -> None:
            jobs.append(await client.send("t-restart"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            await trio.to_thread.run_sync(broker.start)
        assert len(jobs) == 1
        assert (await client.queue("t-restart")).counts["queued"] == 1


async def test_cancelled_request_closes_its_connection(
    client: qclient.AsyncClient,
) -> None:
    with trio.move_on_after(0.2):
        await client.lease(["t-never"], wait=30)  # cancelled mid long-poll
    assert (await client.health()).status == "ok"  # a fresh socket serves the next call


async def test_body_over_the_limit_is_invalid(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(args=("--max-body", "4000")).start()
    async with qclient.AsyncClient(broker.url) as client:
        for size in (5000, 20_000_000):
            with pytest.raises(qclient.InvalidRequest) as info:
                await client.send("limit", "x" * size)
            assert info.value.status == 413
        jobs = await client.send_many("limit", [["y" * 100]] * 100)
        assert len({j.id for j in jobs}) == 100


async def test_json_encoding(broker: BrokerProcess) -> None:
    async with qclient.AsyncClient(broker.url, encoding="json") as client:
        job = await client.send("t-json", ["x"])
        assert (await job.info()).args == ["x"]
