"""Helpers for the Celery tests: the result backend's entry point, and `celery worker`
subprocesses in their own process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import ROOT, child_env

CELERY_PROJ = ROOT / "tests" / "celeryproj"
START_TIMEOUT = 60.0  #: seconds a Celery worker may take to say it is ready


def entry_points_dir(where: Path) -> Path:
    """A directory holding a dist-info with the `celery.result_backends` entry points
    that pyproject.toml declares (what `pip install` registers), for sys.path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = where / f"qbroker-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: qbroker\nVersion: {project['version']}\n"
    )
    lines = []
    for group, points in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class CeleryWorker:
    """`celery -A proj worker` on the tests' Celery project."""

    def __init__(
        self, log_path: Path, env: dict[str, str], *args: str, cwd: Path = CELERY_PROJ
    ) -> None:
        self.log_path = log_path
        self.env = env
        self.args = args
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> CeleryWorker:
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "celery", *self.args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own group: a kill takes the pool too
        )
        log.close()
        if wait_ready:
            self.wait_log(" ready.")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} in the log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), then SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the main process stops its pool
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def celery_env(broker_port: int, eps: Path, **extra: str) -> dict[str, str]:
    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(eps), str(CELERY_PROJ), env["PYTHONPATH"]])
    env["CELERY_BROKER_URL"] = f"qbroker://127.0.0.1:{broker_port}"
    return env
