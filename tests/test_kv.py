"""The key-value endpoints (`/v1/kv/*`) and `POST /v1/queues/{queue}/purge`, on the wire."""

from __future__ import annotations

import threading
import time

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire


def _get(w: Wire, *keys: str, **body: object) -> list[dict[str, object]]:
    return list(w.ok("POST", "/v1/kv/get", {"keys": list(keys), **body})["items"])


def test_set_then_get_returns_the_value_and_a_growing_version(
    broker: BrokerProcess,
) -> None:
    w = Wire(broker.url)
    assert _get(w, "a") == [{"key": "a", "value": None, "version": 0}]
    v1 = w.ok("POST", "/v1/kv/set", {"key": "a", "value": {"x": [1, 2]}})["version"]
    v2 = w.ok("POST", "/v1/kv/set", {"key": "b", "value": "text"})["version"]
    v3 = w.ok("POST", "/v1/kv/set", {"key": "a", "value": 3})["version"]
    assert 0 < v1 < v2 < v3
    assert _get(w, "a", "b", "nope", "a") == [
        {"key": "a", "value": 3, "version": v3},
        {"key": "b", "value": "text", "version": v2},
        {"key": "nope", "value": None, "version": 0},
        {"key": "a", "value": 3, "version": v3},
    ]
    w.close()


def test_a_get_long_poll_is_woken_by_the_write_of_one_of_its_keys(
    broker: BrokerProcess,
) -> None:
    w = Wire(broker.url)
    seen = w.ok("POST", "/v1/kv/set", {"key": "state", "value": "STARTED"})["version"]

    def later() -> None:
        time.sleep(0.3)
        other = Wire(broker.url)
        other.ok("POST", "/v1/kv/set", {"key": "state", "value": "SUCCESS"})
        other.close()

    writer = threading.Thread(target=later)
    start = time.monotonic()
    writer.start()
    [item] = _get(w, "state", versions=[seen], wait=30)
    took = time.monotonic() - start
    writer.join()
    assert item["value"] == "SUCCESS"
    assert took < 20  # woken by the write, not by the end of its 30 s wait
    # a version already different answers at once
    assert _get(w, "state", versions=[seen], wait=30)[0]["value"] == "SUCCESS"
    w.close()


def test_a_key_past_its_ttl_reads_as_absent(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    w.ok("POST", "/v1/kv/set", {"key": "short", "value": 1, "ttl": 0.2})
    w.ok("POST", "/v1/kv/set", {"key": "long", "value": 2, "ttl": 3600})
    deadline = time.monotonic() + 10
    while _get(w, "short")[0]["version"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _get(w, "long")[0]["value"] == 2
    w.close()


def test_incr_counts_from_zero_and_refuses_a_key_that_is_no_integer(
    broker: BrokerProcess,
) -> None:
    w = Wire(broker.url)
    assert w.ok("POST", "/v1/kv/incr", {"key": "n"})["value"] == 1
    assert w.ok("POST", "/v1/kv/incr", {"key": "n", "by": 5, "ttl": 60})["value"] == 6
    assert _get(w, "n")[0]["value"] == 6
    w.ok("POST", "/v1/kv/set", {"key": "s", "value": "x"})
    status, reply = w.call("POST", "/v1/kv/incr", {"key": "s"})
    assert (status, reply["error"], reply["field"]) == (422, "invalid_field", "key")
    assert _get(w, "s")[0]["value"] == "x"  # left as it was
    w.close()


def test_many_increments_at_once_each_count(broker: BrokerProcess) -> None:
    def bump() -> None:
        w = Wire(broker.url)
        for _ in range(20):
            w.ok("POST", "/v1/kv/incr", {"key": "chord"})
        w.close()

    threads = [threading.Thread(target=bump) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = Wire(broker.url)
    assert _get(w, "chord")[0]["value"] == 100
    w.close()


def test_expire_and_delete_say_how_many_keys_they_found(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    w.ok("POST", "/v1/kv/set", {"key": "k", "value": 1})
    assert w.ok("POST", "/v1/kv/expire", {"key": "k", "ttl": 3600}) == {"count": 1}
    assert w.ok("POST", "/v1/kv/expire", {"key": "gone", "ttl": 1}) == {"count": 0}
    assert w.ok("POST", "/v1/kv/delete", {"keys": ["k", "gone"]}) == {"count": 1}
    assert _get(w, "k")[0]["version"] == 0
    w.close()


def test_bad_kv_requests_get_422_naming_the_field(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    for path, body, field in [
        ("/v1/kv/set", {"key": "a b", "value": 1}, "key"),
        ("/v1/kv/set", {"key": "a", "value": 1, "ttl": 0}, "ttl"),
        ("/v1/kv/get", {"keys": []}, "keys"),
        ("/v1/kv/get", {"keys": ["a"], "versions": [1, 2]}, "versions"),
        ("/v1/kv/get", {"keys": ["a"], "wait": 301}, "wait"),
        ("/v1/kv/incr", {"key": "a", "by": "1"}, "by"),
    ]:
        status, reply = w.call("POST", path, body)
        assert (status, reply["error"], reply["field"]) == (422, "invalid_field", field)
    w.close()


def test_values_survive_a_broker_sigkill(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    w.ok("POST", "/v1/kv/set", {"key": "kept", "value": [1, "two"]})
    w.close()
    broker.kill()
    broker.start()
    w = Wire(broker.url)
    assert _get(w, "kept")[0]["value"] == [1, "two"]
    w.close()


def test_purge_deletes_waiting_jobs_and_leaves_leased_ones(
    broker: BrokerProcess,
) -> None:
    w = Wire(broker.url)
    for _ in range(3):
        w.enqueue("pq")
    w.enqueue("pq", delay=3600)
    w.enqueue("other")
    [leased] = w.lease("pq")
    assert w.ok("POST", "/v1/queues/pq/purge") == {"deleted": 3}
    counts = w.ok("GET", "/v1/queues/pq")["counts"]
    assert (counts["scheduled"], counts["active"], counts["queued"]) == (0, 1, 0)
    assert w.ok("GET", "/v1/queues/other")["counts"]["queued"] == 1
    assert w.ok("POST", "/v1/queues/pq/purge") == {"deleted": 0}
    assert w.job(leased["id"])["state"] == "active"
    w.close()
