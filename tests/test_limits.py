"""Limits against an unlucky operator (issue 21): the database file deleted or replaced
under a running broker, and a free-space floor that keeps the queue draining."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerFactory, BrokerProcess
from tests.test_faults import _mount_tmpfs, _umount
from tests.wirehttp import Wire, wait_for


@pytest.fixture
def wire() -> Iterator[type[Wire]]:
    """`Wire` for the test: every connection made through it is closed at its end."""
    made: list[Wire] = []

    class Closing(Wire):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            made.append(self)

    yield Closing
    for w in made:
        w.close()


# ---------------------------------------------------------------- database file gone


def _healthz(w: Wire) -> tuple[int, dict[str, str]]:
    status, reply = w.call("GET", "/healthz")
    return status, reply


def test_deleted_database_fails_healthz_and_refuses_writes(
    broker: BrokerProcess, wire: type[Wire]
) -> None:
    w = wire(broker.url)
    kept = w.enqueue("gone")
    (broker.data_dir / "qbroker.db").unlink()

    status, reply = w.call("POST", "/v1/queues/gone/jobs", {"args": [1]})
    assert (status, reply["error"]) == (503, "database_gone"), reply
    assert "deleted" in reply["message"] and "restart" in reply["message"]
    for method, path, body in (
        ("POST", "/v1/lease", {"queues": ["gone"]}),
        ("POST", f"/v1/jobs/{kept}/cancel", None),
        ("POST", "/v1/queues/gone/jobs", {"jobs": [{}, {}]}),
    ):
        status, reply = w.call(method, path, body)
        assert (status, reply["error"]) == (503, "database_gone"), (path, reply)
    status, reply = _healthz(w)
    assert (status, reply["error"]) == (503, "database_gone")
    assert w.job(kept)["state"] == "queued"  # reads of the open file go on
    wait_for(lambda: "db.gone" in broker.log_path.read_text())
    # the reaper's sweeps (one a second) fail the same way: the broker stays up
    time.sleep(2.5)
    assert broker.proc is not None and broker.proc.poll() is None
    assert _healthz(w)[0] == 503
    assert broker.stop() == 0


def test_replaced_database_refuses_writes(
    broker: BrokerProcess, wire: type[Wire]
) -> None:
    w = wire(broker.url)
    w.enqueue("swap")
    other = broker.data_dir / "other.db"
    sqlite3.connect(other).close()
    os.replace(other, broker.data_dir / "qbroker.db")

    status, reply = w.call("POST", "/v1/queues/swap/jobs", {})
    assert (status, reply["error"]) == (503, "database_gone"), reply
    assert "replaced" in reply["message"]
    assert _healthz(w)[0] == 503


def test_deleted_wal_refuses_writes(broker: BrokerProcess, wire: type[Wire]) -> None:
    w = wire(broker.url)
    w.enqueue("wal")
    (broker.data_dir / "qbroker.db-wal").unlink()
    status, reply = w.call("POST", "/v1/queues/wal/jobs", {})
    assert (status, reply["error"]) == (503, "database_gone"), reply


# ---------------------------------------------------------------- free-space floor

NEVER = str(10**18)  #: a floor above any disk's free space


def _drain_works(w: Wire, queue: str) -> None:
    """Leases, acks, fails, extends, releases and cancels all still work."""
    a, b, c, d = w.lease(queue, max=4, timeout=30)
    w.ok("POST", f"/v1/jobs/{a['id']}/extend", {"lease": a["lease"], "timeout": 30})
    w.ok("POST", f"/v1/jobs/{a['id']}/ack", {"lease": a["lease"], "result": "x" * 500})
    w.ok("POST", f"/v1/jobs/{b['id']}/fail", {"lease": b["lease"], "error": "E: e"})
    w.ok("POST", f"/v1/jobs/{c['id']}/release", {"lease": c["lease"]})
    w.ok("POST", "/v1/ack", {"acks": [{"id": d["id"], "lease": d["lease"]}]})
    w.ok("POST", f"/v1/jobs/{c['id']}/cancel")
    assert w.job(a["id"])["state"] == "succeeded"
    assert w.job(b["id"])["state"] == "failed"
    assert w.job(c["id"])["state"] == "cancelled"
    assert w.job(d["id"])["state"] == "succeeded"


def test_min_free_disk_above_free_space_refuses_enqueues_only(
    broker_factory: BrokerFactory, wire: type[Wire]
) -> None:
    b = broker_factory(args=("--min-free-disk", "0")).start()
    w = wire(b.url)
    w.ok("POST", "/v1/queues/low/jobs", {"jobs": [{"args": [i]} for i in range(6)]})
    b.stop()
    b.args = ("--min-free-disk", NEVER)
    b.start()
    w = wire(b.url)
    bodies: list[dict[str, Any]] = [{"args": [1]}, {"jobs": [{}, {}]}]
    for body in bodies:
        status, reply = w.call("POST", "/v1/queues/low/jobs", body)
        assert (status, reply["error"]) == (507, "disk_low"), reply
        assert "--min-free-disk" in reply["message"], reply
    assert w.ok("GET", "/v1/queues/low")["counts"]["queued"] == 6  # nothing stored
    _drain_works(w, "low")
    assert w.ok("GET", "/healthz")["status"] == "ok"  # the broker is fine, just full
    assert "disk.low" in b.log_path.read_text()
    b.stop()
    b.args = ()  # the default floor (50 MB) is far below this disk's free space
    b.start()
    assert len(wire(b.url).ok("POST", "/v1/queues/low/jobs", {})["id"]) == 26


def test_min_free_disk_comes_from_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qbroker import cli, config

    parse = cli.build_parser().parse_args
    assert cli.config_from(parse(["serve"])).min_free_disk == 50_000_000
    assert config.DEFAULT_MIN_FREE_DISK == 50_000_000
    monkeypatch.setenv("QBROKER_MIN_FREE_DISK", "123")
    assert cli.config_from(parse(["serve"])).min_free_disk == 123
    flagged = parse(["serve", "--min-free-disk", "0"])
    assert cli.config_from(flagged).min_free_disk == 0
    with pytest.raises(SystemExit, match="min-free-disk"):
        cli.main(["serve", "--min-free-disk", "-1"])


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted after the test (after its brokers are stopped)."""
    where = tmp_path / "small"
    if not _mount_tmpfs(where, 8 * 1024 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs root); the flag test covers it")
    yield where
    _umount(where)


def test_filling_disk_refuses_enqueues_below_floor_and_drains(
    small_fs: Path, wire: type[Wire]
) -> None:
    floor = 2 * 1024 * 1024
    b = BrokerProcess(small_fs / "data", ("--min-free-disk", str(floor)))
    try:
        b.start()
        w = wire(b.url)
        w.ok(
            "POST", "/v1/queues/fill/jobs", {"jobs": [{"args": [i]} for i in range(8)]}
        )
        filler = small_fs / "filler"
        st = os.statvfs(small_fs)
        # leave 1 MiB: under the floor, yet room for the drain's writes
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 1024 * 1024))
        reply = wait_for(
            lambda: (r := w.call("POST", "/v1/queues/fill/jobs", {}))[0] == 507 and r
        )
        assert reply[1]["error"] == "disk_low", reply
        _drain_works(w, "fill")
        _drain_works(w, "fill")
        filler.unlink()
        wait_for(lambda: w.call("POST", "/v1/queues/fill/jobs", {})[0] == 201)
    finally:
        b.stop()
