"""Fixtures that run a real `qbroker serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: PYTHONPATH that makes the nested packages importable without an install.
SRC_PATH = os.pathsep.join(str(ROOT / p) for p in ("broker", "client", "worker"))
START_TIMEOUT = 20.0  #: seconds a broker may take to write its ready file


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a broker/worker subprocess: our sources first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_PATH + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class BrokerProcess:
    """One `qbroker serve` subprocess on a data dir; restartable on the same dir."""

    def __init__(
        self, data_dir: Path, args: tuple[str, ...] = (), ca: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.args = args
        self.ca = ca  #: the CA of its --tls-cert: it serves https
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"

    @property
    def url(self) -> str:
        scheme = "http" if self.ca is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> BrokerProcess:
        """Start the broker and wait until it answers /healthz.

        Args:
            port: the port to bind; default: the last one used, or a free one.
        """
        assert self.proc is None or self.proc.poll() is not None, "already running"
        ready = self.data_dir.parent / f"{self.data_dir.name}.ready"
        ready.unlink(missing_ok=True)
        want = self.port if port is None else port
        cmd = [
            sys.executable, "-m", "qbroker", "serve",
            "--host", "127.0.0.1", "--port", str(want),
            "--data-dir", str(self.data_dir), "--ready-file", str(ready),
            *self.args,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            text = ready.read_text().strip() if ready.exists() else ""
            if text:
                self.port = int(text)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not become ready")
            time.sleep(0.02)
        tls = None if self.ca is None else ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(
            self.url + "/healthz", timeout=5, context=tls
        ) as reply:
            assert reply.status == 200
        return self

    def kill(self) -> None:
        """SIGKILL the broker (a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> int:
        """SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Make brokers: `broker_factory(name="b", args=("--max-body", "100"))`, not started."""
    made: list[BrokerProcess] = []

    def make(
        name: str = "data", args: tuple[str, ...] = (), ca: Path | None = None
    ) -> BrokerProcess:
        b = BrokerProcess(tmp_path / name, args, ca)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> BrokerProcess:
    """A started broker on a fresh data dir; `broker.url` is its base URL."""
    return broker_factory().start()
