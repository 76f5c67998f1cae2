"""A Django project (tests/djangoproj) on qbroker: Celery configured with the CELERY_
namespace of Django settings, and the same project's tasks on qworker, which sets Django
up and takes the broker from the QBROKER setting."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import qclient
from qworker import Worker

from tests.celerytools import CeleryWorker, entry_points_dir
from tests.conftest import ROOT, BrokerProcess, child_env

DJANGO_PROJ = ROOT / "tests" / "djangoproj"
TIMEOUT = 60.0  #: seconds a subprocess may take on a loaded machine


def _env(broker: BrokerProcess, tmp_path: Path) -> dict[str, str]:
    env = child_env(
        TEST_BROKER_URL=broker.url,
        TEST_DB_PATH=str(tmp_path / "db.sqlite3"),
        DJANGO_SETTINGS_MODULE="djangoproj.settings",
    )
    env.pop("QBROKER_URL", None)  # the broker comes from settings.QBROKER
    eps = entry_points_dir(tmp_path / "eps")
    env["PYTHONPATH"] = os.pathsep.join([str(eps), str(DJANGO_PROJ), env["PYTHONPATH"]])
    return env


def _django(env: dict[str, str], code: str) -> str:
    """Run `code` in a fresh process with Django set up; returns its stdout."""
    script = "import django\ndjango.setup()\n" + code
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=DJANGO_PROJ,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_celery_takes_its_settings_from_the_celery_namespace(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    env = _env(broker, tmp_path)
    args = ("-A", "djangoproj", "worker", "-P", "threads", "-c", "2", "-l", "INFO")
    worker = CeleryWorker(tmp_path / "celery.log", env, *args, cwd=DJANGO_PROJ)
    worker.start()
    try:
        got = _django(env, "from shop.tasks import add\nprint(add.delay(2, 3).get(30))")
    finally:
        worker.stop()
    assert got == "5"
    assert f"127.0.0.1:{broker.port}" in worker.log()


def test_a_view_sends_a_task_that_qworker_runs_with_the_orm(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    env = _env(broker, tmp_path)
    order = _django(
        env,
        "from django.core.management import call_command\n"
        "from django.test import Client\n"
        "call_command('migrate', verbosity=0)\n"
        "print(Client().get('/order/book/').json()['order'])\n",
    )
    qworker = [sys.executable, "-m", "qworker", "--module", "shop.jobs", "--burst"]
    done = subprocess.run(
        [*qworker, "--django-settings", "djangoproj.settings"],
        cwd=DJANGO_PROJ,
        env={k: v for k, v in env.items() if k != "DJANGO_SETTINGS_MODULE"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        row = db.execute("SELECT item, status FROM shop_order WHERE id = ?", (order,))
        assert row.fetchone() == ("book", "shipped")


@pytest.fixture
def configured(broker: BrokerProcess) -> object:
    yield qclient.configure(broker.url)
    qclient.configure()  # back to the environment's default for other tests


def test_configure_applies_to_the_worker_too(configured: qclient.Client) -> None:
    worker = Worker(["q"])
    assert worker.client.url == configured.url


def test_a_qbroker_setting_with_an_unknown_key_says_which(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    env = _env(broker, tmp_path)
    (tmp_path / "badsettings.py").write_text(
        "from djangoproj.settings import *\nQBROKER = {'URL': BROKER, 'HOST': 'x'}\n"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    env["DJANGO_SETTINGS_MODULE"] = "badsettings"
    done = subprocess.run(
        [sys.executable, "-c", "import qclient; qclient.default_client()"],
        cwd=DJANGO_PROJ,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode != 0
    assert "settings.QBROKER has unknown keys ['HOST']" in done.stderr
