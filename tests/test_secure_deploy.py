"""The deployment recipes, checked where no Docker daemon or systemd runs: the compose
file parsed and cross-checked with the Dockerfiles it builds, every command line of the
images, units and supervisor config parsed by the real CLI parsers, and the compose
file's healthchecks, tokens and sample tasks run against a real broker."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qclient
import yaml
from qbroker import cli as broker_cli
from qworker import cli as worker_cli

from tests.conftest import ROOT, BrokerFactory, child_env

DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return doc


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` with no VAR set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def parse_command(argv: list[str]) -> Any:
    """Parse a qbroker or qworker command line with the real parser."""
    prog = Path(argv[0]).name
    if prog == "qbroker":
        return broker_cli.build_parser().parse_args(argv[1:])
    assert prog == "qworker", argv
    return worker_cli.build_parser().parse_args(argv[1:])


def in_this_python(check: list[str]) -> list[str]:
    """A healthcheck's command (`CMD python ...`) run by this test's interpreter."""
    assert check[:2] == ["CMD", "python"], check
    return [sys.executable, *check[2:]]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s?", value)
    assert match, value
    return float(match.group(1))


def test_compose_file_runs_a_broker_with_a_volume_and_two_workers() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"broker", "worker"}
    broker, worker = services["broker"], services["worker"]
    # a named volume, declared, mounted where the image keeps its database
    [mount] = broker["volumes"]
    volume, _, target = mount.partition(":")
    assert volume in doc["volumes"] and target == "/data"
    broker_file = dockerfile(DOCKER / "Dockerfile")
    assert ("VOLUME", "/data") in broker_file
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["broker"]["condition"] == "service_healthy"
    assert worker["environment"]["QBROKER_URL"] == "http://broker:7733"
    for service in (broker, worker):
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and check["retries"] >= 1
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
    # a worker is given longer to stop than its tasks are given to finish
    [cmd] = [
        json.loads(a) for i, a in dockerfile(DOCKER / "worker.Dockerfile") if i == "CMD"
    ]
    grace = parse_command(cmd).grace
    assert seconds(worker["stop_grace_period"]) > grace
    assert seconds(broker["stop_grace_period"]) > 10  # the broker's shutdown grace


@pytest.mark.parametrize("name", ["Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_what_exists_and_run_valid_commands(name: str) -> None:
    instructions = dockerfile(DOCKER / name)
    for word, args in instructions:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    [cmd] = [json.loads(a) for w, a in instructions if w == "CMD"]  # exec form
    parse_command(cmd)
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert any(w == "USER" for w, _ in instructions)  # not root


def test_compose_tokens_healthchecks_and_sample_tasks_work(
    broker_factory: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    tokens = interpolate(services["broker"]["environment"]["QBROKER_TOKENS"])
    monkeypatch.setenv("QBROKER_TOKENS", tokens)
    b = broker_factory(name="compose").start()
    monkeypatch.delenv("QBROKER_TOKENS")
    worker_token = interpolate(services["worker"]["environment"]["QBROKER_TOKEN"])

    # the broker's healthcheck, pointed at this broker's port
    broker_check = in_this_python(services["broker"]["healthcheck"]["test"])
    broker_check = [a.replace(":7733", f":{b.port}") for a in broker_check]
    assert subprocess.run(broker_check, env=child_env(), timeout=30).returncode == 0
    # the worker's: healthy while its broker answers, unhealthy once it does not
    worker_check = in_this_python(services["worker"]["healthcheck"]["test"])
    ok = subprocess.run(worker_check, env=child_env(QBROKER_URL=b.url), timeout=30)
    assert ok.returncode == 0
    down = subprocess.run(
        worker_check, env=child_env(QBROKER_URL="http://127.0.0.1:9"), timeout=60,
        capture_output=True,
    )  # fmt: skip
    assert down.returncode != 0

    # the sample tasks, sent with the producer token, run by a worker with its token
    producer_token = re.search(r"producer:(\S+)", tokens)
    assert producer_token is not None
    with qclient.Client(b.url, token=producer_token.group(1)) as producer:
        add = producer.send("add", [2, 3])
        mail = producer.send("send_email", {"to": "a@example.com", "subject": "hi"})
        [cmd] = [
            json.loads(a)
            for w, a in dockerfile(DOCKER / "worker.Dockerfile")
            if w == "CMD"
        ]
        run = subprocess.run(
            [sys.executable, "-m", "qworker", *cmd[1:], "--burst", "--url", b.url],
            cwd=DOCKER, env=child_env(QBROKER_TOKEN=worker_token),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert add.result(timeout=10) == 5
        assert mail.result(timeout=10) == "sent 'hi' to a@example.com"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep case
    parser.read_string(path.read_text())
    return parser


def test_systemd_units_run_valid_commands() -> None:
    broker = unit(DEPLOY / "qbroker.service")
    args = parse_command(shlex.split(broker["Service"]["ExecStart"]))
    assert args.command == "serve" and args.data_dir == "/var/lib/qbroker"
    assert broker["Service"]["StateDirectory"] == "qbroker"  # that data dir
    assert broker["Service"]["KillSignal"] == "SIGTERM"
    assert int(broker["Service"]["TimeoutStopSec"]) > 10

    worker = unit(DEPLOY / "qworker@.service")
    args = parse_command(shlex.split(worker["Service"]["ExecStart"]))
    assert "%i" in args.name  # one name per instance
    assert int(worker["Service"]["TimeoutStopSec"]) > args.grace
    assert worker["Service"]["KillMode"] == "mixed"

    backup = unit(DEPLOY / "qbroker-backup.service")
    assert "qbroker backup" in backup["Service"]["ExecStart"]
    timer = unit(DEPLOY / "qbroker-backup.timer")
    assert timer["Timer"]["OnCalendar"] == "daily"


def test_supervisor_config_runs_valid_commands() -> None:
    conf = unit(DEPLOY / "supervisord.conf")
    broker = conf["program:qbroker"]
    assert parse_command(shlex.split(broker["command"])).command == "serve"
    worker = conf["program:qworker"]
    args = parse_command(shlex.split(worker["command"]))
    assert int(worker["numprocs"]) == 2
    assert int(worker["stopwaitsecs"]) > args.grace


def test_deploy_doc_names_files_that_exist() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"`((?:deploy|docker)/[\w@.\-]+)`", doc))
    assert {
        "deploy/qbroker.service",
        "deploy/qworker@.service",
        "docker/compose.yaml",
    } <= named
    for path in named:
        assert (ROOT / path).exists(), path
