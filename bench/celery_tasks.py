"""The Celery app and its `add` task for bench/peers.py (Celery 5 on Redis or qbroker).

The worker runs as ``python -m celery -A celery_tasks worker ...`` with cwd bench/ and
reads its queue from QB_BENCH_QUEUE; the producer side calls :func:`make_app` with the
same values, so both share one configuration. Redis db 15 is broker and result backend;
with QB_BENCH_CELERY_QBROKER set (a broker URL), that qbroker is both.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = "redis://127.0.0.1:6379/15"
ADD_NAME = "qbroker_bench.add"


def make_app(queue: str, qbroker: str | None = None) -> Celery:
    """The bench app on Redis, or on the qbroker at `qbroker` (http://host:port):
    the settings change of docs/migrating-from-celery.md, nothing else."""
    if qbroker is None:
        app = Celery("qbroker_bench", broker=REDIS_URL, backend=REDIS_URL)
    else:
        url = qbroker.replace("http://", "qbroker://")
        backend = (
            f"qclient.celery:ResultBackend+{url}"  # needs no installed entry point
        )
        app = Celery("qbroker_bench", broker=url, backend=backend)
        app.conf.broker_transport = "qclient.celery:Transport"
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=False,  # every result is stored and fetched
        result_expires=3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # stock otherwise (prefetch multiplier 4, early ack); no remote control or
        # events, which are not on the task path
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )

    @app.task(name=ADD_NAME, shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    return app


app = make_app(
    os.environ.get("QB_BENCH_QUEUE", "qbroker_bench"),
    os.environ.get("QB_BENCH_CELERY_QBROKER"),
)
