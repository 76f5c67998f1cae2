"""Scoped tokens: every route of the broker's route table tried with every role.

The routes come from `qbroker.routes.ROUTES`, the table the broker dispatches by, so
a new endpoint is tried here the day it is added, and the first test fails until its
roles are listed in `qbroker.auth.ROUTE_ROLES`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qclient
from qbroker import auth, openapi, routes

from tests.conftest import BrokerFactory, BrokerProcess, child_env
from tests.test_worker import TESTS_DIR
from tests.wirehttp import Wire

#: (method, path, name) of every route
ROUTE_ROWS = [(r.method, r.path, r.name) for r in routes.ROUTES]

TOKENS = {
    "producer": "prod-Tok3n",
    "worker": "work-Tok3n",
    "read": "read-Tok3n",
    "admin": "admin-Tok3n",
}
PATH_VALUES = {"{queue}": "rolesq", "{id}": "no-such-job", "{key}": "task:x"}


def endpoints() -> list[tuple[str, str, str]]:
    """(method, concrete path, route name) for every route of the route table."""
    out = []
    for method, shape, name in ROUTE_ROWS:
        path = shape
        for param, value in PATH_VALUES.items():
            path = path.replace(param, value)
        out.append((method, path, name))
    return out


@pytest.fixture
def roles_broker(broker_factory: BrokerFactory, tmp_path: Path) -> BrokerProcess:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "# role:token, one a line\n\n"
        + "".join(f"{role}:{token}\n" for role, token in TOKENS.items())
    )
    args = ("--tokens-file", str(tokens_file), "--log-level", "debug")
    return broker_factory(name="roles", args=args).start()


def call(wire: Wire, method: str, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = b"{}" if method == "POST" else None
    status, raw, _ = wire.raw(method, path, body, headers)
    return status, json.loads(raw) if raw.startswith(b"{") else None


def test_every_route_has_its_roles_listed() -> None:
    routes = {name for _, _, name in ROUTE_ROWS}
    assert routes - auth.ROUTE_ROLES.keys() == set(), "list the roles in auth.py"
    assert auth.ROUTE_ROLES.keys() - routes == set(), "a route that no longer exists"
    # the OpenAPI document describes the same routes
    documented = {
        op["operationId"]
        for methods in openapi.document()["paths"].values()
        for op in methods.values()
    }
    assert documented == routes


def test_roles_follow_the_policy() -> None:
    """The issue's policy: read has every GET; producer enqueues, reads jobs and
    waits for results; worker leases and settles, syncs its schedules and the limits
    its tasks declare, beats and waits for cancels of its jobs; both use the
    key-value store (Celery's results: a producer reads them and saves groups, a
    worker stores them); anything else is admin's."""
    allowed = {
        role: {n for _, _, n in ROUTE_ROWS if role in auth.ROUTE_ROLES.get(n, ())}
        for role in auth.ROLES
    }
    gets = {n for m, _, n in ROUTE_ROWS if m == "GET"}
    assert gets <= allowed["read"] and allowed["read"] <= gets
    kv = {"kv_get", "kv_set", "kv_incr", "kv_expire", "kv_delete"}
    assert {"enqueue", "get_job", "job_result", "results", *kv} == allowed[
        "producer"
    ] - {"healthz"}
    # put_schedule: a worker sends its code's schedules when it starts (issue 24)
    assert {
        "lease", "ack", "fail", "extend", "release", "ack_many", "fail_many",
        "release_many", "cancels", "put_limit", "put_schedule", "worker_beat", *kv,
    } == allowed["worker"] - {"healthz"}  # fmt: skip
    assert "cancel" not in set().union(*allowed.values())  # admin only
    assert "purge" not in set().union(*allowed.values())


