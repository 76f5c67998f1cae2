"""The `qbroker` admin verbs against a real broker: tables, --json, one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qclient
import trustme
from qclient.wire import WorkerBeat

from tests.conftest import BrokerProcess, child_env


def qbroker(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbroker", *args],
        env=child_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def filled(broker: BrokerProcess) -> dict[str, Any]:
    with qclient.Client(broker.url) as c:
        c.send_many("emails", [{"n": i} for i in range(3)])
        job = c.send("reports", kwargs={"user_id": 42})
        (leased,) = c.lease(["reports"], worker="w-cli")
        c.fail(job.id, leased.lease, error="KeyError: 'x'",
               traceback="Traceback (most recent call last):\n  boom")  # fmt: skip
        c.beat(WorkerBeat(name="w-cli", queues=["reports"], pool="threads",
                          concurrency=4, jobs=[]))  # fmt: skip
    return {"failed": job.id}


def test_status_shows_the_broker_queues_and_workers(
    broker: BrokerProcess, filled: dict[str, Any]
) -> None:
    done = qbroker("status", "--url", broker.url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"broker {broker.url}: ok" in out and "1 workers alive" in out
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("QUEUE"))
    emails = next(ln for ln in lines if ln.startswith("emails"))
    # aligned: the queued count ends where its header does
    assert emails.index("3") + 1 == header.index("QUEUED") + len("QUEUED")
    assert any(ln.startswith("w-cli") and "alive" in ln for ln in lines)


def test_queues_and_workers_print_json_for_scripts(
    broker: BrokerProcess, filled: dict[str, Any]
) -> None:
    queues = json.loads(qbroker("queues", "--url", broker.url, "--json").stdout)
    assert {q["queue"]: q["counts"]["queued"] for q in queues["queues"]} == {
        "emails": 3, "reports": 0,
    }  # fmt: skip
    done = qbroker("workers", "--json", env={"QBROKER_URL": broker.url})
    (w,) = json.loads(done.stdout)["workers"]
    assert (w["name"], w["state"], w["concurrency"]) == ("w-cli", "alive", 4)
    table = qbroker("workers", "--url", broker.url).stdout.splitlines()
    assert table[0].split()[:3] == ["WORKER", "STATE", "QUEUES"]
    assert table[1].split()[:3] == ["w-cli", "alive", "reports"]


def test_job_shows_the_record_its_error_and_traceback(
    broker: BrokerProcess, filled: dict[str, Any]
) -> None:
    done = qbroker("job", filled["failed"], "--url", broker.url)
    assert done.returncode == 0, done.stderr
    assert any(ln.split() == ["state", "failed"] for ln in done.stdout.splitlines())
    assert "worker" in done.stdout and "w-cli" in done.stdout
    assert "KeyError: 'x'" in done.stdout and "boom" in done.stdout
    record = json.loads(qbroker("job", filled["failed"], "--url", broker.url,
                                "--json").stdout)  # fmt: skip
    assert record["kwargs"] == {"user_id": 42}


def one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_an_unknown_job_is_one_line_and_exit_1(broker: BrokerProcess) -> None:
    line = one_line_failure(qbroker("job", "nope", "--url", broker.url))
    assert "404 job_not_found" in line and "nope" in line


def test_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for verb in ("status", "queues", "workers", "jobs"):
        line = one_line_failure(qbroker(verb, "--url", f"http://127.0.0.1:{port}"))
        assert "cannot reach the broker" in line, line


def test_a_wrong_token_is_one_line_and_exit_1(broker_factory: Any) -> None:
    b = broker_factory(args=("--token", "s3cret")).start()
    line = one_line_failure(qbroker("status", "--url", b.url, "--token", "nope"))
    assert "401 unauthorized" in line and "--token" in line
    done = qbroker("workers", "--url", b.url, env={"QBROKER_TOKEN": "s3cret"})
    assert done.returncode == 0, done.stderr


def test_an_https_broker_with_a_private_ca(broker_factory: Any, tmp_path: Path) -> None:
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    authority.cert_pem.write_to_path(str(ca))
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    args = ("--tls-cert", str(cert), "--tls-key", str(key))
    b = broker_factory(name="tls", args=args, ca=ca).start()
    done = qbroker("queues", "--url", b.url, "--ca", str(ca))
    assert done.returncode == 0, done.stderr
    line = one_line_failure(qbroker("queues", "--url", b.url))  # no CA: refused
    assert "CERTIFICATE_VERIFY_FAILED" in line
