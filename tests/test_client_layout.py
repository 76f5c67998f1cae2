"""qclient's shape, without a broker: no import cycles, modules of a readable size,
and its sans-IO parts (the retry policy, an operation) driven by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest
import qclient
from qclient import _ops, _retry
from qclient._client import Done, advance
from qclient._http import Codec, Response
from qclient._retry import Failure, Request, Retry

from .conftest import ROOT

PACKAGE = ROOT / "client" / "qclient"
MAX_LINES = 600  #: the project's limit for one module


def imports_of(path: Path, package: str) -> set[str]:
    """The modules of `package` that a module imports, anywhere in it (at the top,
    under TYPE_CHECKING, or inside a function): a cycle through any is a cycle."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package)}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:  # `from qclient import _ops`
                found |= {f"{package}.{a.name}" for a in node.names}
            elif node.module.startswith(package + "."):
                found.add(node.module)
    return found


def cycle_in(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> modules it imports), or []."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done or name not in graph:
            return []
        for child in sorted(graph[name]):
            if found := visit(child, [*path, name]):
                return found
        done.add(name)
        return []

    for name in sorted(graph):
        if found := visit(name, []):
            return found
    return []


def test_qclient_modules_import_each_other_without_a_cycle() -> None:
    graph = {
        f"qclient.{path.stem}": imports_of(path, "qclient")
        for path in PACKAGE.glob("*.py")
        if path.stem != "__init__"
    }
    assert graph["qclient._sync"]  # the scan sees imports at all
    assert cycle_in(graph) == []
    # and the check can fail: the cycle the old _job.py and _sync.py made
    assert cycle_in({"a._job": {"a._sync"}, "a._sync": {"a._job"}}) != []


def test_qclient_modules_stay_under_the_size_limit() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


# ---------------------------------------------------------------- the retry policy


def codec() -> Codec:
    return Codec("http://127.0.0.1:7733", None, "json")


def policy(request: Request, retries: int = 3, now: float = 100.0) -> Retry:
    return Retry(codec(), request, url="u", timeout=5.0, retries=retries, now=now)


def reply(status: int, body: bytes = b"{}") -> Response:
    return Response(status, body, msgpack=False)


def test_the_retry_policy_says_return_sleep_or_raise() -> None:
    retry = policy(Request(b"GET", "/healthz"), retries=2)
    ok = reply(200)
    assert retry.decide(ok, 100.0) is ok
    busy = reply(503, b'{"error": "shutting_down", "message": "bye"}')
    first = retry.decide(busy, 100.0)
    assert isinstance(first, float)
    assert _retry.BACKOFF_INITIAL / 2 <= first <= _retry.BACKOFF_INITIAL
    assert isinstance(retry.decide(busy, 100.1), float)
    error = retry.decide(busy, 100.2)  # two retries spent: raise the last reply
    assert isinstance(error, qclient.BrokerError)
    assert (error.status, error.reason) == (503, "shutting_down")


def test_the_retry_policy_on_failures_without_a_reply() -> None:
    refused = Failure(ConnectionRefusedError())
    retry = policy(Request(b"POST", "/v1/queues/q/jobs", b"{}"))
    assert isinstance(retry.decide(refused, 100.0), float)  # nothing sent: resend
    # a pooled socket the broker had closed: one resend at once, then a backoff
    stale = Failure(ConnectionResetError(), sent=True, stale=True)
    assert retry.decide(stale, 100.1) == 0.0
    pause = retry.decide(stale, 100.1)
    assert isinstance(pause, float) and pause > 0
    answer = reply(409)
    assert retry.decide(answer, 100.2) is answer
    assert answer.retried  # an earlier attempt may have been applied
    # no reply in time: the broker may be applying it; never resent
    late = policy(Request(b"GET", "/v1/queues")).decide(
        Failure(TimeoutError(), sent=True), 100.0
    )
    assert isinstance(late, qclient.ProtocolError)
    assert "no reply from u within 5 s" in str(late)
    # the whole call's budget (timeout + wait from its start) ends the retries
    out = policy(Request(b"GET", "/healthz"), retries=10).decide(refused, 104.99)
    assert isinstance(out, qclient.ProtocolError)
    assert isinstance(out.__cause__, ConnectionRefusedError)


def test_a_resent_long_poll_waits_only_what_is_left() -> None:
    def build(wait: float) -> Request:
        body = msgspec.json.encode({"wait": wait})
        return Request(b"POST", "/v1/results", body, wait, build)

    retry = policy(build(10.0), now=100.0)
    assert retry.reply_timeout == 15.0
    pause = retry.decide(Failure(ConnectionResetError(), sent=True), 104.0)
    assert isinstance(pause, float)
    left = 10.0 - (4.0 + pause)  # what is left when the resend goes out
    assert msgspec.json.decode(retry.body)["wait"] == pytest.approx(left)
    assert retry.reply_timeout == pytest.approx(5.0 + left)


# ---------------------------------------------------------------- an operation


def test_a_send_resent_into_409_asks_whether_its_job_is_stored() -> None:
    c = codec()
    spec = qclient.spec(["x"], job_id="j-1")
    op = _ops.send(c, "q", spec)
    first = advance(op, None)
    assert isinstance(first, Request)
    assert (first.method, first.path) == (b"POST", "/v1/queues/q/jobs")
    assert msgspec.json.decode(first.body)["args"] == ["x"]
    duplicate = reply(409, b'{"error": "duplicate_id", "message": "stored"}')
    duplicate.retried = True  # the policy saw an attempt that may have arrived
    check = advance(op, duplicate)
    assert isinstance(check, Request)
    assert (check.path, msgspec.json.decode(check.body)) == (
        "/v1/results",
        {"ids": ["j-1"], "wait": 0.0},
    )
    record = {
        "id": "j-1", "queue": "q", "task": "q", "state": "queued", "attempts": 0,
        "max_retries": 3, "priority": 0, "args": ["x"], "kwargs": {}, "headers": {},
        "result": None, "error": None, "traceback": None, "timeout": 30.0,
        "created_at": 1.0, "available_at": 1.0, "started_at": None,
        "finished_at": None, "expires_at": None, "worker": None,
    }  # fmt: skip
    done = advance(op, reply(200, msgspec.json.encode({"jobs": [record]})))
    assert isinstance(done, Done)
    assert done.value == "j-1"
    # a transport error raised into it comes out carrying the id to resend with
    op = _ops.send(c, "q", spec)
    advance(op, None)
    with pytest.raises(qclient.ProtocolError) as info:
        advance(op, qclient.ProtocolError("gone"))
    assert info.value.job_ids == ["j-1"]
