"""Celery on qbroker: the tutorial project in tests/celeryproj, whose settings alone
point at qbroker, run by `celery -A proj worker` with the prefork and threads pools."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient
from celery import chain, chord, group
from celery.result import AsyncResult

from tests.celerytools import (
    CELERY_PROJ,
    CeleryWorker,
    celery_env,
    entry_points_dir,
    free_port,
)
from tests.conftest import BrokerProcess

GET_TIMEOUT = 30.0  #: seconds a result may take on a loaded machine


@pytest.fixture(scope="module")
def eps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return entry_points_dir(tmp_path_factory.mktemp("eps"))


@pytest.fixture(scope="module")
def cbroker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker for the module: the test process's Celery app reads its URL once."""
    b = BrokerProcess(tmp_path_factory.mktemp("celery") / "data")
    b.start(free_port())
    yield b
    b.stop()


@pytest.fixture(scope="module")
def proj(cbroker: BrokerProcess, eps: Path) -> Iterator[Any]:
    """The tutorial project's tasks module, configured for this module's broker."""
    os.environ["CELERY_BROKER_URL"] = f"qbroker://127.0.0.1:{cbroker.port}"
    sys.path[:0] = [str(eps), str(CELERY_PROJ)]
    tasks = importlib.import_module("proj.tasks")
    yield tasks
    tasks.app.backend.rest.close()
    tasks.app.close()
    sys.path.remove(str(eps))
    sys.path.remove(str(CELERY_PROJ))
    os.environ.pop("CELERY_BROKER_URL", None)


@pytest.fixture(scope="module", params=["prefork", "threads"])
def worker(
    request: pytest.FixtureRequest,
    cbroker: BrokerProcess,
    eps: Path,
    tmp_path_factory: pytest.TempPathFactory,
    proj: Any,
) -> Iterator[CeleryWorker]:
    pool = request.param
    log = tmp_path_factory.mktemp(pool) / "worker.log"
    env = celery_env(cbroker.port, eps)
    args = ("-A", "proj", "worker", "-P", pool, "-c", "4", "-l", "INFO")
    w = CeleryWorker(log, env, *args, "-n", f"{pool}@%h").start()
    yield w
    w.stop()


def test_delay_get_returns_the_result(worker: CeleryWorker, proj: Any) -> None:
    assert proj.send_email.delay("x").get(timeout=GET_TIMEOUT) == "success"
    assert proj.add.delay(2, 3).get(timeout=GET_TIMEOUT) == 5


def test_countdown_runs_after_it_and_not_before(
    worker: CeleryWorker, proj: Any
) -> None:
    sent = time.time()
    result = proj.ran_at.apply_async(kwargs={}, countdown=2)
    assert result.get(timeout=GET_TIMEOUT) >= sent + 2


def test_retry_and_autoretry_end_with_their_result(
    worker: CeleryWorker, proj: Any
) -> None:
    retried = proj.retry_twice.delay()
    flaky = proj.flaky.delay()
    assert retried.get(timeout=GET_TIMEOUT) == 2
    assert flaky.get(timeout=GET_TIMEOUT) == 2


def test_a_failing_task_raises_its_exception(worker: CeleryWorker, proj: Any) -> None:
    result = proj.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=GET_TIMEOUT)
    assert result.state == "FAILURE"


