"""Long-poll wake-ups: a job that becomes ready reaches a live waiting lease at once,
whatever else is parked (long-polls whose client has gone, long-polls an enqueue has
already claimed) and however small its delay."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire, post_request, read_replies

#: a live long-poll's wait; woken in time means well before it runs out
WAIT = 20.0


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url)
    yield w
    w.close()


def _lease_later(
    url: str, queue: str, got: dict[str, Any], name: str
) -> threading.Thread:
    """A lease long-poll (WAIT seconds) in a thread; `got[name]` = (seconds, ids)."""

    def run() -> None:
        w = Wire(url)
        t0 = time.monotonic()
        jobs = w.lease(queue, wait=WAIT)
        got[name] = (time.monotonic() - t0, [j["id"] for j in jobs])
        w.close()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)  # parked, in the order started
    return thread


def _woken_in_time(poll: threading.Thread, got: dict[str, Any], name: str) -> list[str]:
    """The ids long-poll `name` (`_lease_later`) got, once it is done; it must have
    been woken well before its wait ran out."""
    poll.join(WAIT + 10)
    seconds, ids = got[name]
    assert seconds < WAIT / 2, seconds
    return list(ids)


def test_a_release_wakes_the_live_long_poll_behind_one_whose_client_has_gone(
    wire: Wire, broker: BrokerProcess
) -> None:
    job_id = wire.enqueue("rel")
    [job] = wire.lease("rel")
    gone = socket.create_connection(("127.0.0.1", broker.port))
    gone.sendall(post_request("/v1/lease", {"queues": ["rel"], "wait": 30}))
    time.sleep(0.3)  # parked first
    gone.close()
    got: dict[str, Any] = {}
    live = _lease_later(broker.url, "rel", got, "live")
    wire.ok("POST", f"/v1/jobs/{job_id}/release", {"lease": job["lease"]})
    assert _woken_in_time(live, got, "live") == [job_id]


def test_a_wake_up_is_not_spent_on_a_long_poll_an_enqueue_has_claimed(
    wire: Wire, broker: BrokerProcess
) -> None:
    # Two long-polls park on a queue. An enqueue claims the first (its commit hands
    # it the new job) while a release of another job commits in the same group
    # commit: the release's wake-up must reach the second long-poll, not the first.
    # A big enqueue to another queue keeps the writer busy so the two share a commit.
    big = post_request("/v1/queues/claimed-big/jobs", {"jobs": [{}] * 6000})
    for trial in range(4):
        queue = f"claimed-{trial}"
        released = wire.enqueue(queue)
        [job] = wire.lease(queue)
        got: dict[str, Any] = {}
        polls = [_lease_later(broker.url, queue, got, n) for n in ("first", "second")]
        socks = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(3)]
        socks[0].sendall(big)
        time.sleep(0.005)
        socks[1].sendall(
            post_request(f"/v1/queues/{queue}/jobs", {"id": f"new-{trial}"})
        )
        socks[2].sendall(
            post_request(f"/v1/jobs/{released}/release", {"lease": job["lease"]})
        )
        for sock in socks:
            [(status, _)] = read_replies(sock, 1)
            assert status in (200, 201)
            sock.close()
        for poll in polls:
            poll.join(WAIT + 10)
        assert sorted(i for _, ids in got.values() for i in ids) == sorted(
            [released, f"new-{trial}"]
        ), got
        slowest = max(seconds for seconds, _ in got.values())
        assert slowest < WAIT / 2, (trial, got)


@pytest.mark.parametrize("delay", [1e-9, 0.0])
def test_a_delay_too_small_to_count_is_none_for_a_waiting_lease(
    wire: Wire, broker: BrokerProcess, delay: float
) -> None:
    # The store queues a job whose delay does not move the clock's float: the
    # enqueue must then treat it as ready, and hand it to the waiting lease.
    got: dict[str, Any] = {}
    poll = _lease_later(broker.url, "tiny", got, "poll")
    job_id = wire.enqueue("tiny", delay=delay)
    assert _woken_in_time(poll, got, "poll") == [job_id]


def test_sigterm_lets_a_reply_being_written_finish(
    wire: Wire, broker: BrokerProcess
) -> None:
    # A committed lease whose ~900 KB reply a slow client is still reading when the
    # broker is told to stop: the whole reply is delivered before it exits.
    job_id = wire.enqueue("big", args=["x" * 900_000])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", broker.port))
    sock.sendall(post_request("/v1/lease", {"queues": ["big"]}))
    time.sleep(0.5)  # leased and committed; the reply waits for the client to read
    assert broker.proc is not None
    broker.proc.send_signal(15)
    time.sleep(0.5)  # a client a little slow to read
    sock.settimeout(10)
    [(status, body)] = read_replies(sock, 1)
    assert status == 200
    assert isinstance(body, dict)
    [job] = body["jobs"]
    assert job["id"] == job_id and len(job["args"][0]) == 900_000
    sock.close()
    assert broker.proc.wait(15) == 0


def test_unknown_paths_and_methods_get_401_without_the_token(
    broker_factory: Any,
) -> None:
    b = broker_factory(name="auth", args=("--token", "s3cret")).start()
    w = Wire(b.url)
    for method, path in (("GET", "/v1/nope"), ("DELETE", "/v1/lease"),
                         ("POST", "/healthz"), ("GET", "/v1/queues")):  # fmt: skip
        status, raw, _ = w.raw(method, path)
        assert status == 401 and json.loads(raw)["error"] == "unauthorized", path
    assert w.call("GET", "/healthz")[0] == 200
    auth = {"Authorization": "Bearer s3cret"}
    assert w.raw("GET", "/v1/nope", None, auth)[0] == 404
    assert w.raw("DELETE", "/v1/lease", None, auth)[0] == 405
    w.close()
