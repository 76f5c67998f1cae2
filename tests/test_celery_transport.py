"""The kombu transport itself, through kombu's own API (no Celery worker): put, get,
ack, requeue without a second copy, reject, size and purge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import qclient
from kombu.connection import Connection

from tests.conftest import BrokerProcess

TIMEOUT = 10.0


def _counts(broker: BrokerProcess, queue: str) -> dict[str, int]:
    with qclient.Client(broker.url) as client:
        return client.queue(queue).counts


@pytest.fixture
def conn(broker: BrokerProcess) -> Iterator[Connection]:
    url = broker.url.replace("http://", "qbroker://")
    with Connection(url, transport="qclient.celery:Transport") as c:
        yield c


def test_put_get_ack_settles_the_job(conn: Connection, broker: BrokerProcess) -> None:
    q = conn.SimpleQueue("kq")
    q.put({"n": 1})
    assert q.qsize() == 1
    message = q.get(timeout=TIMEOUT)
    assert message.payload == {"n": 1}
    message.ack()
    counts = _counts(broker, "kq")
    assert (counts["succeeded"], counts["queued"], counts["active"]) == (1, 0, 0)
    q.close()


def test_requeue_releases_the_job_instead_of_a_second_copy(
    conn: Connection, broker: BrokerProcess
) -> None:
    q = conn.SimpleQueue("rq")
    q.put("once")
    first = q.get(timeout=TIMEOUT)
    first.requeue()
    counts = _counts(broker, "rq")
    assert (counts["queued"], counts["active"]) == (1, 0)
    again = q.get(timeout=TIMEOUT)
    assert again.payload == "once"
    again.reject()  # no requeue: the job ends failed, with the reason
    counts = _counts(broker, "rq")
    assert (counts["failed"], counts["queued"]) == (1, 0)
    q.close()


def test_purge_and_size(conn: Connection) -> None:
    q = conn.SimpleQueue("sq")
    for i in range(5):
        q.put(i)
    assert q.qsize() == 5
    assert q.clear() == 5
    assert q.qsize() == 0
    q.close()


def test_the_qbroker_alias_is_registered_on_import(broker: BrokerProcess) -> None:
    import qclient.celery  # registers the alias

    with Connection(broker.url.replace("http://", "qbroker://")) as c:
        q = c.SimpleQueue("aq")
        q.put("via alias")
        message = q.get(timeout=TIMEOUT)
        message.ack()
        assert message.payload == "via alias"
        q.close()
    with qclient.Client(broker.url) as client:
        assert client.queue("aq").counts["succeeded"] == 1