def test_states_go_pending_started_success(
    worker: CeleryWorker, proj: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    result = proj.wait_for_file.apply_async((str(gate),), countdown=0.5)
    assert AsyncResult(result.id).state == "PENDING"
    deadline = time.monotonic() + GET_TIMEOUT
    while AsyncResult(result.id).state != "STARTED":
        assert time.monotonic() < deadline, AsyncResult(result.id).state
        time.sleep(0.05)
    gate.touch()
    assert result.get(timeout=GET_TIMEOUT) == "opened"
    assert AsyncResult(result.id).state == "SUCCESS"


def test_chain_group_and_a_chord_of_20_whose_callback_runs_once(
    worker: CeleryWorker, proj: Any, tmp_path: Path
) -> None:
    assert chain(proj.add.s(2, 2), proj.mul.s(4)).delay().get(timeout=GET_TIMEOUT) == 16
    got = group(proj.add.s(i, i) for i in range(10)).delay().get(timeout=GET_TIMEOUT)
    assert got == [2 * i for i in range(10)]
    calls = tmp_path / "calls"
    header = [proj.add.s(i, i) for i in range(20)]
    result = chord(header, proj.record_sum.s(str(calls))).delay()
    assert result.get(timeout=GET_TIMEOUT) == sum(2 * i for i in range(20))
    time.sleep(0.5)  # a second callback, if any, would land by now
    assert calls.read_text().split() == ["380"]


def test_a_job_that_is_not_a_celery_message_fails_with_the_reason(
    worker: CeleryWorker, proj: Any, cbroker: BrokerProcess
) -> None:
    with qclient.Client(cbroker.url) as client:
        job = client.send("celery", {"to": "a@b.c"}, task="send_email")
        record = client.wait_job(job.id, GET_TIMEOUT)
    assert record.state == "failed"
    assert record.error is not None and "NotACeleryMessage" in record.error
    # the worker goes on working
    assert proj.add.delay(1, 1).get(timeout=GET_TIMEOUT) == 2


def _slow_queue_worker(
    tmp_path: Path, name: str, port: int, eps: Path, pool: str = "prefork"
) -> CeleryWorker:
    args = ("-A", "proj", "worker", "-P", pool, "-c", "2", "-l", "INFO", "-Q", name)
    log = tmp_path / f"{name}.log"
    return CeleryWorker(log, celery_env(port, eps), *args, "-n", f"{name}@%h")


def test_acks_late_task_of_a_killed_worker_runs_again_on_a_new_one(
    proj: Any, cbroker: BrokerProcess, eps: Path, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    first = _slow_queue_worker(tmp_path, "killq", cbroker.port, eps).start()
    try:
        result = proj.slow_mark.apply_async((str(marks), 3.0), queue="killq")
        deadline = time.monotonic() + GET_TIMEOUT
        while not marks.exists():
            assert time.monotonic() < deadline, first.log()[-2000:]
            time.sleep(0.05)
    finally:
        first.kill()
    second = _slow_queue_worker(tmp_path, "killq", cbroker.port, eps).start()
    try:
        assert result.get(timeout=GET_TIMEOUT) == "done"
    finally:
        second.stop()
    assert len(marks.read_text().split()) == 2  # ran on both, nothing lost


def test_every_task_whose_delay_returned_completes_across_a_broker_sigkill(
    proj: Any, cbroker: BrokerProcess, eps: Path, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    worker = _slow_queue_worker(tmp_path, "restartq", cbroker.port, eps, "threads")
    worker.start()
    sent: list[Any] = []
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            sent.append(
                proj.count_call.apply_async((str(calls), i, 0.02), queue="restartq")
            )
            i += 1

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        deadline = time.monotonic() + GET_TIMEOUT
        while len(sent) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cbroker.kill()
        cbroker.start()
        time.sleep(0.3)
        stop.set()
        producer.join(GET_TIMEOUT)
        results = [r.get(timeout=GET_TIMEOUT) for r in sent]
        sent[0].backend.rest.close()  # the producer thread's (Celery's are per thread)
    finally:
        stop.set()
        worker.stop()
    assert results == list(range(len(sent)))
    assert set(map(int, calls.read_text().split())) == set(range(len(sent)))


def test_a_worker_started_before_the_broker_retries_and_says_so(
    proj: Any, eps: Path, tmp_path: Path
) -> None:
    port = free_port()
    worker = _slow_queue_worker(tmp_path, "lateq", port, eps, "threads")
    worker.start(wait_ready=False)
    late = BrokerProcess(tmp_path / "late")
    try:
        worker.wait_log("Cannot connect to")
        late.start(port)
        worker.wait_log(" ready.")
        with qclient.Client(late.url) as client:
            assert client.health().status == "ok"
    finally:
        worker.stop()
        late.stop()
    assert "Trying again" in worker.log()
