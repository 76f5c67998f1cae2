"""What a job carries, through a real broker and a real worker: argument and result
types (tagged values), eta/delay/expires given as datetimes and timedeltas, what a
send_many item means, and the one options signature of every send."""

from __future__ import annotations

import asyncio
import time
import typing
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import qclient
from qclient.tags import tag, untag
from qworker import Task, Worker

from tests import tasks_values

from .conftest import BrokerProcess

QUEUE = "qc_echo"
AWARE = datetime(2025, 1, 31, 12, 30, 15, 250000, tzinfo=timezone(timedelta(hours=2)))
#: one of each type JSON lacks, and the plain ones beside them
VALUES: list[Any] = [
    AWARE,
    datetime(2025, 1, 31, 12, 30),  # naive: kept naive
    date(2025, 1, 31),
    AWARE.timetz(),
    Decimal("1.10"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {1, 2, 3},
    frozenset({"a"}),
    b"\x00\xffbytes",
    "plain",
    7,
    None,
]


@pytest.fixture(params=["msgpack", "json"])
def client(request: pytest.FixtureRequest, broker: BrokerProcess) -> Iterator[Any]:
    with qclient.Client(broker.url, encoding=request.param, timeout=10) as c:
        yield c


def run_worker(url: str) -> None:
    worker = Worker([QUEUE], url=url, concurrency=2, lease_wait=0.5)
    assert worker.run(burst=True, handle_signals=False) == 0


def test_arguments_and_results_keep_their_types(client: qclient.Client) -> None:
    nested = {"when": [AWARE, {"ids": {uuid.UUID(int=1)}}], "price": Decimal("9.99")}
    job = client.send(QUEUE, args=VALUES, kwargs={"nested": nested, "day": VALUES[2]})
    bad = client.send(QUEUE, [{"__type__": "no-such-type", "__value__": 1}])
    # On the wire a value is tagged as protocol.md says (kombu's markers).
    stored = job.info()
    assert stored.args[0] == {"__type__": "datetime", "__value__": AWARE.isoformat()}
    assert stored.args[4] == {"__type__": "decimal", "__value__": "1.10"}
    assert stored.kwargs["day"] == {"__type__": "date", "__value__": "2025-01-31"}
    run_worker(client.url)
    args, kwargs, types = job.result(timeout=10)
    assert args == VALUES  # the task got them, returned them, and they came back
    assert [type(a) for a in args] == [type(v) for v in VALUES]
    assert args[0].utcoffset() == timedelta(hours=2)
    assert args[1].tzinfo is None
    assert kwargs == {"nested": nested, "day": VALUES[2]}
    assert types == [
        "datetime", "datetime", "date", "time", "Decimal", "UUID", "set",
        "frozenset", "bytes", "str", "int", "NoneType", "day=date", "nested=dict",
    ]  # fmt: skip
    assert client.results([job]) == [[args, kwargs, types]]
    with pytest.raises(qclient.TaskFailed) as info:
        bad.result(timeout=10)
    assert info.value.exc_type == "ValueError"
    assert "unknown tagged value type 'no-such-type'" in info.value.message


def test_the_async_client_tags_arguments_too(broker: BrokerProcess) -> None:
    async def main() -> list[Any]:
        async with qclient.AsyncClient(broker.url) as client:
            job = await client.send(QUEUE, {"at": AWARE, "n": Decimal("2.5")})
            [many] = await client.send_many(QUEUE, [[{1, 2}]])
            await asyncio.to_thread(run_worker, broker.url)
            return [await job.result(timeout=10), await many.result(timeout=10)]

    by_kwargs, by_item = asyncio.run(main())
    assert by_kwargs[1] == {"at": AWARE, "n": Decimal("2.5")}
    assert by_item[0] == [{1, 2}]


def test_tag_and_untag_are_inverse_and_tagging_twice_changes_nothing() -> None:
    value = {"a": VALUES, "t": (AWARE, bytearray(b"x"))}
    tagged = tag(value)
    assert tag(tagged) == tagged
    assert untag(tagged) == {"a": VALUES, "t": [AWARE, b"x"]}  # tuples become lists
    assert untag({"__type__": "bytes", "__value__": "hi"}) == b"hi"  # kombu's form
    with pytest.raises(ValueError, match="malformed tagged decimal"):
        untag({"__type__": "decimal", "__value__": "1.2.3"})


# ---------------------------------------------------------------- when a job runs


def test_eta_takes_an_aware_datetime_and_durations_a_timedelta(
    client: qclient.Client,
) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    record = client.send("when", eta=at).info()
    assert record.state is qclient.JobState.SCHEDULED
    assert record.available_at == pytest.approx(at.timestamp(), abs=0.01)
    before = time.time()
    record = client.send(
        "when",
        delay=timedelta(minutes=5),
        expires=timedelta(hours=2),
        timeout=timedelta(seconds=90),
    ).info()
    assert before + 300 <= record.available_at <= time.time() + 300
    assert record.expires_at is not None
    assert record.expires_at == pytest.approx(record.created_at + 7200, abs=1)
    assert record.timeout == 90
    ends = datetime.now(UTC) + timedelta(hours=3)
    record = client.send("when", expires=ends).info()
    assert record.expires_at == pytest.approx(ends.timestamp(), abs=1)
    with pytest.raises(ValueError, match="eta is a naive datetime"):
        client.send("when", eta=datetime.now() + timedelta(hours=1))
    with pytest.raises(ValueError, match="expires is a naive datetime"):
        qclient.spec(expires=datetime(2030, 1, 1))
    assert client.queue("when").counts["scheduled"] == 2  # the naive ones: nothing
    assert client.queue("when").counts["queued"] == 1


# ---------------------------------------------------------------- send_many items


def test_send_many_items_mean_what_send_payload_means(client: qclient.Client) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    items: list[Any] = [
        {"name": "m1"},
        [1, 2],
        ("t",),
        "solo",
        None,
        qclient.spec({"k": 1}, task="other", priority=7, job_id="own-1", eta=at),
        qclient.spec(args=[AWARE], dedup_key="d-1"),
        qclient.JobSpec(args=[9], max_retries=0),  # the wire's form, sent as it is
    ]
    jobs = client.send_many("items", items)
    records = [j.info() for j in jobs]
    assert [(r.args, r.kwargs) for r in records] == [
        ([], {"name": "m1"}),
        ([1, 2], {}),
        (["t"], {}),
        (["solo"], {}),
        ([], {}),
        ([], {"k": 1}),
        ([tag(AWARE)], {}),
        ([9], {}),
    ]
    own = records[5]
    assert (own.id, own.task, own.priority, own.state) == (
        "own-1",
        "other",
        7,
        "scheduled",
    )
    assert own.available_at == pytest.approx(at.timestamp(), abs=0.01)
    assert (records[6].dedup_key, records[7].max_retries) == ("d-1", 0)
    assert [j.id for j in jobs[:5]] == sorted(j.id for j in jobs[:5])  # in item order
    with pytest.raises(TypeError, match="'bogus'"):
        client.send_many("items", [qclient.spec(bogus=1)])  # type: ignore[call-arg]


@pytest.mark.usefixtures("default_client_reset")
def test_module_send_many_takes_a_dict_as_kwargs(broker: BrokerProcess) -> None:
    qclient.configure(url=broker.url)
    [job] = qclient.send_many("q", [{"name": "m1"}])  # the example
    assert job.info().kwargs == {"name": "m1"}


@pytest.fixture
def default_client_reset() -> Iterator[None]:
    yield
    qclient.configure()  # back to the environment's default for other tests


# ---------------------------------------------------------------- one options signature


def test_task_send_takes_every_option_qclient_send_takes(
    client: qclient.Client,
) -> None:
    echo = tasks_values.qc_echo
    ends = datetime.now(UTC) + timedelta(hours=1)
    job = echo.send(
        [1],
        {"x": AWARE},
        client=client,
        delay=timedelta(seconds=30),
        expires=ends,
        priority=3,
        job_id="task-send-1",
        max_retries=2,
        timeout=45,
        result_ttl=timedelta(days=1),
        headers={"trace": "t-1"},
        dedup_key="once",
    )
    record = job.info()
    assert (record.id, record.queue, record.task) == ("task-send-1", QUEUE, "qc_echo")
    assert (record.args, record.kwargs) == ([1], {"x": tag(AWARE)})
    assert (record.priority, record.max_retries, record.timeout) == (3, 2, 45)
    assert (record.headers, record.dedup_key) == ({"trace": "t-1"}, "once")
    assert record.state is qclient.JobState.SCHEDULED
    assert record.expires_at == pytest.approx(ends.timestamp(), abs=1)
    with pytest.raises(qclient.DuplicateJob) as info:
        echo.send(client=client, dedup_key="once")
    assert info.value.reason == "duplicate_dedup_key"
    with pytest.raises(TypeError, match="'bogus'"):
        echo.send(client=client, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'task'"):
        echo.send(client=client, task="other")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'bogus'"):
        client.send(QUEUE, bogus=1)  # type: ignore[call-arg]


def test_every_send_declares_the_one_options_type() -> None:
    def options_of(fn: Any) -> Any:
        hints = typing.get_type_hints(
            fn, None, {"qclient": qclient}, include_extras=True
        )
        return hints["options"]

    sends = [qclient.send, qclient.Client.send, qclient.AsyncClient.send, qclient.spec]
    assert {options_of(fn) for fn in sends} == {typing.Unpack[qclient.SendOptions]}
    assert options_of(Task.send) == typing.Unpack[qclient.JobOptions]
    job_keys = qclient.JobOptions.__optional_keys__
    send_keys = qclient.SendOptions.__optional_keys__
    assert send_keys - job_keys == {"task", "args", "kwargs"}
    assert {"dedup_key", "eta", "delay", "expires"} <= job_keys
