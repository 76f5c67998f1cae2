"""The core's shape: a data dir of the last release migrates on start; queues are rows
that say when a worker last leased from them; one route table drives routing, handlers
and the OpenAPI document; the broker's modules stay small and import no cycle."""

from __future__ import annotations

import ast
import sqlite3
import time
from pathlib import Path

import msgspec
from qbroker import auth, openapi
from qbroker.app import Broker
from qbroker.routes import ROUTES
from qbroker.store.sqlite import schema
from qclient import wire

from tests.conftest import ROOT, BrokerFactory, BrokerProcess
from tests.wirehttp import Wire

V1_DUMP = ROOT / "tests" / "data" / "qbroker-v1.sql"


def _counts(stats: dict[str, object]) -> dict[str, int]:
    counts = stats["counts"]
    assert isinstance(counts, dict)
    return {k: v for k, v in counts.items() if v}


def test_a_data_dir_of_the_last_release_migrates_on_start(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory(name="old")
    b.data_dir.mkdir()
    db = b.data_dir / "qbroker.db"
    with sqlite3.connect(db) as conn:  # the file qbroker 0.1.0 wrote (schema 1)
        conn.executescript(V1_DUMP.read_text())
    b.start()
    w = Wire(b.url)
    queues = {q["queue"]: q for q in w.ok("GET", "/v1/queues")["queues"]}
    assert sorted(queues) == ["emails", "reports"]
    assert _counts(queues["emails"]) == {"queued": 1, "succeeded": 1, "failed": 1}
    assert _counts(queues["reports"]) == {"queued": 1, "scheduled": 1}
    assert [q["last_leased_at"] for q in queues.values()] == [None, None]
    done = w.job("mail-done")
    assert (done["state"], done["result"], done["kwargs"]) == (
        "succeeded", {"sent": True}, {"to": "a@b.c"}
    )  # fmt: skip
    assert w.job("mail-failed")["error"] == "ValueError: bad"
    status, reply = w.call(
        "POST",
        "/v1/queues/reports/jobs",
        {"task": "build_report", "dedup_key": "monthly"},
    )
    assert (status, reply["error"]) == (409, "duplicate_dedup_key")
    before = time.time()
    [job] = w.lease("emails")
    assert job["id"] == "mail-waiting" and job["kwargs"] == {"to": "c@d.e"}
    w.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"], "result": 1})
    leased_at = w.ok("GET", "/v1/queues/emails")["last_leased_at"]
    assert before - 1 <= leased_at <= time.time() + 1
    w.close()
    assert b.stop() == 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == schema.SCHEMA_VERSION
        # every step ran: the schedules' table (the fourth) is there too
        assert conn.execute("SELECT count(*) FROM schedules").fetchone()[0] == 0
        rows = conn.execute("SELECT name, paused FROM queues ORDER BY name").fetchall()
        assert rows == [("emails", 0), ("reports", 0)]
    b.start()  # and again: nothing left to migrate
    w = Wire(b.url)
    assert w.ok("GET", "/v1/queues/emails")["last_leased_at"] == leased_at
    assert w.job("report-later")["state"] == "scheduled"
    w.close()


def test_a_queue_says_when_a_worker_last_leased_from_it(broker: BrokerProcess) -> None:
    """A job sent to a queue no worker asks for sits queued: the queue says so."""
    w = Wire(broker.url)
    w.enqueue("emails", kwargs={"to": "a@b.c"})
    stats = w.ok("GET", "/v1/queues/emails")
    assert stats["counts"]["queued"] == 1 and stats["last_leased_at"] is None
    before = time.time()
    assert w.lease("email", wait=0.1) == []  # a worker started on a misspelt queue
    listed = {q["queue"]: q for q in w.ok("GET", "/v1/queues")["queues"]}
    assert listed["emails"]["last_leased_at"] is None
    assert listed["email"]["counts"]["queued"] == 0
    assert before - 1 <= listed["email"]["last_leased_at"] <= time.time() + 1
    assert w.ok("GET", "/v1/queues/never-used")["last_leased_at"] is None
    [job] = w.lease("emails")
    assert w.ok("GET", "/v1/queues/emails")["last_leased_at"] >= before - 1
    w.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"]})
    w.close()


def test_one_route_table_binds_every_handler_and_documents_every_route() -> None:
    names = {r.name for r in ROUTES}
    assert len(names) == len(ROUTES)
    assert {n[3:] for n in dir(Broker) if n.startswith("on_")} == names
    assert set(auth.ROUTE_ROLES) == names  # each route's roles, beside the table
    doc = openapi.document()
    documented = {
        (method.upper(), path, op["operationId"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert documented == {(r.method, r.path, r.name) for r in ROUTES}
    for r in ROUTES:  # every reply is a wire struct (or not a struct: text, a document)
        for t in (*r.reply_forms, r.reply):
            if t is not None:
                assert issubclass(t, msgspec.Struct)
                assert t.__module__.startswith(wire.__name__ + ".")


MAX_MODULE_LINES = 600  #: the project's own limit for a module


def test_no_broker_module_is_over_the_size_limit() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in (ROOT / "broker").rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The qbroker modules `path` (the module `module`) imports, by name."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(
                    "."
                )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != module}


def test_the_broker_package_has_no_import_cycles() -> None:
    root = ROOT / "broker"
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    assert graph["qbroker.app"] >= {"qbroker.store", "qbroker.transitions"}  # it reads
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
