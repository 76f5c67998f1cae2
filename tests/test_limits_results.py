"""`POST /v1/results` replies have a byte budget (issue 21, item 1): a repeated id is
answered once, records past the budget are `omitted` for the client to ask again, and
qclient follows that so `results()` still returns every result."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest
import qclient
import trio  # type: ignore[import-untyped, unused-ignore]  # trio 0.22: no py.typed

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire

BIG = 1_000_000  #: characters of a big result (an ack body stays under 1 MiB)
BUDGET = 4 * 1024 * 1024  #: config.RESULTS_REPLY_BYTES


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url, timeout=60)
    yield w
    w.close()


def _big_jobs(w: Wire, queue: str, n: int) -> list[str]:
    """`n` jobs of `queue` that succeeded with a ~1 MB result each (`<k>` + 'x's)."""
    ids = w.ok("POST", f"/v1/queues/{queue}/jobs", {"jobs": [{}] * n})["ids"]
    for job in w.lease(queue, max=n):
        k = ids.index(job["id"])
        result = f"{k:04d}" + "x" * (BIG - 4)
        w.ok(
            "POST",
            f"/v1/jobs/{job['id']}/ack",
            {"lease": job["lease"], "result": result},
        )
    return list(ids)


def _rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_big_result_asked_1000_times_gets_one_small_reply(
    broker: BrokerProcess, wire: Wire
) -> None:
    [job_id] = _big_jobs(wire, "amp", 1)
    assert broker.proc is not None
    before = _rss_peak_kib(broker.proc.pid)
    body = json.dumps({"ids": [job_id] * 1000}).encode()
    for accept in ("application/json", "application/msgpack"):
        status, raw, headers = wire.raw(
            "POST", "/v1/results", body,
            {"Content-Type": "application/json", "Accept": accept},
        )  # fmt: skip
        assert status == 200
        assert len(raw) < BIG + 10_000, len(raw)  # was 1,000,371,010 bytes
        reply = (
            msgspec.msgpack.decode(raw)
            if headers["content-type"].startswith("application/msgpack")
            else json.loads(raw)
        )
        assert [r["id"] for r in reply["jobs"]] == [job_id]
        assert reply["omitted"] == []
        assert len(reply["jobs"][0]["result"]) == BIG
    grown = _rss_peak_kib(broker.proc.pid) - before
    print(
        f"\n1,000 x one 1 MB result: replies of {len(raw):,} bytes; peak RSS +{grown} KiB"
    )
    assert grown < 64 * 1024, f"peak RSS grew by {grown} KiB"  # was ~1.9 GiB


def test_records_past_the_budget_are_omitted_in_order(wire: Wire) -> None:
    ids = _big_jobs(wire, "budget", 7)
    small = wire.enqueue("budget")
    asked = [small, *ids, ids[0], "no-such-job"]
    status, raw, _ = wire.raw(
        "POST", "/v1/results", json.dumps({"ids": asked}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200
    assert len(raw) <= BUDGET + 1000, len(raw)
    reply = json.loads(raw)
    n = len(reply["jobs"])
    assert n == 5  # the small job and four of ~1 MB fit in 4 MiB; a fifth would not
    distinct = [small, *ids, "no-such-job"]  # ids[0] again is answered once
    assert reply["omitted"] == distinct[n:]
    assert [r["id"] for r in reply["jobs"]] == distinct[:n]
    # asked again, the omitted ones come (a reply holds at least one record)
    again = wire.ok("POST", "/v1/results", {"ids": reply["omitted"]})
    assert [r and r["id"] for r in again["jobs"]] == [ids[4], ids[5], ids[6], None]
    assert again["omitted"] == []
    # one record bigger than the budget still comes, alone
    assert wire.ok("POST", "/v1/results", {"ids": [ids[0]]})["omitted"] == []


def test_client_results_follows_omitted_across_many_big_results(
    broker: BrokerProcess, wire: Wire
) -> None:
    ids = _big_jobs(wire, "many", 13)
    asked = [*ids, ids[2], ids[0]]
    with qclient.Client(broker.url) as client:
        results = client.results(asked, timeout=60)
        records = client.final_records([client.job(i) for i in asked], timeout=60)
        got = client.wait_jobs(["nope", ids[12], "nope"], 0)
        assert got == [None, client.get_job(ids[12]), None]
    expected = [f"{ids.index(i):04d}" + "x" * (BIG - 4) for i in asked]
    assert results == expected
    assert [r.id if r else None for r in records] == asked

    async def run() -> list[object]:
        async with qclient.AsyncClient(broker.url) as ac:
            return await ac.results(asked, timeout=60)

    assert trio.run(run) == expected