def test_every_endpoint_with_every_role(roles_broker: BrokerProcess) -> None:
    wire = Wire(roles_broker.url)
    tried = 0
    for method, path, name in endpoints():
        for role, token in TOKENS.items():
            status, body = call(wire, method, path, token)
            may = role == "admin" or role in auth.ROUTE_ROLES.get(name, ())
            if may:
                assert status not in (401, 403), (role, name, status, body)
            else:
                needed = list(auth.roles_for(name))
                assert (status, body["error"]) == (403, "forbidden"), (role, name)
                assert body["roles"] == needed, (role, name, body)
                assert role in body["message"] and needed[0] in body["message"]
            tried += 1
        # without a token: 401 (the path is not even looked at), but for /healthz
        status, body = call(wire, method, path, None)
        assert status == (200 if name == "healthz" else 401), (name, status)
        wire.close()
        wire = Wire(roles_broker.url)  # a 401 closes the connection
    assert tried == 4 * len(ROUTE_ROWS) >= 4 * 18
    wire.close()
    # tokens are never logged, whatever the log level
    log = roles_broker.log_path.read_text(errors="replace")
    assert "request" in log or "broker" in log
    for token in TOKENS.values():
        assert token not in log


def test_a_403_keeps_the_connection_and_changes_nothing(
    roles_broker: BrokerProcess,
) -> None:
    with qclient.Client(roles_broker.url, token=TOKENS["producer"]) as producer:
        job = producer.send("rolesq", 1)
        with pytest.raises(qclient.BrokerError) as info:
            producer.lease(["rolesq"])
        assert (info.value.status, info.value.reason) == (403, "forbidden")
        assert "worker" in str(info.value)
        with pytest.raises(qclient.BrokerError):
            producer.cancel(job.id)
        assert job.status() == "queued"
    with qclient.Client(roles_broker.url, token=TOKENS["read"]) as reader:
        assert reader.queue("rolesq").counts["queued"] == 1
        with pytest.raises(qclient.BrokerError, match="403 forbidden"):
            reader.send("rolesq", 2)


def test_token_flag_is_admin_and_env_tokens_work(
    broker_factory: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QBROKER_TOKENS", "worker:w-1, producer:p-1")
    b = broker_factory(name="envtok", args=("--token", "the-admin")).start()
    monkeypatch.delenv("QBROKER_TOKENS")
    with qclient.Client(b.url, token="the-admin") as admin:
        admin.send("q", 1)
        [job] = admin.lease(["q"])
        assert admin.cancel(job.id) == "cancelled"
    with qclient.Client(b.url, token="w-1") as worker:
        assert worker.lease(["q"], max=1) == []
    with qclient.Client(b.url, token="p-1") as producer:
        producer.send("q", 2)
        with pytest.raises(qclient.BrokerError, match="403"):
            producer.queues()


def serve_fails(tmp_path: Path, *args: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "qbroker", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "d"), *args],
        env=child_env(**env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("producer:ok-1\njust-a-s3cret-token\n", "line 2: expected role:token"),
        ("producer:ok-1\nsuperuser:s3cret-token\n", "line 2: unknown role"),
        ("s3cret-token:producer\n", "line 1: unknown role"),
        ("worker:bad token s3cret\n", "line 1: a token may hold"),
        (
            "worker:s3cret-token\nread:s3cret-token\n",
            "line 2: this token is given twice",
        ),
        ("# nothing\n\n", "holds no token"),
    ],
)
def test_broker_refuses_a_bad_tokens_file(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    line = serve_fails(tmp_path, "--tokens-file", str(path))
    assert needle in line and str(path) in line
    assert "s3cret" not in line  # never repeats a token


def test_broker_refuses_an_unreadable_tokens_file_and_bad_env(tmp_path: Path) -> None:
    assert "cannot read tokens file" in serve_fails(
        tmp_path, "--tokens-file", str(tmp_path / "missing")
    )
    line = serve_fails(tmp_path, QBROKER_TOKENS="producer:a,boss:s3cret")
    assert "QBROKER_TOKENS, entry 2: unknown role" in line and "s3cret" not in line


def test_worker_with_a_producer_token_exits_1_with_one_line(
    roles_broker: BrokerProcess,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qworker", "--url", roles_broker.url,
         "--module", "tasks_worker", "--queue", "rolesq", "--log-format", "json"],
        cwd=TESTS_DIR, env=child_env(QBROKER_TOKEN=TOKENS["producer"]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 1, out
    errors = [json.loads(ln) for ln in out.splitlines() if '"level": "error"' in ln]
    assert [e["event"] for e in errors] == ["worker.unauthorized"], out
    assert "403 forbidden" in errors[0]["error"] and "worker role" in errors[0]["fix"]
    assert TOKENS["producer"] not in out
